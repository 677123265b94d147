"""The safetensors format as layerwise reads and writes it: every dtype, headers and index files
checked as the format defines them, metadata treated as data."""

import json
import math
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerwise as lw
from layerwise._safetensors import MAX_HEADER, codes

# --------------------------------------------------------------------------- dtypes


def _sample(dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` with varied bytes (random bit patterns, so every code is exercised)."""
    raw = torch.randint(0, 256, (3, 4 * dtype.itemsize), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if dtype == torch.bool:
        return raw[:, :4] % 2 == 1
    return raw.view(dtype)


def test_the_dtype_table_is_the_safetensors_package_one():
    table = codes()
    for code in ("F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E4M3", "F8_E5M2", "C64", "U16", "U32", "U64",
                 "BOOL", "BF16", "F4"):
        assert code in table, code
    assert set(table.values()) == {d for d in safetensors.torch._SIZE if d is not None}


@pytest.mark.parametrize("code", sorted(codes()))
def test_every_safetensors_dtype_round_trips_and_interoperates(tmp_path, code):
    dtype = codes()[code]
    state = {"x": _sample(dtype), "empty": torch.empty(0, 2, dtype=dtype)}
    lw.save(state, tmp_path / "m.safetensors")
    back = lw.load(tmp_path / "m.safetensors")
    theirs = safetensors.torch.load_file(tmp_path / "m.safetensors")
    for got in (back, theirs):
        assert got["x"].dtype == dtype and got["x"].shape == state["x"].shape
        assert torch.equal(got["x"].view(torch.uint8), state["x"].view(torch.uint8))
    # and a file the safetensors library wrote reads back here
    safetensors.torch.save_file(state, tmp_path / "theirs.safetensors")
    assert torch.equal(lw.load(tmp_path / "theirs.safetensors")["x"].view(torch.uint8), state["x"].view(torch.uint8))


def test_a_dtype_safetensors_cannot_store_is_named(tmp_path):
    with pytest.raises(lw.CheckpointError, match="tensor 'z' has dtype torch.complex128"):
        lw.save({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --------------------------------------------------------------------------- headers


def _file(tmp_path: Path, header: object, data: bytes, name: str = "h.safetensors") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def _valid() -> tuple[dict, bytes]:
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
              "c": {"dtype": "BF16", "shape": [0], "data_offsets": [24, 24]}}
    return header, bytes(range(24))


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["a"].update(shape=[-1, -1]), "shape [-1, -1]; a shape is a list of non-negative integers"),
    (lambda h: h["a"].update(shape=[1.5]), "shape [1.5]"),
    (lambda h: h["a"].update(shape=[True, 4]), "shape [True, 4]"),
    (lambda h: h["c"].update(shape=[0, 2**63]), "shape [0, 9223372036854775808]; a shape is a list of non-negative integers below 2**63"),
    (lambda h: h["a"].update(shape="2x2"), "shape '2x2'"),
    (lambda h: h["a"].update(dtype="F17"), "dtype 'F17'"),
    (lambda h: h["a"].update(dtype=5), "dtype 5"),
    (lambda h: h["a"].update(data_offsets=[0]), "data_offsets [0]"),
    (lambda h: h["a"].update(data_offsets=[8, 0]), "data_offsets [8, 0]"),
    (lambda h: h["a"].update(data_offsets=[0, 12]), "12 bytes for shape [2, 2] of F32 (16 expected)"),
    (lambda h: h["b"].update(data_offsets=[8, 16]), "overlaps 'a'"),
    (lambda h: (h["b"].update(data_offsets=[20, 28]), h["c"].update(data_offsets=[28, 28])), "leaves a gap after 'a'"),
    (lambda h: (h.pop("b"), h.pop("c")), "8 bytes follow the last tensor 'a'"),
    (lambda h: h["b"].update(data_offsets=[16, 24], shape=[2]), "8 bytes for shape [2] of I64"),
    (lambda h: h.update(__metadata__={"epoch": 3}), "__metadata__ must map strings to strings"),
    (lambda h: h.update(__metadata__=["x"]), "__metadata__ must map strings to strings"),
    (lambda h: h.update(d=[1, 2]), "tensor 'd' needs dtype, shape and data_offsets"),
    (lambda h: h["a"].pop("dtype"), "tensor 'a' needs dtype, shape and data_offsets"),
])
def test_malformed_headers_are_refused_by_name(tmp_path, mutate, message):
    header, data = _valid()
    mutate(header)
    path = _file(tmp_path, header, data)
    with pytest.raises(lw.CheckpointError) as e:
        lw.load(path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_the_valid_header_of_these_tests_loads(tmp_path):
    header, data = _valid()
    state = lw.load(_file(tmp_path, header, data))
    assert state["a"].shape == (2, 2) and state["b"].tolist() == [int.from_bytes(data[16:24], "little")]


def test_duplicate_names_are_caught_while_parsing(tmp_path):
    raw = (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
           b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
    with pytest.raises(lw.CheckpointError, match="the name 'a' appears twice"):
        lw.load(_file(tmp_path, raw, b"xy"))
    raw = b'{"a":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(lw.CheckpointError, match="the name 'dtype' appears twice"):
        lw.load(_file(tmp_path, raw, b"x"))


@pytest.mark.parametrize("raw, message", [
    (b'{"a\xff":1}', "not UTF-8"),
    (b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "not valid Unicode"),
    (b"[1, 2]", "not a JSON object"),
    (b"{" * 100_000, "not JSON"),
    (b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,1]}}', "not JSON"),
])
def test_headers_that_are_not_utf8_json_objects_are_refused(tmp_path, raw, message):
    with pytest.raises(lw.CheckpointError, match=message):
        lw.load(_file(tmp_path, raw, b"x"))


def test_a_header_size_beyond_the_format_cap_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((MAX_HEADER + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(lw.CheckpointError, match="the format allows 100,000,000"):
        lw.load(path)


_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["a", "b", "c"]), st.sampled_from(["dtype", "shape", "data_offsets"]),
              st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=2),
                           max_leaves=6)),
    st.tuples(st.just("drop"), st.sampled_from(["a", "b", "c", "__metadata__"]), st.none(), st.none()),
    st.tuples(st.just("meta"), st.text(max_size=4), st.none(), st.none() | st.integers() | st.text(max_size=4)),
    st.tuples(st.just("trim"), st.integers(-30, 30), st.none(), st.none()),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=4))
def test_any_mutation_of_a_valid_header_loads_correctly_or_is_a_checkpoint_error(tmp_path, mutations):
    header, data = _valid()
    for kind, key, field, value in mutations:
        if kind == "set" and isinstance(header.get(key), dict):
            header[key][field] = value
        elif kind == "drop":
            header.pop(key, None)
        elif kind == "meta":
            header["__metadata__"] = {**(header.get("__metadata__") or {}), key: value}
        elif kind == "trim":
            data = data[:key] if key < 0 else data + bytes(key)
    try:
        path = _file(tmp_path, header, data)
    except ValueError:  # json cannot write NaN-free... nothing to test
        return
    try:
        state = lw.load(path)
    except lw.CheckpointError:
        return
    # it loaded: then it is exactly what the header says, and what the reference library reads
    theirs = safetensors.torch.load_file(path)
    assert state.keys() == theirs.keys()
    for k, t in state.items():
        assert t.dtype == theirs[k].dtype and t.shape == theirs[k].shape
        assert torch.equal(t.reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6),
                                st.integers(0, 255)), min_size=1, max_size=3))
def test_any_byte_edit_of_a_valid_file_loads_as_the_reference_does_or_is_a_checkpoint_error(tmp_path, edits):
    header, data = _valid()
    raw = bytearray(_file(tmp_path, header, data).read_bytes())
    for kind, where, byte in edits:
        i = where % len(raw)
        if kind == "flip":
            raw[i] = byte
        elif kind == "insert":
            raw.insert(i, byte)
        else:
            del raw[i]
    path = tmp_path / "edited.safetensors"
    path.write_bytes(bytes(raw))
    try:
        state = lw.load(path)
    except lw.CheckpointError:
        return
    theirs = safetensors.torch.load_file(path)  # what we accept, the reference library accepts alike
    assert state.keys() == theirs.keys()
    for k, t in state.items():
        assert t.dtype == theirs[k].dtype and t.shape == theirs[k].shape
        assert torch.equal(t.reshape(-1).view(torch.uint8), theirs[k].reshape(-1).view(torch.uint8))


# --------------------------------------------------------------------------- index files


def _folder(tmp_path: Path, weight_map: object, extra: dict | None = None, raw: bytes | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    lw.save({"a": torch.ones(2), "b": torch.zeros(3)}, folder / "s1.safetensors", overwrite=True)
    index = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map, **(extra or {})}).encode()
    (folder / "model.safetensors.index.json").write_bytes(index)
    return folder


@pytest.mark.parametrize("weight_map, message", [
    ({"a": "."}, "a path outside the folder"),
    ({"a": ""}, "a path outside the folder"),
    ({"a": "../s1.safetensors"}, "a path outside the folder"),
    ({"a": "/etc/passwd"}, "a path outside the folder"),
    ({"a": "model.safetensors.index.json"}, "not a .safetensors or .bin shard"),
    ({"a": "s2.safetensors"}, "which is missing"),
    ({"a": 3}, "not a file name"),
    ({"a": ["s1.safetensors"]}, "not a file name"),
    (["a"], 'needs a "weight_map" object'),
    ({"zz": "s1.safetensors"}, "lacks 'zz'"),
])
def test_bad_index_files_are_refused_by_name(tmp_path, weight_map, message):
    folder = _folder(tmp_path, weight_map)
    with pytest.raises(lw.CheckpointError, match=message) as e:
        lw.load(folder)
    assert "model" in str(e.value)


@pytest.mark.parametrize("raw, message", [
    (b'{"weight_map": {"a": "s1.safe\xfftensors"}}', "not UTF-8"),
    (b'{"weight_map": {"\\udc00": "s1.safetensors"}}', "not valid Unicode"),
    (b'{"weight_map": {"a": "\\ud800.safetensors"}}', "not valid Unicode"),
    (b'{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}', "appears twice"),
    (b'{"weight_map": {}, "metadata": 5}', '"metadata" is not an object'),
    (b"[", "not JSON"),
])
def test_index_files_that_are_not_clean_json_are_refused_by_name(tmp_path, raw, message):
    with pytest.raises(lw.CheckpointError, match=message):
        lw.load(_folder(tmp_path, None, raw=raw))


def test_a_valid_index_loads_only_what_it_maps(tmp_path):
    assert sorted(lw.load(_folder(tmp_path, {"a": "s1.safetensors"}))) == ["a"]


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weight_map=st.dictionaries(st.text(max_size=4), st.text(max_size=12) | st.sampled_from(
    ["s1.safetensors", "./s1.safetensors", "../model/s1.safetensors", "s1.safetensors/", "."]), max_size=3))
def test_any_weight_map_loads_correctly_or_is_a_checkpoint_error(tmp_path, weight_map):
    try:
        state = lw.load(_folder(tmp_path, weight_map))
    except lw.CheckpointError:
        return
    assert set(state) == set(weight_map) <= {"a", "b"}


# --------------------------------------------------------------------------- metadata is data


def _tied(tmp_path: Path, aliases: object) -> Path:
    header = {"__metadata__": {"layerwise.aliases": aliases if isinstance(aliases, str) else json.dumps(aliases)},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    return _file(tmp_path, header, torch.tensor([1.0, 2.0, 3.0]).numpy().tobytes())


def test_a_valid_alias_is_restored_shared(tmp_path):
    state = lw.load(_tied(tmp_path, {"c": "a"}))
    assert state["c"] is state["a"] and sorted(state) == ["a", "b", "c"]


@pytest.mark.parametrize("aliases, why", [
    ({"b": "a"}, "would hide the stored tensor 'b'"),
    ({"c": "zz"}, "points to 'zz'"),
    ({"c": "d", "d": "a"}, "points to 'd'"),
    ({"c": 5}, "points to 5"),
    ("not json", "not a JSON object"),
    ([1], "not a JSON object"),
    ("[" * 100_000, "not a JSON object"),
    ({"__metadata__": "a"}, "'__metadata__': it is not a name a tensor can have"),
    ({"\udc80": "a"}, "it is not a name a tensor can have"),
])
def test_a_crafted_alias_is_ignored_with_a_warning_and_never_replaces_a_tensor(tmp_path, aliases, why):
    with pytest.warns(UserWarning, match=why):
        state = lw.load(_tied(tmp_path, aliases))
    assert state["a"].tolist() == [1.0, 2.0] and state["b"].tolist() == [3.0]
    assert "__metadata__" not in state and "\udc80" not in state


def test_save_refuses_reserved_metadata_and_a_tensor_named_metadata(tmp_path):
    with pytest.raises(lw.CheckpointError, match="'layerwise.aliases'"):
        lw.save({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"layerwise.aliases": "{}"})
    with pytest.raises(lw.CheckpointError, match="cannot be named '__metadata__'"):
        lw.save({"__metadata__": torch.ones(1)}, tmp_path / "m.safetensors")
    with pytest.raises(lw.CheckpointError, match=r"m.safetensors: a tensor cannot be named '\\udc80'"):
        lw.save({"\udc80": torch.ones(1)}, tmp_path / "m.safetensors")
    with pytest.raises(lw.CheckpointError, match="tensor names are strings; not 5"):
        lw.save({5: torch.ones(1)}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_no_warning_for_files_layerwise_wrote(tmp_path):
    lm = torch.nn.ModuleDict({"e": torch.nn.Embedding(3, 2), "o": torch.nn.Linear(2, 3, bias=False)})
    lm["o"].weight = lm["e"].weight
    for target, shard in ((tmp_path / "a.safetensors", None), (tmp_path / "f", 8)):
        lw.save(lm, target, max_shard_size=shard)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state = lw.load(target)
        assert state["o.weight"] is state["e.weight"]
        assert math.prod(state["e.weight"].shape) == 6
