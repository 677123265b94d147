import itertools
import re

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from layerwise.select import Walk, path_prefix, resolve, select_keys

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


@pytest.mark.parametrize("selector", ["", "   ", "!", "!!head", "re:", "type:", 3.5, None, b"lstm1", int, torch.Tensor,
                                      ["lstm1", "linear"]])
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


# --------------------------------------------------------------------------- the engine


def test_double_star_runs_in_linear_time_and_collapses(vit):
    # v0.1 backtracked through every split of the segments among the stars: seconds for this.
    assert lw.select(vit, "**." * 12 + "bias").names() == lw.select(vit, "**.bias").names()
    deep = nn.Module()
    leaf = deep
    for _ in range(24):
        leaf.a = nn.Module()
        leaf = leaf.a
    leaf.w = nn.Parameter(torch.zeros(1))
    # Twelve `**` each followed by a segment that occurs 24 times and a last one that never does.
    assert len(lw.select(deep, "**.a." * 12 + "nothing", missing_ok=True)) == 0
    assert lw.select(deep, "**.a." * 12 + "w").names() == [".".join(["a"] * 24 + ["w"])]


@pytest.mark.parametrize("selector", ["layers.[\u00b2]", "layers.[\u0663]", "layers.[1-\u00b2]", "re:a{99999999999}",
                                      "re:" + "(?:" * 5000 + ")" * 5000, "re:(?i", "type:L\u00e9", "a.[1,,2]", "a.[]"])
def test_hostile_selectors_are_selection_errors(selector, vit):
    with pytest.raises(lw.SelectionError):
        lw.select(vit, selector)


@pytest.mark.parametrize("pattern", [r"(a+)+", r"(a|a)*b", r"(.*\.)*bias", r"(\w+\.?)+x", r"(.*a){20}", r"(\d+|\w+)*!"])
def test_regexes_that_can_backtrack_exponentially_are_refused_before_matching(pattern):
    # Against this name each of these took seconds to hours: Python's re has no timeout.
    model = nn.Module()
    model.add_module("a" * 40, nn.Linear(1, 1))
    with pytest.raises(lw.SelectionError, match="exponential time") as err:
        lw.select(model, "re:" + pattern)
    assert repr("re:" + pattern) in str(err.value) and "(?>" in str(err.value)


@pytest.mark.parametrize("pattern", [r"(\w+\.)*bias", r"(?:[^.]*\.)*bias", r"(?>.*\.)*bias", r"(.*\.)*+bias",
                                     r"(layers\.\d+\.)+norm", r".*\.(weight|bias)", r"(a|ab)+", r"(\w+)\.\w+"])
def test_unambiguous_repetitions_stay_allowed(pattern):
    model = nn.Sequential(nn.Linear(1, 1), nn.LayerNorm(1))
    expected = [n for n, _ in model.named_parameters() if re.fullmatch(pattern, n)]
    assert lw.select(model, "re:" + pattern, missing_ok=True).names() == expected


_ALPHABET = st.sampled_from(list("ab.*[]-,!:0123456789 \u00b2{}()?+|^$\\") + ["re:", "type:", "**", "blocks", "norm"])


@given(st.one_of(st.text(max_size=30), st.lists(_ALPHABET, max_size=12).map("".join)))
def test_any_string_gives_a_result_or_a_selection_error(text):
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    for source in (model, model.state_dict()):
        try:
            sel = lw.select(source, text, missing_ok=True)
        except lw.SelectionError:
            continue
        assert all(name in all_names(model) for names in sel.aliases() for name in names)
    try:
        select_keys(["0.weight", "1.bias"], text, missing_ok=True)
    except lw.SelectionError:
        pass


@given(st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 10**12), st.integers(0, 3))
def test_numeric_ranges_match_exactly_their_integers(a, b, n, zeros):
    lo, hi = min(a, b), max(a, b)
    for probe in (n, lo, hi, lo - 1, hi + 1):
        if probe < 0:
            continue
        key = f"layers.{'0' * zeros}{probe}.w"
        assert bool(select_keys([key], f"layers.[{lo}-{hi}]", missing_ok=True)) == (lo <= probe <= hi)
    assert select_keys(["b.7", "b.07", "b.70", "b.3"], "b.[7,3]") == ["b.7", "b.07", "b.3"]


