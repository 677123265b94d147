import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
import layerwise.checkpoint as checkpoint
from layerwise._files import open_checkpoint

from conftest import TiedLM


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model[1].num_batches_tracked.fill_(seed + 1)
    return model


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under folder with its content hash: a test sees anything added, removed or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def three(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        lw.save(net(i), paths[-1])
    return paths


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("shard", [None, 8])
def test_lazy_conjugate_and_negative_views_and_strided_single_elements_save_their_values(tmp_path, shard):
    z = torch.tensor([1 + 2j, 3 - 1j])
    state = {"conj": z.conj(), "neg": torch._neg_view(torch.ones(2)), "imag": torch.tensor([[1 + 1j]]).imag,
             "conj_imag": torch.tensor([1 + 1j]).conj().imag}
    got = lw.load(lw.save(state, tmp_path / ("m.safetensors" if shard is None else "m"), max_shard_size=shard))
    assert all(torch.equal(got[k], v.resolve_conj().resolve_neg()) for k, v in state.items())


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m.bin"])
def test_round_trip_of_every_dtype(tmp_path, name):
    state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
             "f64": torch.randn(2).double(), "i64": torch.arange(4), "bool": torch.tensor([True, False]),
             "u8": torch.arange(3, dtype=torch.uint8), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    lw.save(state, tmp_path / name)
    assert same(lw.load(tmp_path / name), state)


def test_safetensors_files_interoperate_with_the_safetensors_library(tmp_path):
    state = {"a": torch.randn(3, 3), "b": torch.arange(5).int(), "c": torch.randn(7).bfloat16()}
    lw.save(state, tmp_path / "ours.safetensors")
    assert same(safetensors.torch.load_file(tmp_path / "ours.safetensors"), state)
    safetensors.torch.save_file(state, tmp_path / "theirs.safetensors")
    assert same(lw.load(tmp_path / "theirs.safetensors"), state)


@pytest.mark.parametrize("name, shard", [("tied.safetensors", None), ("tied.pt", None), ("tied_folder", 200)])
def test_tied_tensors_are_stored_once_and_restored_shared(tmp_path, name, shard):
    model = TiedLM()
    lw.save(model, tmp_path / name, max_shard_size=shard)
    state = lw.load(tmp_path / name)
    assert state["decoder.weight"] is state["embed.weight"]
    fresh = TiedLM()
    lw.load(tmp_path / name, into=fresh)
    assert fresh.decoder.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)
    if name.endswith(".safetensors"):
        stored = safetensors.torch.load_file(tmp_path / name)
        assert "decoder.weight" not in stored and "embed.weight" in stored


def test_sharded_folder_in_hugging_face_layout(tmp_path):
    model = net(0)
    lw.save(model, tmp_path / "hf", max_shard_size="100B")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert same(lw.load(tmp_path / "hf"), model.state_dict())
    assert same(lw.load(tmp_path / "hf" / "model.safetensors.index.json"), model.state_dict())


def test_pytorch_model_bin_index_folder_is_read(tmp_path):
    state = net(0).state_dict()
    keys = list(state)
    (tmp_path / "hf").mkdir()
    torch.save({k: state[k] for k in keys[:4]}, tmp_path / "hf" / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[4:]}, tmp_path / "hf" / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 4 else 2}-of-00002.bin" for i, k in enumerate(keys)}
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert same(lw.load(tmp_path / "hf"), state)


