"""Model folders: the config, generation config, tokenizer and card that make merged weights a model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import layerwise as lw
from layerwise._files import open_checkpoint
from layerwise._model_folder import layout_digest, model_card, source_folder, write_model_files


def test_weights_plus_model_files_load_with_from_pretrained_and_keep_the_tokenizer(tiny_llamas, tmp_path):
    src = tiny_llamas["a"]
    (src / "training_args.bin").write_bytes(b"not copied")
    out = tmp_path / "out"
    out.mkdir()
    lw.save(lw.load(src), out / "model.safetensors")
    written = write_model_files(out, src, tiny_llamas["b"], dtype="float32")
    assert "config.json" in written and "tokenizer.json" in written and "generation_config.json" in written
    assert not (out / "training_args.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"] == [4, 5]
    assert tok.apply_chat_template([{"role": "user", "content": "w3"}], tokenize=False) == "w3 "


def test_stacked_layers_update_the_layer_count_and_dtype(tiny_llamas, tmp_path):
    config = json.loads((tiny_llamas["a"] / "config.json").read_text())
    write_model_files(tmp_path, tiny_llamas["a"], None, dtype="bfloat16", layer_map=[0, 1, 2, 3, 2, 3])
    out = json.loads((tmp_path / "config.json").read_text())
    assert out["num_hidden_layers"] == 6 and config["num_hidden_layers"] == 4
    dtype_keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    assert all(out[k] == "bfloat16" for k in dtype_keys)
    assert {k: v for k, v in out.items() if k not in ("num_hidden_layers", *dtype_keys)} == {
        k: v for k, v in config.items() if k not in ("num_hidden_layers", *dtype_keys)}


def test_source_folder_and_layout_digest(tiny_llamas, tmp_path):
    src = tiny_llamas["a"]
    assert source_folder(src) == src and source_folder(src / "model.safetensors") == src
    assert source_folder(tmp_path) is None
    sd = lw.load(src)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with open_checkpoint(src) as st, open_checkpoint(tmp_path / "pytorch_model.bin") as pt:
        digest = layout_digest(st.specs)
        assert len(digest) == 16 and layout_digest(pt.specs) == digest  # a .bin copy is the same model
    sd["extra"] = torch.zeros(1)
    lw.save(sd, tmp_path / "x.safetensors")
    sd["extra"] = torch.zeros(1, dtype=torch.bfloat16)
    lw.save(sd, tmp_path / "y.safetensors")
    with open_checkpoint(tmp_path / "x.safetensors") as x, open_checkpoint(tmp_path / "y.safetensors") as y:
        assert len({digest, layout_digest(x.specs), layout_digest(y.specs)}) == 3


def test_model_card_records_method_inputs_options_and_recipe():
    card = model_card(method="ties", inputs=[("a", "0123"), ("b", "4567")], options={"density": 0.5},
                      version="0.2.0", recipe_text="merge_method: ties\n")
    assert "method `ties`" in card and "| `a` | `0123` |" in card and '"density": 0.5' in card
    assert "merge_method: ties" in card and card.startswith("---\n")


@pytest.mark.parametrize("config", [b"{not json", b"[" * 100_000, b"\xff\xfe"])
def test_a_source_config_that_cannot_be_read_fails_before_any_weight_is_written(tmp_path, monkeypatch, config):
    src = tmp_path / "src"
    src.mkdir()
    lw.save({"w": torch.ones(2)}, src / "model.safetensors")
    (src / "config.json").write_bytes(config)
    monkeypatch.setattr("layerwise.checkpoint.write", lambda *a, **k: pytest.fail("writing started"))
    with pytest.raises(lw.CheckpointError, match="config.json: not a JSON config"):
        lw.merge_files([src, src], tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