def _selectors(model: nn.Module, data) -> object:
    """A selector built from the model's own names: paths, stars, `**`, regexes, types, classes, callables."""
    name = data.draw(st.sampled_from(all_names(model)))
    parts = name.split(".")
    cut = parts[: data.draw(st.integers(1, len(parts)))]
    kind = data.draw(st.sampled_from(["path", "star", "deep", "re", "type", "class", "callable"]))
    if kind == "path":
        return ".".join(cut)
    if kind == "star":
        return ".".join("*" if data.draw(st.booleans()) else p for p in cut)
    if kind == "deep":
        return "**." + ".".join(cut[data.draw(st.integers(0, len(cut) - 1)):])
    if kind == "re":
        return "re:" + re.escape(".".join(cut[:-1])) + (r"\.\w+" if len(cut) > 1 else r"\w*")
    if kind == "type":
        return "type:" + data.draw(st.sampled_from(["norm", "linear", "embedding", "ModuleList", "Linear"]))
    if kind == "class":
        return data.draw(st.sampled_from([nn.Linear, nn.LayerNorm, nn.ModuleDict]))
    prefix = ".".join(cut) + "."
    return lambda n, p: n.startswith(prefix)


@given(random_models(), st.data())
def test_the_parameter_matcher_and_the_module_matcher_agree(model, data):
    selector = _selectors(model, data)
    res = resolve(model, selector, missing_ok=True)
    reached = {path for path, _ in res.modules}
    selected = {n for names, _ in res.groups for n in names}
    groups = {id(p) for _, p in res.groups}
    owner_paths = {n: n.rpartition(".")[0] for n in all_names(model)}
    # Reaching is closed downwards, and everything under a reached module is selected.
    for path, _ in model.named_modules(remove_duplicate=False):
        up = path.rpartition(".")[0] if path else None
        if up is not None and up in reached:
            assert path in reached
    for name, p in model.named_parameters(remove_duplicate=False):
        if owner_paths[name] in reached:
            assert id(p) in groups
    if isinstance(selector, str) and not selector.startswith("type:"):
        # Strings: the module matcher is the key matcher applied to module paths, and the parameter
        # matcher the key matcher applied to every name (a tied tensor comes with all its names).
        paths = [path for path, _ in model.named_modules(remove_duplicate=False)]
        assert reached == set(select_keys(paths, selector, missing_ok=True))
        assert set(select_keys(all_names(model), selector, missing_ok=True)) <= selected
    else:
        # Types and classes select exactly what the modules they reach hold.
        held = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if owner_paths[name] in reached}
        if callable(selector) and not isinstance(selector, type):
            assert held <= groups
        else:
            assert held == groups


def test_a_callable_reaches_the_modules_whose_parameters_it_all_selects(convbn):
    res = resolve(convbn, lambda name, p: name.startswith("features.0"))
    assert [path for path, _ in res.modules] == ["features.0"]
    frozen = lw.freeze(convbn, lambda name, p: name.startswith("features.1"))
    assert frozen.names() == ["features.1.weight", "features.1.bias"] and not convbn.train().features[1].training


def _one_argument(name):
    return name.endswith("bias")


@pytest.mark.parametrize("selector, message", [
    (_one_argument, "the selector callable '_one_argument' must take two arguments, \\(name, param\\)"),
    (lambda name, p: p.detach().sign(), r"answered a tensor of shape \(4, 1, 3, 3\) for 'features.0.weight'; answer True or False"),
])
def test_a_callable_selector_it_cannot_call_or_read_is_named(convbn, selector, message):
    with pytest.raises(lw.SelectionError, match=message):
        lw.freeze(convbn, selector)
    assert all(p.requires_grad for p in convbn.parameters())


def test_resolution_reports_unmatched_selectors_and_paramless_modules(convbn):
    res = resolve(convbn, "features.4", "!head", "features.9", missing_ok=True)
    assert len(res.groups) == 0 and [p for p, _ in res.modules] == ["features.4"]
    assert res.unmatched == ("!head", "features.9")
    with pytest.raises(lw.SelectionError, match="'features.9'.*Closest names: features"):
        resolve(convbn, "features.9")


def test_regex_selects_a_module_subtree_like_a_path(interleaved):
    # The model itself has the empty path: a regex matching it selects everything, like `**`.
    assert len(lw.select(interleaved, "re:(lstm)?")) == len(lw.select(interleaved, "**"))
    assert [p for p, _ in resolve(interleaved, "re:(lstm)?").modules] == [p for p, _ in interleaved.named_modules()]
    # `*` is one whole segment: never the model's empty path.
    assert "" not in [p for p, _ in resolve(interleaved, "*").modules]
    assert lw.select(interleaved, r"re:lstm\d").names() == lw.select(interleaved, "lstm1", "lstm2").names()
    assert lw.select(interleaved, "re:(?i)LINEAR").names() == ["linear.weight", "linear.bias"]
    assert lw.select(interleaved, "re:(?x) lin ear  # verbose, with a comment").names() == ["linear.weight", "linear.bias"]


