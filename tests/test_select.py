import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from layerwise.select import path_prefix

from conftest import random_models


def all_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]


# --------------------------------------------------------------------------- the forms


def test_module_path_selects_its_subtree(interleaved):
    assert lw.select(interleaved, "lstm2").names() == [
        "lstm2.weight_ih_l0", "lstm2.weight_hh_l0", "lstm2.bias_ih_l0", "lstm2.bias_hh_l0"]


def test_a_full_name_selects_one_parameter(interleaved):
    sel = lw.select(interleaved, "lstm1.weight_hh_l0")
    assert sel.params() == [interleaved.lstm1.weight_hh_l0]


def test_star_is_exactly_one_segment(vit):
    assert lw.select(vit, "blocks.*.attn.weight").names() == [f"blocks.{i}.attn.weight" for i in range(4)]
    # `*` never crosses a dot: `blocks.*.weight` would need the weight right below the block.
    assert len(lw.select(vit, "blocks.*.weight", missing_ok=True)) == 0


def test_star_inside_a_segment_is_a_glob(interleaved):
    assert lw.select(interleaved, "*.bias_*").names() == [
        "lstm1.bias_ih_l0", "lstm1.bias_hh_l0", "lstm2.bias_ih_l0", "lstm2.bias_hh_l0"]


def test_double_star_is_any_number_of_segments_zero_included(vit):
    names = lw.select(vit, "**.bias").names()
    assert names == [n for n in all_names(vit) if n.endswith(".bias")]
    assert lw.select(vit, "**.cls_token").names() == ["cls_token"]
    assert lw.select(vit, "blocks.**").names() == [n for n in all_names(vit) if n.startswith("blocks.")]


def test_numeric_ranges_and_lists(vit):
    owners = lambda sel: sorted({n.split(".")[1] for n in sel.names()})
    assert owners(lw.select(vit, "blocks.[1-2]")) == ["1", "2"]
    assert owners(lw.select(vit, "blocks.[0,3]")) == ["0", "3"]
    assert owners(lw.select(vit, "blocks.[2-99]")) == ["2", "3"]


def test_regex_is_a_full_match(interleaved):
    assert lw.select(interleaved, r"re:lstm\d\.weight_ih_l0").names() == ["lstm1.weight_ih_l0", "lstm2.weight_ih_l0"]
    # A full match: a fragment does not select.
    assert len(lw.select(interleaved, "re:weight", missing_ok=True)) == 0


def test_type_families_and_class_names(convbn, vit, interleaved, tied_lm):
    assert lw.select(convbn, "type:norm").names() == ["features.1.weight", "features.1.bias"]
    assert lw.select(convbn, "type:conv").names() == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
    assert lw.select(vit, "type:LayerNorm").names() == [n for n in all_names(vit) if ".norm." in f".{n}"]
    assert lw.select(interleaved, "type:rnn").names() == lw.select(interleaved, "lstm1", "lstm2").names()
    assert lw.select(tied_lm, "type:embedding").names() == ["embed.weight"]
    # A class name matches subclasses too (MultiheadAttention's out_proj is a Linear subclass).
    mha = nn.MultiheadAttention(4, 2)
    assert lw.select(mha, "type:Linear").names() == ["out_proj.weight", "out_proj.bias"]


def test_a_module_class_and_a_callable(interleaved):
    assert lw.select(interleaved, nn.Linear).names() == ["linear.weight", "linear.bias"]
    assert lw.select(interleaved, lambda name, p: p.ndim == 1 and "lstm2" in name).names() == [
        "lstm2.bias_ih_l0", "lstm2.bias_hh_l0"]


def test_negation_is_removed_from_the_union(interleaved):
    assert lw.select(interleaved, "lstm1", "linear", "!re:.*bias.*").names() == ["lstm1.weight_ih_l0", "lstm1.weight_hh_l0", "linear.weight"]
    # With only negations the union is everything.
    assert lw.select(interleaved, "!lstm1", "!lstm2").names() == ["norm.weight", "norm.bias", "linear.weight", "linear.bias"]


def test_shared_parameter_is_held_once_with_all_its_names(tied_lm):
    sel = lw.select(tied_lm, "decoder")
    assert sel.params() == [tied_lm.embed.weight, tied_lm.decoder.bias]
    assert sel.aliases()[0] == ("embed.weight", "decoder.weight")
    assert "decoder.weight" in sel and "embed.weight" in sel
    assert sel["decoder.weight"] is tied_lm.embed.weight
    # A negation by either name removes the one tensor.
    assert tied_lm.embed.weight not in lw.select(tied_lm, "!decoder.weight")


def test_selection_iterates_like_named_parameters(interleaved):
    sel = lw.select(interleaved, "linear")
    assert [(n, p) for n, p in sel] == list(interleaved.linear.named_parameters(prefix="linear"))
    assert sel.numel() == 6 * 3 + 3 and len(sel) == 2
    assert "Selection(2 tensors" in repr(sel)


def test_select_works_on_a_state_dict_grouping_aliases(tied_lm):
    sd = tied_lm.state_dict()
    sel = lw.select(sd, "decoder")
    assert sel.aliases() == [("embed.weight", "decoder.weight"), ("decoder.bias",)]
    with pytest.raises(lw.SelectionError, match="needs a model"):
        lw.select(sd, "type:norm")


