"""mergekit recipes: parsing and refusals, value evaluation, the layer plan of models and slices."""

from pathlib import Path

import pytest

import layerwise as lw
from layerwise.recipes import layer_plan, parse_recipe, read_recipe, stack_of


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b", "base"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_models_form_with_per_model_and_global_parameters(models):
    r = parse_recipe({"merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
                      "parameters": {"normalize": True, "density": 0.5},
                      "models": [{"model": "a", "parameters": {"weight": [0, 1]}}, {"model": "b"}]})
    assert r.method == "ties" and not r.stacked and r.base_model == Path("base") and r.dtype == "bfloat16"
    assert [s.model for s in r.slices[0].sources] == [Path("a"), Path("b")]
    assert r.slices[0].sources[0].parameters == {"weight": [0, 1]}
    assert r.models() == [Path("base"), Path("a"), Path("b")]


@pytest.mark.parametrize("recipe, message", [
    ({"merge_method": "linear", "models": [{"model": "a"}], "modules": {}}, "'modules' is not supported"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {}}, r"tokenizer.source: 'union'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "a", "tokens": {}}},
     "tokenizer.tokens"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "a", "pad_to_multiple_of": 0}},
     "pad_to_multiple_of: a whole number"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "a"}, "tokenizer_source": "a"},
     "without tokenizer_source"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "llama3"}, "'llama3' is neither"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": 3}, "chat_template: 'auto', 'chatml'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"}, "'union'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "paramters": {}}, "did you mean 'parameters'"),
    ({"merge_method": "linear", "models": [{"model": "a", "weight": 1}]}, r"models\[0\]: unknown key 'weight'"),
    ({"merge_method": "linear", "models": [{"model": "meta-llama/Llama-3-8B"}]}, "hub model ids are not downloaded"),
    ({"merge_method": "linear", "models": [{"model": "a+lora"}]}, "LoRA adapter"),
    ({"merge_method": "linear", "models": [{"model": "./missing"}]}, "'./missing' does not exist"),
    ({"models": [{"model": "a"}]}, "'merge_method' is missing"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of 'models' or 'slices'"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 1]}]}]},
     "layer_range is"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                        {"model": "b", "layer_range": [0, 3]}]}]}, "same number"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"x": 1}}}]}, "weight"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "base"}, "needs a base_model"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {5: 1}}]},
     r"models\[0\].parameters: an option name is a string such as 'weight', not 5"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"weight": [{"value": [{"value": 1}]}]}},
     r"parameters.weight\[0\].value: a rule's value is a number or a list of numbers"),
])
def test_unsupported_or_malformed_recipes_are_refused_by_name(models, recipe, message):
    with pytest.raises(lw.OptionError, match=message):
        parse_recipe(recipe)


@pytest.mark.parametrize("text", ["weight: &x [{value: *x}]", "weight: &x {value: *x}", "weight: &x [[*x]]"])
def test_a_recursive_yaml_alias_is_refused_by_name(models, text):
    path = models / "r.yml"
    path.write_text(f"merge_method: linear\nmodels: [a, b]\nparameters:\n  {text}\n")
    with pytest.raises(lw.OptionError, match="parameters.weight"):  # not a RecursionError
        read_recipe(path)


def test_a_recipe_file_that_cannot_be_read_is_named(models):
    with pytest.raises(lw.CheckpointNotFoundError, match="missing.yml: no such recipe file"):
        read_recipe(models / "missing.yml")
    with pytest.raises(lw.OptionError, match="a: cannot read the recipe"):
        read_recipe(models / "a")
    (models / "binary.yml").write_bytes(b"merge_method: linear\n\xff\xfe")
    with pytest.raises(lw.OptionError, match="binary.yml: not a YAML recipe .not UTF-8 text: byte 21"):
        read_recipe(models / "binary.yml")


def test_read_recipe_parses_yaml_and_names_a_syntax_error(models):
    good = models / "r.yml"
    good.write_text("merge_method: slerp\nbase_model: base\nmodels:\n  - model: a\n  - model: base\n"
                    "parameters:\n  t: [0, 0.5, 1]\n")
    r = read_recipe(good)
    assert r.parameters == {"t": [0, 0.5, 1]} and "slerp" in r.text
    bad = models / "bad.yml"
    bad.write_text("merge_method: [linear\n")
    with pytest.raises(lw.OptionError, match="bad.yml: not a YAML recipe"):
        read_recipe(bad)


