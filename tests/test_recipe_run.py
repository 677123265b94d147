"""Running mergekit recipes end to end: model folders that load, values equal to merge_files, slices."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerwise as lw
from layerwise.cli import main


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def test_linear_recipe_equals_merge_files_and_loads_as_a_model(tiny_llamas, tmp_path):
    a, b = tiny_llamas["a"], tiny_llamas["b"]
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                               f"  - model: {b}\n    parameters: {{weight: 3}}\n")
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 0
    expected = lw.merge_files([a, b], tmp_path / "ref.safetensors", weights=[1, 3])
    got, ref = lw.load(out), lw.load(expected)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    ids = torch.tensor([[1, 4, 7, 2]])
    assert torch.isfinite(model(ids).logits).all()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "w1 "
    card = (out / "README.md").read_text()
    assert "method `linear`" in card and str(a) in card and "weight: 3" in card


def test_gradient_and_filter_parameters_vary_per_layer_as_mergekit(tiny_llamas, tmp_path):
    base, a = tiny_llamas["base"], tiny_llamas["a"]
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                               f"  - model: {a}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n"
                               f"    - value: 0\n")
    out = tmp_path / "slerp"
    main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"])
    got, x, y = lw.load(out), lw.load(base), lw.load(a)
    for i, t in enumerate([0, 1 / 3, 2 / 3, 1]):
        q = f"model.layers.{i}.self_attn.q_proj.weight"
        expected = lw.merge_files([a], tmp_path / f"q{i}.safetensors", "slerp", base=base, select=q, t=t)
        torch.testing.assert_close(got[q], lw.load(expected)[q])
        up = f"model.layers.{i}.mlp.up_proj.weight"
        assert torch.equal(got[up], x[up])  # t = 0: the base
    assert torch.equal(got["model.embed_tokens.weight"], x["model.embed_tokens.weight"])
    assert not torch.equal(got["model.layers.3.self_attn.q_proj.weight"], x["model.layers.3.self_attn.q_proj.weight"])
    torch.testing.assert_close(got["model.layers.3.self_attn.q_proj.weight"], y["model.layers.3.self_attn.q_proj.weight"])


def test_passthrough_slices_stack_a_deeper_model_that_loads(tiny_llamas, tmp_path):
    a, b = tiny_llamas["a"], tiny_llamas["b"]
    recipe = _recipe(tmp_path, f"merge_method: passthrough\ndtype: bfloat16\nslices:\n"
                               f"  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n"
                               f"  - sources:\n      - model: {b}\n        layer_range: [1, 4]\n")
    out = tmp_path / "franken"
    main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    got, x, y = lw.load(out), lw.load(a), lw.load(b)
    assert got["model.layers.2.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], x["model.layers.2.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], y["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(got["lm_head.weight"], y["lm_head.weight"].bfloat16())
    assert torch.equal(got["model.embed_tokens.weight"], x["model.embed_tokens.weight"].bfloat16())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6 and model.dtype == torch.bfloat16


def test_ties_with_mixed_dtypes_promotes_and_matches_merge_files(tiny_llamas, tmp_path):
    base, a, b = tiny_llamas["base"], tiny_llamas["a"], tiny_llamas["b"]
    half = tmp_path / "b16"
    half.mkdir()
    lw.save({k: v.bfloat16() for k, v in lw.load(b).items()}, half / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (half / name).write_bytes((b / name).read_bytes())
    recipe = _recipe(tmp_path, f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.5}}\n"
                               f"models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
                               f"  - model: {half}\n    parameters: {{weight: 0.3}}\n")
    out = tmp_path / "ties"
    main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"])
    ref = lw.merge_files([a, half], tmp_path / "ties.safetensors", "ties", base=base, weights=[0.7, 0.3], density=0.5)
    got, expected = lw.load(out), lw.load(ref)
    assert got["model.norm.weight"].dtype == torch.float32
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_bad_recipe_fails_before_writing_and_names_the_problem(tiny_llamas, tmp_path, capsys):
    a = tiny_llamas["a"]
    recipe = _recipe(tmp_path, f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n"
                               f"        layer_range: [2, 9]\n")
    out = tmp_path / "never"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 2
    assert "layer_range [2, 9) but" in capsys.readouterr().err and not out.exists()
    assert list(tmp_path.iterdir()) == [recipe]
    recipe = _recipe(tmp_path, f"merge_method: ties\nmodels:\n  - model: {a}\n")
    assert main(["merge", "--config", str(recipe), "-o", str(out)]) == 2
    assert "pass base=" in capsys.readouterr().err
    assert main(["merge", "--config", str(recipe), str(a), "--method", "ties", "-o", str(out)]) == 2
    assert "drop CHECKPOINT, --method" in capsys.readouterr().err and not out.exists()
    for models, where in ((f"models:\n  - model: {a}\n  - model: {a}\n    parameters: {{wieght: 0.9}}\n", "models[1]"),
                          (f"slices:\n  - sources:\n    - model: {a}\n      layer_range: [0, 4]\n"
                           f"      parameters: {{density: 0.5}}\n", "slices[0].sources[0]")):
        recipe = _recipe(tmp_path, "merge_method: linear\n" + models)  # a per-model typo fell to the default
        assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 2
        assert f"{where}.parameters: linear takes no option" in capsys.readouterr().err and not out.exists()
    base, b = tiny_llamas["base"], tiny_llamas["b"]
    recipe = _recipe(tmp_path, f"merge_method: slerp\nbase_model: {base}\nmodels: [{base}, {a}, {b}]\n"
                               "parameters: {t: 0.5}\n")  # three models: the base was silently left out
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 2
    assert "slerp interpolates the base_model" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", ["merged.safetensors", "merged.pt"])
def test_a_recipe_output_named_like_a_weight_file_is_refused(tiny_llamas, tmp_path, capsys, name):
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_llamas['a']}\n")
    assert main(["merge", "--config", str(recipe), "-o", str(tmp_path / name), "--quiet"]) == 2
    assert (f"this merge writes a model folder, and '{name}' would be a folder named like a .{name.split('.')[1]} "
            f"file; write a folder name such as {tmp_path / 'merged'}") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [recipe]


def test_merge_files_into_a_folder_writes_a_model_with_config_tokenizer_and_card(tiny_llamas, tmp_path):
    base, a, b = tiny_llamas["base"], tiny_llamas["a"], tiny_llamas["b"]
    out = tmp_path / "merged"
    (base / "training_args.bin").write_bytes(b"")  # not part of a model: not copied
    assert main(["merge", str(a), str(b), "--method", "ties", "--base", str(base), "--density", "0.5",
                 "--dtype", "bf16", "-o", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"README.md", "model.safetensors", "tokenizer.json", "config.json",
                                                "generation_config.json", "tokenizer_config.json", "chat_template.jinja"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ref = lw.merge_files([a, b], tmp_path / "ref.safetensors", "ties", base=base, density=0.5, dtype="bf16")
    got, expected = lw.load(out), lw.load(ref)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    card = (out / "README.md").read_text()
    assert "method `ties`" in card and str(base) in card and '"density": 0.5' in card
    # above --max-shard-size: shards and an index, still a model
    sharded = tmp_path / "sharded"
    lw.merge_files([a, b], sharded, max_shard_size="20kB", copy_from=b)
    assert (sharded / "model.safetensors.index.json").exists() and not (sharded / "model.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(sharded).config.num_hidden_layers == 4


def _tiny_berts(root):
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(27)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        folders.append(root / f"bert{seed}")
        BertForMaskedLM(config).save_pretrained(folders[-1])
        tokenizer.save_pretrained(folders[-1])
    return folders


def test_a_bert_recipe_with_slices_gives_a_deeper_bert_that_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoModelForMaskedLM

    a, b = _tiny_berts(tmp_path)
    recipe = _recipe(tmp_path, f"merge_method: linear\nslices:\n"
                               f"  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
                               f"      - model: {b}\n        layer_range: [0, 2]\n"
                               f"  - sources:\n      - model: {a}\n        layer_range: [1, 3]\n"
                               f"      - model: {b}\n        layer_range: [1, 3]\n")
    out = tmp_path / "deeper"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 0
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.bert.encoder.layer) == 4
    x, y, got = lw.load(a), lw.load(b), lw.load(out)
    key = "bert.encoder.layer.{}.attention.self.query.weight"
    torch.testing.assert_close(got[key.format(2)], (x[key.format(1)] + y[key.format(1)]) / 2)
    torch.testing.assert_close(got["bert.embeddings.word_embeddings.weight"],
                               (x["bert.embeddings.word_embeddings.weight"] + y["bert.embeddings.word_embeddings.weight"]) / 2)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w0 w1")["input_ids"] == [2, 5, 6, 3]
    assert model(**tok("w0 w1", return_tensors="pt")).logits.shape == (1, 4, 32)


def test_tokenizer_source_cuts_padded_embeddings_to_the_vocabulary(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()  # 32 tokens; the models pad their embeddings to 40 rows
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    for seed, name in enumerate(("base", "a")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    recipe = _recipe(tmp_path, f"merge_method: ties\nbase_model: {tmp_path / 'base'}\ntokenizer_source: base\n"
                               f"parameters: {{density: 0.5}}\nmodels:\n  - model: {tmp_path / 'a'}\n")
    out = tmp_path / "out"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 0
    got = lw.load(out)
    assert got["model.embed_tokens.weight"].shape == (32, 16) and got["lm_head.weight"].shape == (32, 16)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 32
    expected = lw.merge({k: v[:32] if v.shape[0] == 40 else v for k, v in lw.load(tmp_path / "base").items()},
                        [{k: v[:32] if v.shape[0] == 40 else v for k, v in lw.load(tmp_path / "a").items()}],
                        "ties", density=0.5)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 32


def _llama_with_tokens(folder, rows: int, added: list[str], seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import _tiny_tokenizer

    tokenizer = _tiny_tokenizer()  # 32 tokens, then ``added`` from id 32 on
    tokenizer.add_tokens(added)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_tokenizer_source_remaps_embedding_rows_by_token_as_mergekit(tmp_path):
    # a: 32 tokens; d: x1, x0 at 32, 33; c (the tokenizer source): x0..x3 at 32..35.
    for name, rows, added, seed in (("a", 32, [], 0), ("d", 34, ["x1", "x0"], 1), ("c", 36, ["x0", "x1", "x2", "x3"], 2)):
        _llama_with_tokens(tmp_path / name, rows, added, seed)
    recipe = _recipe(tmp_path, f"merge_method: linear\ntokenizer_source: {tmp_path / 'c'}\nmodels:\n"
                               f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
                               f"  - model: {tmp_path / 'd'}\n    parameters: {{weight: 2}}\n"
                               f"  - model: {tmp_path / 'c'}\n    parameters: {{weight: 4}}\n")
    out = tmp_path / "out"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 0
    got = lw.load(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        a, d, c = (lw.load(tmp_path / n)[key] for n in "adc")
        # mergekit: a token a model lacks takes the one holder's row, else the mean of the holders' rows
        x0, x1 = (d[33] + c[32]) / 2, (d[32] + c[33]) / 2
        expected = torch.cat([(a + 2 * d[:32] + 4 * c[:32]) / 7, ((x0 + 2 * d[33] + 4 * c[32]) / 7)[None],
                              ((x1 + 2 * d[32] + 4 * c[33]) / 7)[None], c[34:]])
        torch.testing.assert_close(got[key], expected)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 36
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 36


@pytest.mark.parametrize("copy_from, output, error, message", [
    ("missing-folder", "out", lw.CheckpointNotFoundError, "copy_from: .*missing-folder: no such folder"),
    ("empty", "out", lw.OptionError, "copy_from: .*empty is not a model folder"),
    (3, "out", lw.OptionTypeError, "copy_from must be a path"),
    ("model", "out.safetensors", lw.OptionError, "copy_from: .*out.safetensors is a single .safetensors file"),
])
def test_a_bad_copy_from_is_named_and_nothing_is_written(tiny_llamas, tmp_path, copy_from, output, error, message):
    (tmp_path / "empty").mkdir()
    source = {"missing-folder": tmp_path / "missing-folder", "empty": tmp_path / "empty",
              "model": tiny_llamas["b"]}.get(copy_from, copy_from)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=message):
        lw.merge_files([tiny_llamas["a"], tiny_llamas["b"]], tmp_path / output, copy_from=source)
    recipe = _recipe(tmp_path, f"merge_method: linear\nmodels:\n  - model: {tiny_llamas['a']}\n")
    if output == "out":
        from layerwise._recipe_run import run_recipe

        with pytest.raises(error, match=message):
            run_recipe(recipe, tmp_path / output, copy_from=source)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "recipe.yml") == before


@pytest.mark.parametrize("template", ["chatml", "auto", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"])
def test_chat_template_is_set_as_mergekit_sets_it_and_the_recipe_kept_as_mergekit_config(tiny_llamas, tmp_path, template):
    import shutil

    base, a, b = (shutil.copytree(tiny_llamas[n], tmp_path / n) for n in ("base", "a", "b"))
    (b / "chat_template.jinja").write_text("{{ 'b' }}  \n")  # auto: the template most inputs have wins
    text = (f"merge_method: task_arithmetic\nbase_model: {base}\nchat_template: \"{template}\"\n"
            f"models:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(_recipe(tmp_path, text)), "-o", str(out), "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    # mergekit: its chatml.jinja; auto: the plurality of the inputs' templates (stripped); else the text itself
    assert chat == {"chatml": "<|im_start|>user\nw1<|im_end|>\n", "auto": "w1 "}.get(template, "<user>w1")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "mergekit_config.yml").read_text() == text


def test_tokenizer_block_pads_rows_to_a_multiple_with_each_models_mean_row(tmp_path):
    for name, rows, added, seed in (("a", 32, [], 0), ("c", 36, ["x0", "x1", "x2", "x3"], 2)):
        _llama_with_tokens(tmp_path / name, rows, added, seed)
    recipe = _recipe(tmp_path, f"merge_method: linear\ntokenizer:\n  source: {tmp_path / 'a'}\n  pad_to_multiple_of: 24\n"
                               f"models:\n  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
                               f"  - model: {tmp_path / 'c'}\n    parameters: {{weight: 3}}\n")
    out = tmp_path / "out"
    assert main(["merge", "--config", str(recipe), "-o", str(out), "--quiet"]) == 0
    got = lw.load(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        a, c = lw.load(tmp_path / "a")[key], lw.load(tmp_path / "c")[key][:32]  # a's 32 tokens, 48 rows
        a, c = (torch.cat([t, t.mean(0).expand(16, -1)]) for t in (a, c))
        torch.testing.assert_close(got[key], (a + 3 * c) / 4)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 48


def test_tokenizer_source_merges_models_padded_to_different_row_counts(tmp_path):
    _llama_with_tokens(tmp_path / "a", 40, [], 0)  # 32 tokens, padded to 40 rows
    _llama_with_tokens(tmp_path / "b", 32, [], 1)
    recipe = _recipe(tmp_path, f"merge_method: linear\ntokenizer_source: {tmp_path / 'b'}\nmodels:\n"
                               f"  - model: {tmp_path / 'a'}\n    parameters: {{weight: 1}}\n"
                               f"  - model: {tmp_path / 'b'}\n    parameters: {{weight: 1}}\n")
    assert main(["merge", "--config", str(recipe), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    got, a, b = lw.load(tmp_path / "out"), lw.load(tmp_path / "a"), lw.load(tmp_path / "b")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[key], (a[key][:32] + b[key]) / 2)