@given(model=random_models(), anchor=st.sampled_from(["$", r"\Z", "(?:$)", "(?:x|$)"]))
def test_an_end_anchored_regex_of_a_module_path_selects_its_subtree_like_the_path(model, anchor):
    for path, _ in model.named_modules():
        if path:  # the documented form: a full match of a module path above a name selects the subtree
            wanted = lw.select(model, path, missing_ok=True).names()
            assert lw.select(model, f"re:{re.escape(path)}{anchor}", missing_ok=True).names() == wanted, path
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied one is listed under its first name
        assert any(q is param for q in lw.select(model, f"re:{re.escape(name)}{anchor}").params())
    keys = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert select_keys(keys, "re:.*$") == keys


def test_select_keys_keeps_key_order_and_refuses_what_needs_a_model():
    keys = ["b.1.w", "a.0.w", "a.0.b", "b.10.w"]
    assert select_keys(keys, "**.w", "!b.[10-99]") == ["b.1.w", "a.0.w"]
    assert select_keys(keys, "!a") == ["b.1.w", "b.10.w"]
    for selector in ("type:norm", nn.Linear, lambda n, p: True):
        with pytest.raises(lw.SelectionError, match="names only|needs tensors"):
            select_keys(keys, selector)
    with pytest.raises(lw.SelectionError, match="'c'.*missing_ok"):
        select_keys(keys, "c")
    for source in ("a.0.w", None, [1, 2]):
        with pytest.raises(lw.OptionTypeError):
            select_keys(source, "a")


def test_one_walk_serves_many_resolutions(vit):
    walk = Walk(vit)
    assert [len(walk.resolve(s).groups) for s in ("blocks.0", "**.bias", "type:norm")] == [8, 19, 10]
    assert walk.resolve("blocks.[1-2]").selection().names() == lw.select(vit, "blocks.[1-2]").names()


def test_a_compiled_model_is_addressed_by_its_inner_names():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    compiled = torch.compile(net)
    assert lw.select(compiled, "0").params() == [net[0].weight, net[0].bias]
    assert lw.freeze(compiled, "0").names() == ["0.weight", "0.bias"] and not net[0].weight.requires_grad
    assert [g["names"] for g in lw.param_groups(compiled)] == [["1.weight"], ["1.bias"]]
    assert [r["name"] for r in lw.show(compiled, quiet=True)] == ["0.weight", "0.bias", "1.weight", "1.bias"]


_PARTS = ["a", "b", "ab", "a_b", "1", "2", "10", "01"]
_POOL = [".".join(p) for n in (1, 2, 3) for p in itertools.product(_PARTS, repeat=n)]


def _reference(segments: list[str], key: str) -> bool:
    """Selector semantics, written the slow obvious way: some prefix of the key's segments (the
    empty one included, for all-`**` patterns) matches the pattern segment by segment."""
    parts = key.split(".")

    def one(seg: str, part: str) -> bool:
        if seg.startswith("["):
            inner = seg[1:-1]
            if not (part.isascii() and part.isdigit()):
                return False
            if "-" in inner:
                lo, hi = map(int, inner.split("-"))
                return lo <= int(part) <= hi
            return int(part) in {int(i) for i in inner.split(",")}
        return re.fullmatch(".*".join(map(re.escape, seg.split("*"))), part) is not None

    def match(i: int, j: int) -> bool:
        if i == len(segments):
            return True
        if segments[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(parts) + 1))
        return j < len(parts) and one(segments[i], parts[j]) and match(i + 1, j + 1)

    return match(0, 0)


@given(st.lists(st.sampled_from(["a", "b", "*", "a*", "*b", "**", "[1-2]", "[0,10]", "[1-10]", "1", "10"]),
                min_size=1, max_size=5))
@example(["a", "**"])
@example(["**", "a", "b"])
@example(["a", "**", "b", "**", "a"])
@example(["[0,10]", "**", "*b"])
def test_path_selectors_match_the_reference_semantics(segments):
    # 584 keys: above the size where candidates are found by bisection on the literal prefix.
    pattern = ".".join(segments)
    expected = [k for k in _POOL if _reference(segments, k)]
    assert select_keys(_POOL, pattern, missing_ok=True) == expected
    assert select_keys(_POOL[:40], pattern, missing_ok=True) == [k for k in expected if k in _POOL[:40]]


def test_missing_ok_must_be_a_bool_not_a_truthy_word(interleaved):
    with pytest.raises(lw.OptionTypeError, match="missing_ok='no': pass True or False"):
        lw.select(interleaved, "lstm9", missing_ok="no")  # it allowed the empty match it meant to refuse


@pytest.mark.parametrize("select", [3, 1.5, b"0", {"0": 1}])
def test_a_select_option_that_is_no_selector_nor_a_list_is_named(select):
    nets = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    with pytest.raises(lw.OptionTypeError, match=r"select=.*: give a selector \(a string, a module class or a callable"):
        lw.merge(None, nets, select=select)  # TypeError: 'int' object is not iterable
    with pytest.raises(lw.OptionTypeError, match="select="):
        lw.EMA(nets[0], select=select)  # its own message, as before