def test_numbers_yaml_leaves_as_text_and_a_single_rule_read_as_mergekit_reads_them(models):
    # PyYAML reads 1e-3 (no dot) as text; mergekit's validation makes it a number. One {filter, value}
    # rule alone is a ConditionalParameter, a list of one rule to mergekit (it was taken for a selector map).
    (models / "r.yml").write_text("merge_method: ties\nbase_model: base\nparameters: {density: 5e-1, lambda: '2'}\n"
                                  "models:\n  - model: a\n    parameters:\n      weight: {filter: attn, value: [1e-1, 9E-1]}\n"
                                  "  - model: b\n    parameters: {weight: {value: 3e0}}\n")
    r = read_recipe(models / "r.yml")
    assert r.parameters == {"density": 0.5, "lambda": 2}
    a, b = (s.parameters["weight"] for s in r.slices[0].sources)
    assert a == [{"filter": "attn", "value": [0.1, 0.9]}] and b == [{"value": 3.0}]
    from layerwise._merge_options import UNSET, value_at
    from layerwise._recipe_run import _layered

    assert value_at(_layered(a, 0.25), "model.layers.0.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert value_at(_layered(a, 0.25), "model.layers.0.mlp.up_proj.weight", 0.5) == 0.25  # the rule misses
    assert value_at(_layered(a), "model.norm.weight", 0.0) is UNSET


@pytest.mark.parametrize("levels, name, expected", [
    (([{"filter": "attn", "value": 0.1}], 0.5), "layers.0.mlp.w", 0.5),  # a model's rule misses: the global value
    (([{"filter": "attn", "value": 0.1}], 0.5), "layers.0.attn.w", 0.1),
    (([0.0, 1.0], 0.5), "layers.0.attn.w", [0.0, 1.0]),  # a gradient always answers
    ((None, [{"filter": "mlp", "value": 2}], 3), "x.mlp", 2),
    ((None, [{"filter": "mlp", "value": 2}], 3), "x.attn", 3),
])
def test_parameters_fall_through_levels_as_mergekit(levels, name, expected):
    from layerwise._merge_options import UNSET, value_at
    from layerwise._recipe_run import _layered

    got = value_at(_layered(*levels), name, 0.0)
    assert got is not UNSET and got == expected if not isinstance(expected, list) else got == expected[0]


LLAMA_KEYS = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{p}" for i in range(4) for p in ("mlp.up_proj.weight", "self_attn.q_proj.weight")]


def test_stack_of_finds_the_layer_stack():
    assert stack_of(LLAMA_KEYS) == ("model.layers", 4)
    assert stack_of(["bert.encoder.layer.0.attention.w", "bert.encoder.layer.1.attention.w",
                     "bert.embeddings.word_embeddings.weight"]) == ("bert.encoder.layer", 2)
    assert stack_of(["a.weight"]) is None


def test_models_form_keeps_keys_and_spreads_t_over_the_layers(models):
    r = parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]})
    plan = {o.key: o for o in layer_plan(r, {Path("a"): LLAMA_KEYS, Path("b"): LLAMA_KEYS})}
    assert set(plan) == set(LLAMA_KEYS)
    assert plan["model.layers.0.mlp.up_proj.weight"].t == 0
    assert plan["model.layers.2.mlp.up_proj.weight"].t == pytest.approx(2 / 3)
    assert plan["model.layers.3.mlp.up_proj.weight"].t == 1
    assert plan["lm_head.weight"].t == 0 and plan["model.embed_tokens.weight"].source_keys == (
        "model.embed_tokens.weight",) * 2


def test_slices_stack_layers_renumbered_with_ends_from_the_first_and_last_slice(models):
    r = parse_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [2, 4]}]}]})
    plan = layer_plan(r, {Path("a"): LLAMA_KEYS, Path("b"): LLAMA_KEYS})
    by_key = {o.key: o for o in plan}
    assert len(plan) == 3 + 5 * 2
    assert by_key["model.layers.3.mlp.up_proj.weight"].source_keys == ("model.layers.2.mlp.up_proj.weight",)
    assert by_key["model.layers.3.mlp.up_proj.weight"].slice == 1
    assert by_key["model.layers.4.self_attn.q_proj.weight"].source_keys == ("model.layers.3.self_attn.q_proj.weight",)
    assert by_key["model.layers.1.mlp.up_proj.weight"].t == 0.5
    assert by_key["model.embed_tokens.weight"].slice == 0 and by_key["lm_head.weight"].slice == 1
    assert by_key["model.norm.weight"].slice == 1


def test_a_layer_range_beyond_the_model_is_refused(models):
    r = parse_recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 6]}]}]})
    with pytest.raises(lw.OptionError, match=r"slices\[0\].sources\[0\]: layer_range \[2, 6\) but a has 4 layers"):
        layer_plan(r, {Path("a"): LLAMA_KEYS})