def test_a_distributed_checkpoint_folder_is_named_with_the_conversion_that_loads_it(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = net(0).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized": one process, as meant
        dcp.save(state, checkpoint_id=tmp_path / "dcp")
    with pytest.raises(lw.CheckpointError, match=r"torch.distributed.checkpoint folder.*dcp_to_torch_save"):
        lw.load(tmp_path / "dcp")
    dcp_to_torch_save(tmp_path / "dcp", tmp_path / "model.pt")  # the fix the message gives
    assert same(lw.load(tmp_path / "model.pt"), state)


def test_nested_checkpoints_and_key(tmp_path):
    state = net(0).state_dict()
    torch.save({"state_dict": state, "epoch": 3, "optimizer_states": [{"lr": 0.1}], "hyper_parameters": {"lr": 0.1}},
               tmp_path / "lightning.ckpt")
    assert same(lw.load(tmp_path / "lightning.ckpt"), state)
    torch.save({"model": state, "ema": state, "step": 7}, tmp_path / "two.pt")
    with pytest.raises(lw.CheckpointError) as e:
        lw.load(tmp_path / "two.pt")
    assert "two.pt" in str(e.value) and "model (dict of 9 tensors)" in str(e.value) and "step (int)" in str(e.value)
    assert same(lw.load(tmp_path / "two.pt", key="ema"), state)
    with pytest.raises(lw.CheckpointError, match="no key 'nope'; top-level keys: model"):
        lw.load(tmp_path / "two.pt", key="nope")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickle_with_code_is_refused_and_explained(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(lw.CheckpointError) as e:
        lw.load(tmp_path / "evil.pt")
    message = str(e.value)
    assert "evil.pt" in message and "never runs code" in message and "weights_only=False" in message


# --------------------------------------------------------------------------- merge_files


@pytest.mark.parametrize("method, options", [
    ("linear", {}), ("linear", {"weights": [1, 2]}), ("task_arithmetic", {"scale": 0.7}),
    ("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 1}), ("slerp", {"t": {"0": 0.2, "2": 0.9}}),
])
def test_merge_files_equals_the_in_memory_merge(tmp_path, three, method, options):
    base, a, b = three
    needs_base = method in ("task_arithmetic", "ties", "dare")
    out = lw.merge_files([a, b], tmp_path / "out.safetensors", method, base=base if needs_base else None, **options)
    weights = options.pop("weights", None)
    expected = lw.merge(lw.load(base) if needs_base else None, [lw.load(a), lw.load(b)], method, weights=weights, **options)
    assert same(lw.load(out), expected)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_sliced_streaming_equals_whole_tensors(tmp_path, three, monkeypatch, method):
    monkeypatch.setattr(checkpoint, "_SLICE", 7)  # every tensor in several slices, the last one short
    base, a, b = three
    options = {"weights": [0.3, 0.9], "select": "!2.bias", "dtype": "bf16"}
    out = lw.merge_files([a, b], tmp_path / "out.safetensors", method, base=base, **options)
    expected = lw.merge(lw.load(base), [lw.load(a), lw.load(b)], method, weights=[0.3, 0.9], select="!2.bias")
    got = lw.load(out)
    for k, t in expected.items():
        assert torch.equal(got[k], t.bfloat16() if t.is_floating_point() else t), k


@pytest.mark.parametrize("method, options", [("linear", {"weights": [0.3, 0.9]}), ("task_arithmetic", {"scale": 0.7}),
                                             ("nearswap", {"t": 0.01}), ("passthrough", {"scale": 2.0})])
@pytest.mark.parametrize("dtype", [None, "fp32", "bf16"])
def test_sliced_streaming_of_mixed_dtypes_equals_the_in_memory_merge(tmp_path, monkeypatch, method, options, dtype):
    # each slice goes through reused buffers: converted inputs, the merged slice, the output dtype
    monkeypatch.setattr(checkpoint, "_SLICE", 5)
    torch.manual_seed(0)
    states = [{"w": torch.randn(4, 6).to(d), "b": torch.randn(13).to(d), "n": torch.tensor([i])}
              for i, d in enumerate([torch.bfloat16, torch.float16, torch.float32])]
    paths = [lw.save(s, tmp_path / f"{i}.safetensors") for i, s in enumerate(states)]
    models = paths[1:2] if method in ("nearswap", "passthrough") else paths[1:]
    out = lw.merge_files(models, tmp_path / "out.safetensors", method, base=paths[0], dtype=dtype, **options)
    weights = options.pop("weights", None)
    expected = lw.merge(states[0], [states[int(p.stem)] for p in models], method, weights=weights, dtype=dtype,
                        **options)
    assert same(lw.load(out), expected)


def test_merge_files_select_and_dtype(tmp_path, three):
    base, a, b = three
    out = lw.merge_files([a, b], tmp_path / "out.safetensors", base=base, select="2", dtype="bf16")
    got, expected = lw.load(out), lw.merge(lw.load(base), [lw.load(a), lw.load(b)], select="2")
    assert got["2.weight"].dtype == torch.bfloat16 and torch.equal(got["2.weight"], expected["2.weight"].bfloat16())
    assert torch.equal(got["0.weight"], lw.load(base)["0.weight"].bfloat16())  # unselected: from the base
    assert got["1.num_batches_tracked"].dtype == torch.int64


def test_merge_files_keeps_ties_and_shards(tmp_path):
    for i in range(2):
        torch.manual_seed(i)
        lw.save(TiedLM(), tmp_path / f"lm{i}.safetensors")
    out = lw.merge_files([tmp_path / "lm0.safetensors", tmp_path / "lm1.safetensors"], tmp_path / "avg", max_shard_size=300)
    state = lw.load(out)
    assert state["decoder.weight"] is state["embed.weight"]
    assert same(state, lw.average([lw.load(tmp_path / "lm0.safetensors"), lw.load(tmp_path / "lm1.safetensors")]))


def test_merge_files_overwrite(tmp_path, three):
    out = tmp_path / "out.safetensors"
    lw.merge_files(three[:2], out)
    with pytest.raises(lw.CheckpointError, match="already exists; pass overwrite=True"):
        lw.merge_files(three[1:], out)
    lw.merge_files(three[1:], out, overwrite=True)
    assert same(lw.load(out), lw.average([lw.load(p) for p in three[1:]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors", "out.safetensors"]


def test_merge_files_progress_is_a_bool_not_a_truthy_word(tmp_path, three, capfd):
    with pytest.raises(lw.OptionTypeError, match="merge_files: progress='no': pass True or False"):
        lw.merge_files(three[:2], tmp_path / "out.safetensors", progress="no")
    assert not (tmp_path / "out.safetensors").exists() and capfd.readouterr().err == ""


@pytest.mark.parametrize("call, error, message", [
    (lambda t, three: lw.merge_files(str(three[0]), t / "o.safetensors"), lw.OptionTypeError,
     "inputs must be a list of paths, not the one path '.*m0.safetensors': put it in a list"),  # was read letter by letter
    (lambda t, three: lw.merge_files([three[0], 3], t / "o.safetensors"), lw.OptionTypeError,
     r"inputs\[1\] must be a path \(a str or os.PathLike\), not int 3"),
    (lambda t, three: lw.merge_files(three[:2], t / "o.safetensors", "task_arithmetic", base=b"m2"),
     lw.OptionTypeError, "base must be a path"),
    (lambda t, three: lw.merge_files(three[:2], None), lw.OptionTypeError, "output must be a path"),
    (lambda t, three: lw.save({"w": torch.ones(1)}, ""), lw.OptionError, "save: path is an empty path"),
    (lambda t, three: lw.load(None), lw.OptionTypeError, "the checkpoint must be a path"),
    (lambda t, three: lw.diff_files(three[0], ""), lw.OptionError, "the checkpoint is an empty path"),
    (lambda t, three: lw.load(three[0], into=lw.load(three[0])), lw.OptionTypeError,
     r"load\(into=...\) takes an nn.Module, got dict: a state dict holds values only"),
    (lambda t, three: lw.save({"w": torch.ones(1)}, t / "o.safetensors", metadata="step 3"), lw.OptionTypeError,
     "save: metadata='step 3' must map strings to strings"),
])
def test_paths_of_the_wrong_type_or_empty_are_named(tmp_path, three, monkeypatch, call, error, message):
    monkeypatch.chdir(tmp_path)  # an empty path must not become this folder
    with pytest.raises(error, match=message):
        call(tmp_path, three)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


MEMORY_CHILD = textwrap.dedent("""
    import resource, sys, torch, layerwise as lw
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lw.merge_files(sys.argv[1:-1], sys.argv[-1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
""")


def test_merge_files_memory_is_bounded_by_a_few_tensors(tmp_path):
    tensor_bytes = 8 * 1024 * 1024
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"big{i}.safetensors")
        lw.save({f"t{k}": torch.full((tensor_bytes // 4,), float(i)) for k in range(12)}, paths[-1])
    total = 4 * 12 * tensor_bytes
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *map(str, paths), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, check=True)
    growth = int(run.stdout.strip())
    # A few tensors' worth (the accumulator, one input, allocator slack), not the 384 MB of inputs.
    assert growth < total / 4, f"peak RSS grew {growth / 2**20:.0f} MB; the inputs are {total / 2**20:.0f} MB"
    assert torch.equal(lw.load(tmp_path / "out.safetensors")["t11"], torch.full((tensor_bytes // 4,), 1.5))


# --------------------------------------------------------------------------- diff


def test_diff_values_against_hand_computation(tmp_path):
    a = {"w": torch.tensor([3.0, 4.0]), "same": torch.ones(3), "only_a": torch.zeros(1), "shape": torch.zeros(2)}
    b = {"w": torch.tensor([0.0, 5.0]), "same": torch.ones(3), "only_b": torch.zeros(1), "shape": torch.zeros(3)}
    lw.save(a, tmp_path / "a.safetensors")
    lw.save(b, tmp_path / "b.safetensors")
    d = lw.diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    w = d.to_dict()["w"]
    assert w["max_abs"] == 3.0
    assert w["rel_l2"] == pytest.approx((9 + 1) ** 0.5 / 5)
    assert w["cosine"] == pytest.approx(20 / 25)
    assert d.to_dict()["same"] == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    assert d.only_a == ["only_a"] and d.only_b == ["only_b"] and d.mismatched[0].startswith("shape:")
    assert list(lw.diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "w").to_dict()) == ["w"]


def test_diff_measures_complex_tensors_and_reports_nan_files_as_identical_to_themselves(tmp_path):
    a = {"c": torch.tensor([1j, 2.0]), "n": torch.tensor([math.nan, 1.0]), "m": torch.tensor([math.nan, 1.0])}
    b = {"c": torch.tensor([2j, 2.0]), "n": torch.tensor([math.nan, 1.0]), "m": torch.tensor([math.nan, 2.0])}
    lw.save(a, tmp_path / "a.safetensors")
    lw.save(b, tmp_path / "b.safetensors")
    d = lw.diff_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors").to_dict()
    # The imaginary parts count: they were dropped (with a warning), so 1j against 2j looked equal.
    assert d["c"]["max_abs"] == 1.0 and d["c"]["rel_l2"] == pytest.approx(1 / 5 ** 0.5)
    assert d["c"]["cosine"] == pytest.approx(6 / 40 ** 0.5)
    assert d["n"] == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}  # the same bits, NaN included
    assert all(math.isnan(v) for v in d["m"].values())  # no distance where a NaN meets a number
    assert lw.diff_files(tmp_path / "a.safetensors", tmp_path / "a.safetensors").identical


# --------------------------------------------------------------------------- bad input: nothing written, nothing touched


def assert_refused(folder: Path, call, *fragments: str) -> None:
    before = fingerprint(folder)
    with pytest.raises(lw.LayerwiseError) as e:
        call()
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert fingerprint(folder) == before, "a refused merge must not write or change any file"


def test_truncated_and_corrupt_safetensors_are_refused(tmp_path, three):
    data = three[1].read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    assert_refused(tmp_path, lambda: lw.merge_files([three[0], tmp_path / "trunc.safetensors"], tmp_path / "o.safetensors"),
                   "trunc.safetensors", "truncated", "2.bias")
    header_len = int.from_bytes(data[:8], "little")
    (tmp_path / "corrupt.safetensors").write_bytes(data[:8] + b"{" + b"x" * (header_len - 1) + data[8 + header_len:])
    assert_refused(tmp_path, lambda: lw.merge_files([three[0], tmp_path / "corrupt.safetensors"], tmp_path / "o.safetensors"),
                   "corrupt.safetensors", "corrupt safetensors header")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    assert_refused(tmp_path, lambda: lw.load(tmp_path / "tiny.safetensors"), "tiny.safetensors", "too short")


def test_pickled_code_input_is_refused(tmp_path, three):
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pt")
    assert_refused(tmp_path, lambda: lw.merge_files([three[0], tmp_path / "evil.pt"], tmp_path / "o.safetensors"),
                   "evil.pt", "refused to unpickle")


def test_differing_inputs_list_every_difference(tmp_path, three):
    state = lw.load(three[1])
    state.pop("0.bias")
    state["extra"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(4, 6)
    state["1.running_mean"] = state["1.running_mean"].int()  # float vs int: not promotable
    lw.save(state, tmp_path / "odd.safetensors")
    assert_refused(tmp_path, lambda: lw.merge_files([three[0], tmp_path / "odd.safetensors"], tmp_path / "o.safetensors"),
                   "odd.safetensors lacks 1 key(s)", "0.bias", "extra", "2.weight: shape (3, 6)", "(4, 6)",
                   "1.running_mean: dtype torch.float32", "torch.int32")


def test_output_equal_to_an_input_is_refused(tmp_path, three):
    assert_refused(tmp_path, lambda: lw.merge_files(three[:2], three[1], overwrite=True), "would overwrite the input")
    assert_refused(tmp_path, lambda: lw.merge_files(three[:2], tmp_path / "." / three[0].name, overwrite=True),
                   "would overwrite the input")


def test_missing_or_unwritable_output_folder_is_refused(tmp_path, three):
    assert_refused(tmp_path, lambda: lw.merge_files(three[:2], tmp_path / "nope" / "o.safetensors"), "does not exist")
    if os.geteuid() == 0:
        unwritable = Path("/sys")  # root may write anywhere else
        assert_refused(tmp_path, lambda: lw.merge_files(three[:2], unwritable / "o.safetensors"), "/sys")
        assert not (unwritable / "o.safetensors").exists()
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_refused(tmp_path, lambda: lw.merge_files(three[:2], locked / "o.safetensors"), "not writable")


def test_bad_method_and_options_are_refused_before_writing(tmp_path, three):
    assert_refused(tmp_path, lambda: lw.merge_files(three[:2], tmp_path / "o.safetensors", "ties"), "pass base=")
    with pytest.raises(lw.MergeError, match="density"):
        lw.merge_files(three[1:], tmp_path / "o.safetensors", "ties", base=three[0], density=0.0)
    assert not (tmp_path / "o.safetensors").exists()
    assert_refused(tmp_path, lambda: lw.merge_files(three[:2], tmp_path / "o.safetensors", dtype="fp12"), "fp12")
    for option, value, error in (("dtype", "fp12", lw.OptionError), ("compute_dtype", "int8", lw.OptionError),
                                 ("compute_dtype", torch.int8, lw.OptionError), ("dtype", 16, lw.OptionTypeError)):
        with pytest.raises(error, match=f"^{option}"):  # the option is named: merges take two dtypes
            lw.merge_files(three[:2], tmp_path / "o.safetensors", **{option: value})
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_complex_tensors_for_a_method_without_them_are_refused_before_writing(tmp_path, monkeypatch, method):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        lw.save({"w": torch.full((4,), float(i)), "z": torch.full((2,), 1j * i)}, p)
    monkeypatch.setattr("layerwise.checkpoint.write", lambda *a, **k: pytest.fail("writing started"))
    with pytest.raises(lw.MergeError, match=f"^z: {method} needs magnitudes"):
        lw.merge_files(paths[1:], tmp_path / "o.safetensors", method, base=paths[0], density=0.5) if method == "ties" \
            else lw.merge_files(paths[1:], tmp_path / "o.safetensors", method)
    assert sorted(tmp_path.iterdir()) == paths


KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    import layerwise.checkpoint as checkpoint
    real = checkpoint.merge_tensor
    calls = []
    def merge_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # half-way through the tensors
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    checkpoint.merge_tensor = merge_then_die
    checkpoint.merge_files(sys.argv[1:3], sys.argv[3])
""")


@pytest.mark.parametrize("output", ["out.safetensors", "out_folder"])
def test_a_merge_killed_midway_leaves_nothing_at_the_output(tmp_path, three, output):
    before = fingerprint(tmp_path)
    code = KILL_CHILD if output.endswith(".safetensors") else KILL_CHILD.replace(
        "sys.argv[3])", "sys.argv[3], max_shard_size=100)")
    run = subprocess.run([sys.executable, "-c", code, str(three[0]), str(three[1]), str(tmp_path / output)])
    assert run.returncode == -signal.SIGKILL
    assert not (tmp_path / output).exists()
    leftovers = set(fingerprint(tmp_path)) - set(before)
    assert all(Path(p).parts[0].startswith(f".{output}.") for p in leftovers), leftovers
    assert {k: v for k, v in fingerprint(tmp_path).items() if k in before} == before


def test_open_checkpoint_reads_headers_only(three):
    with open_checkpoint(three[0]) as ckpt:
        assert ckpt.specs["0.weight"] == ((6, 5), torch.float32)
        assert ckpt._files == {}  # nothing read yet


def test_metadata_must_be_strings_and_round_trips(tmp_path):
    with pytest.raises(lw.CheckpointError, match="'epoch': int"):
        lw.save({"w": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"epoch": 3})
    assert not (tmp_path / "m.safetensors").exists()
    lw.save({"w": torch.zeros(1)}, tmp_path / "m.safetensors", metadata={"epoch": "3"})
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata()["epoch"] == "3" and f.metadata()["format"] == "pt"


# --------------------------------------------------------------------------- .pt files that are not checkpoints


_NOISE = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("content", [b"", b"hello world", _NOISE, b"\x80\x04\x95" + _NOISE[:50]],
                         ids=["empty", "text", "noise", "pickle-noise"])
def test_bytes_that_are_not_a_torch_checkpoint_are_named_as_such(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(lw.CheckpointError, match=r"x\.pt: not a PyTorch checkpoint"):
        lw.load(tmp_path / "x.pt")


@pytest.mark.parametrize("zipfile", [True, False])
def test_a_truncated_torch_checkpoint_is_named_as_such(tmp_path, zipfile):
    torch.save({"w": torch.randn(100)}, tmp_path / "full.pt", _use_new_zipfile_serialization=zipfile)
    (tmp_path / "x.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:150])
    with pytest.raises(lw.CheckpointError, match=r"x\.pt: not a PyTorch checkpoint"):
        lw.load(tmp_path / "x.pt")


def test_sparse_and_meta_tensors_are_named(tmp_path):
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.ones(1)}, tmp_path / "sparse.pt")
    with pytest.raises(lw.CheckpointError, match="tensor 'w' is sparse_coo"):
        lw.load(tmp_path / "sparse.pt")
    torch.save({"w": torch.empty(3, device="meta")}, tmp_path / "meta.pt")
    with pytest.raises(lw.CheckpointError, match="tensor 'w' is on the meta device"):
        lw.load(tmp_path / "meta.pt")
    torch.save({3: torch.ones(1)}, tmp_path / "numbered.pt")  # a dict of tensors, but not a state dict
    for reader in (lw.load, lambda p: lw.merge_files([p, p], tmp_path / "out.safetensors")):
        with pytest.raises(lw.CheckpointError, match=r"numbered\.pt: tensor names are strings, not 3 \(int\)"):
            reader(tmp_path / "numbered.pt")
    for bad, why in (({"w": torch.eye(2).to_sparse()}, "sparse_coo"), ({"w": torch.empty(2, device="meta")}, "meta")):
        with pytest.raises(lw.CheckpointError, match=why):
            lw.save(bad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- compiled models


def test_a_compiled_model_is_saved_under_its_inner_names_and_loads_back_into_it(tmp_path):
    model = net(0)
    compiled = torch.compile(model, backend="eager")
    outer = nn.ModuleDict({"body": torch.compile(net(1), backend="eager")})
    lw.save(compiled, tmp_path / "c.safetensors")
    lw.save(outer, tmp_path / "o.safetensors")
    assert same(lw.load(tmp_path / "c.safetensors"), model.state_dict())
    assert all("_orig_mod" not in k for k in lw.load(tmp_path / "o.safetensors"))
    fresh = torch.compile(net(5), backend="eager")
    lw.load(tmp_path / "c.safetensors", into=fresh)
    assert same(fresh._orig_mod.state_dict(), model.state_dict())
    target = nn.ModuleDict({"body": torch.compile(net(6), backend="eager")})
    lw.load(tmp_path / "o.safetensors", into=target)
    assert same(target.state_dict(), outer.state_dict())


@pytest.mark.parametrize("size, error, message", [
    (1.5, lw.OptionTypeError, "max_shard_size=1.5"), (True, lw.OptionTypeError, "max_shard_size=True"),
    (-5, lw.OptionError, "max_shard_size=-5"), (0, lw.OptionError, "at least one byte"),
    ("1.5", lw.OptionError, "not a whole number of bytes"), ("5 parsecs", lw.OptionError, "write e.g. 500MB"),
])
def test_shard_sizes_are_checked_by_type_and_value(tmp_path, size, error, message):
    with pytest.raises(error, match=message):
        lw.save({"w": torch.ones(2)}, tmp_path / "m", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_shard_sizes_in_units(tmp_path):
    from layerwise._files import parse_size

    assert [parse_size(s) for s in ("500MB", "2GiB", "1.5kB", 7, None)] == [500_000_000, 2 * 1024**3, 1500, 7, None]


def test_load_into_a_model_that_does_not_fit_changes_nothing(tmp_path):
    lw.save({**net(0).state_dict(), "extra": torch.ones(1)}, tmp_path / "m.safetensors")
    model = net(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lw.CheckpointError, match="extra: not in the model"):
        lw.load(tmp_path / "m.safetensors", into=model)
    lw.save({k: v[:1] if k == "2.bias" else v for k, v in net(0).state_dict().items()}, tmp_path / "s.safetensors")
    with pytest.raises(lw.CheckpointError, match=r"2.bias: shape \(1,\) in the file, \(3,\) in the model"):
        lw.load(tmp_path / "s.safetensors", into=model)
    assert same(model.state_dict(), before)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_shard_size=st.none() | st.integers(-10, 10**4) | st.floats(allow_nan=True) | st.text(max_size=6) | st.booleans(),
       metadata=st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=2),
       overwrite=st.booleans() | st.just("no") | st.none() | st.integers(0, 1),
       key=st.none() | st.text(max_size=4) | st.integers())
def test_any_save_and_load_options_give_a_result_or_a_layerwise_error(tmp_path, max_shard_size, metadata, overwrite,
                                                                     key):
    out = tmp_path / ("h" if max_shard_size is not None else "h.safetensors")
    try:
        lw.save({"w": torch.arange(4.0)}, out, max_shard_size=max_shard_size, metadata=metadata, overwrite=overwrite)
    except lw.LayerwiseError:
        return
    try:
        assert lw.load(out, key=key)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    except lw.LayerwiseError:
        pass


def test_a_fifo_named_like_a_checkpoint_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(lw.CheckpointError, match="not a regular file or a folder"):
        lw.load(tmp_path / "pipe.safetensors")


def test_float8_checkpoints_merge_in_float32_and_a_float8_mix_needs_an_output_dtype(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0, -0.5, 448.0]).to(torch.float8_e4m3fn), "b": torch.ones(2)}
    b = {"w": torch.tensor([3.0, 2.0, 0.5, 448.0]).to(torch.float8_e4m3fn), "b": torch.zeros(2)}
    lw.save(a, tmp_path / "a.safetensors")
    lw.save(b, tmp_path / "b.safetensors")
    lw.merge_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "out.safetensors")
    merged = lw.load(tmp_path / "out.safetensors")
    expected = ((a["w"].float() + b["w"].float()) / 2).to(torch.float8_e4m3fn)
    assert merged["w"].dtype == torch.float8_e4m3fn and torch.equal(merged["w"].float(), expected.float())
    assert torch.equal(lw.average([a, b])["w"].float(), merged["w"].float())  # the file equals the in-memory merge

    lw.save({"w": b["w"].float().to(torch.float8_e5m2), "b": b["b"]}, tmp_path / "c.safetensors")
    with pytest.raises(lw.OptionError, match="w: the inputs are float8_e4m3fn, float8_e5m2.*pass dtype="):
        lw.merge_files([tmp_path / "a.safetensors", tmp_path / "c.safetensors"], tmp_path / "mixed.safetensors")
    assert not (tmp_path / "mixed.safetensors").exists()
    lw.merge_files([tmp_path / "a.safetensors", tmp_path / "c.safetensors"], tmp_path / "mixed.safetensors",
                   dtype=torch.bfloat16)
    assert lw.load(tmp_path / "mixed.safetensors")["w"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- sharded and wrapped models


def _trained(seed: int, rank: int | None = None, world_size: int = 2) -> nn.Module:
    """TiedLM after two SGD steps on the global batch, or on this rank's share of it (then wrapped by the caller)."""
    torch.manual_seed(seed)
    model = TiedLM()
    tokens = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(seed))
    return model, tokens if rank is None else tokens.chunk(world_size)[rank]


def _steps(model: nn.Module, tokens: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()


def _sharded_checkpoints(rank: int, world_size: int, folder: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    out: dict = {}
    for seed, name in ((0, "a"), (1, "b")):
        model, tokens = _trained(seed, rank, world_size)
        fully_shard(model.body, mesh=init_device_mesh("cpu", (world_size,)))
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)), reshard_after_forward=seed == 0)
        _steps(model, tokens)
        out[name] = lw.save(model, f"{folder}/{name}.safetensors")  # every rank calls; rank 0 writes
    try:
        lw.save(model, f"{folder}/a.safetensors")
    except lw.OutputExistsError as e:
        out["again"] = str(e)  # raised on every rank, not only on the one that writes
    fresh, _ = _trained(2)
    fully_shard(fresh.body, mesh=init_device_mesh("cpu", (world_size,)))
    fully_shard(fresh, mesh=init_device_mesh("cpu", (world_size,)))
    lw.load(f"{folder}/a.safetensors", into=fresh)  # each rank takes its shards of the full tensors
    out["loaded"] = {k: v.full_tensor() for k, v in fresh.state_dict().items()}
    out["local"] = fresh.body.weight.to_local().clone()
    ddp = DistributedDataParallel(_trained(3)[0])
    if rank == 0:
        lw.save(ddp, f"{folder}/ddp.safetensors")
    lw.load(f"{folder}/a.safetensors", into=ddp)
    out["ddp"] = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    return out


def test_sharded_and_ddp_models_save_full_files_and_load_them_back(run_ranks, tmp_path):
    # lw.save of an FSDP2 model raised torch's "invalid python storage"; lw.load(into=) its mixed Tensor/DTensor
    # error; a DDP wrapper saved 'module.'-prefixed names that no unwrapped model loads.
    r0, r1 = run_ranks(_sharded_checkpoints, str(tmp_path))
    assert r0["a"] == r1["a"] == tmp_path / "a.safetensors" and r0["again"] == r1["again"]
    assert "already exists" in r0["again"]
    for seed, name in ((0, "a"), (1, "b")):
        model, tokens = _trained(seed)
        _steps(model, tokens)  # one process over the global batch
        saved = lw.load(tmp_path / f"{name}.safetensors")
        assert saved.keys() == model.state_dict().keys() and saved["decoder.weight"] is saved["embed.weight"]
        for k, v in model.state_dict().items():
            torch.testing.assert_close(saved[k], v, rtol=1e-5, atol=1e-6, msg=k)
    a = lw.load(tmp_path / "a.safetensors")
    for rank, result in enumerate((r0, r1)):
        for k, v in a.items():
            assert torch.equal(result["loaded"][k], v) and torch.equal(result["ddp"][k], v), k
        assert torch.equal(result["local"], a["body.weight"].chunk(2)[rank])
    assert sorted(lw.load(tmp_path / "ddp.safetensors")) == sorted(TiedLM().state_dict())  # no "module."
    merged = lw.merge_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors")
    b = lw.load(tmp_path / "b.safetensors")
    for k, v in lw.load(merged).items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, msg=k)