def test_path_prefix_names_the_block():
    assert path_prefix("layers.*", "layers.3.attn.weight") == "layers.3"
    assert path_prefix("**.blocks.*", "enc.blocks.0.w") == "enc.blocks.0"
    assert path_prefix("layers.*", "head.weight") is None


# --------------------------------------------------------------------------- bad input


def test_no_match_names_the_selector_and_suggests_real_names():
    lstm = nn.Module()
    lstm.lstm = nn.LSTM(3, 3)
    with pytest.raises(lw.SelectionError) as e:
        lw.select(lstm, "lstm.weight")
    message = str(e.value)
    assert "'lstm.weight'" in message
    for real in ("lstm.weight_ih_l0", "lstm.weight_hh_l0"):
        assert real in message
    assert "missing_ok=True" in message


def test_every_missing_selector_is_reported_at_once(interleaved):
    with pytest.raises(lw.SelectionError) as e:
        lw.select(interleaved, "lstm3", "linear", "!nrom")
    assert "'lstm3'" in str(e.value) and "'!nrom'" in str(e.value)
    assert "norm" in str(e.value)  # the suggestion for the typo


def test_missing_ok_returns_an_empty_selection(interleaved):
    assert len(lw.select(interleaved, "nothing.here", missing_ok=True)) == 0


@pytest.mark.parametrize("selector, caret_under", [
    ("layers.[5-2]", "[5-2]"),
    ("layers.[a-b]", "[a-b]"),
    ("re:(", "("),
    ("blocks.h[0-2]", "h[0-2]"),
    ("a..b", "."),
    ("lstm, head", ","),
    ("x**", "x**"),
])
def test_malformed_selectors_point_at_the_fault(selector, caret_under, interleaved):
    with pytest.raises(lw.SelectionError) as e:
        lw.select(interleaved, selector)
    lines = str(e.value).splitlines()
    assert repr(selector) in lines[0]
    quoted, carets = lines[1].strip(), lines[2]
    assert quoted == selector
    start = carets.index("^") - (len(lines[1]) - len(lines[1].lstrip()))
    assert selector[start:start + len(caret_under)] == caret_under
    assert len(lines) >= 4, "the last line says what is allowed"


def test_unknown_type_lists_families_and_classes_present(interleaved):
    with pytest.raises(lw.SelectionError) as e:
        lw.select(interleaved, "type:nosuchtype")
    message = str(e.value)
    for allowed in ("norm", "embedding", "linear", "conv", "LSTM", "BatchNorm1d", "Linear"):
        assert allowed in message
    with pytest.raises(lw.SelectionError, match="did you mean type:LSTM"):
        lw.select(interleaved, "type:LSMT")


@pytest.mark.parametrize("selector", ["", "   ", "!", "!!head", "re:", "type:", 3.5])
def test_empty_and_non_string_selectors(selector, interleaved):
    with pytest.raises(lw.SelectionError):
        lw.select(interleaved, selector)


def test_selection_error_is_a_value_error():
    assert issubclass(lw.SelectionError, ValueError) and issubclass(lw.SelectionError, lw.LayerwiseError)


# --------------------------------------------------------------------------- properties


@given(random_models())
def test_double_star_selects_every_parameter_once(model):
    sel = lw.select(model, "**")
    distinct = list({id(p): p for p in model.parameters()}.values())
    assert [id(p) for p in sel.params()] == [id(p) for p in distinct]
    assert sorted(n for names in sel.aliases() for n in names) == sorted(all_names(model))


@given(random_models(), st.data())
def test_a_selector_and_its_negation_select_nothing(model, data):
    name = data.draw(st.sampled_from(all_names(model)))
    prefix = ".".join(name.split(".")[: data.draw(st.integers(1, name.count(".") + 1))])
    assert len(lw.select(model, prefix, "!" + prefix)) == 0


@given(random_models(), st.data())
def test_a_union_never_repeats_and_keeps_model_order(model, data):
    names = all_names(model)
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=5))
    sel = lw.select(model, *chosen)
    ids = [id(p) for p in sel.params()]
    assert len(ids) == len(set(ids))
    order = [id(p) for p in {id(p): p for p in model.parameters()}.values()]
    assert ids == [i for i in order if i in set(ids)]


@given(random_models())
def test_every_shared_parameter_is_found_under_each_name(model):
    for group in lw.shared(model):
        tensors = {id(lw.select(model, name).params()[0]) for name in group}
        assert len(tensors) == 1


@given(random_models(), st.data())
def test_a_module_path_selects_exactly_names_below_it(model, data):
    name = data.draw(st.sampled_from(all_names(model)))
    prefix = ".".join(name.split(".")[: data.draw(st.integers(1, name.count(".") + 1))])
    expected = {n for n in all_names(model) if n == prefix or n.startswith(prefix + ".")}
    selected = {n for names in lw.select(model, prefix).aliases() for n in names}
    # Tied parameters bring their other names along; every expected name is there.
    assert expected <= selected
    for names in lw.select(model, prefix).aliases():
        assert expected & set(names)


@given(random_models(), st.data())
def test_wildcards_keep_the_name_they_came_from(model, data):
    name = data.draw(st.sampled_from(all_names(model)))
    parts = name.split(".")
    starred = [("*" if data.draw(st.booleans()) else p) for p in parts]
    pattern = ".".join(starred)
    assert name in lw.select(model, pattern)
    assert name in lw.select(model, "**." + parts[-1])
    assert name in lw.select(model, "re:" + re.escape(name))
    sel = lw.select(model, "re:" + re.escape(name))
    assert len(sel) == 1
