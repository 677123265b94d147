"""The merge engine: each method against its definition, options per layer, dtypes, bad input."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.profiler import ProfilerActivity, profile

import layerwise as lw
from layerwise import _merge_sliced, _replay, _sparsify
from layerwise._merge_math import merge_tensor
from layerwise._merge_methods import METHODS, describe_methods, get_method
from layerwise._merge_options import UNSET, layer_positions, resolve_options, value_at

T = torch.tensor


def one(method, base, *models, **options):
    """Merge single-tensor state dicts {"w": ...}."""
    return lw.merge(None if base is None else {"w": base}, [{"w": m} for m in models], method, **options)["w"]


def opts(method, models, **options):
    """This method's options for one tensor named "w", resolved."""
    return resolve_options(get_method(method), ["w"], models, options=options)["w"]


# --------------------------------------------------------------------------- each method by its definition


def test_linear_is_the_normalized_weighted_sum():
    assert torch.allclose(one("linear", None, T([1.0, 2.0]), T([3.0, 6.0]), weights=[1, 3]), T([2.5, 5.0]))
    assert torch.allclose(one("linear", None, T([1.0, 2.0]), T([3.0, 6.0]), weights=[1, 3], normalize=False),
                          T([10.0, 20.0]))


def test_task_arithmetic_adds_lambda_times_the_weighted_task_vectors():
    out = one("task_arithmetic", T([1.0, 1.0]), T([2.0, 0.0]), T([1.5, 3.0]), weights=[1.0, 2.0], **{"lambda": 0.5})
    assert torch.allclose(out, T([1.0, 1.0]) + 0.5 * (T([1.0, -1.0]) + 2 * T([0.5, 2.0])))
    assert torch.equal(out, one("task_arithmetic", T([1.0, 1.0]), T([2.0, 0.0]), T([1.5, 3.0]), weights=[1.0, 2.0],
                                scale=0.5))  # layerwise 0.1's name for lambda


def test_ties_trims_exactly_k_elects_plus_on_a_zero_sum_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    t1, t2 = T([4.0, -2.0, 0.5, 3.0]), T([2.5, 2.0, -6.0, 0.1])
    out = one("ties", base, t1, t2, density=0.5)
    # top 2 of 4: t1 -> [4, 0, 0, 3]; t2 -> [2.5, 0, -6, 0]; sums [6.5, 0, -6, 3] elect [+, +, -, +]
    assert torch.equal(out, T([3.25, 0.0, -6.0, 3.0]))
    # entry 1: full task vectors -2 and 2 sum to 0: mergekit elects +, layerwise 0.1 elects nothing
    assert one("ties", base, t1, t2)[1] == 2.0
    assert one("ties", base, t1, t2, convention="layerwise")[1] == 0.0


def test_ties_threshold_ties_follow_the_convention():
    tau = T([3.0, 1.0, 1.0, 0.5])
    assert (one("ties", torch.zeros(4), tau, density=0.5) != 0).sum() == 2  # exactly k, as mergekit
    assert torch.equal(one("ties", torch.zeros(4), tau, density=0.5, convention="layerwise"), T([3.0, 1.0, 1.0, 0.0]))


def test_dare_linear_keeps_the_l1_norm_and_dare_keeps_one_over_density():
    base, x = torch.zeros(1000), torch.linspace(-1, 1, 1000)
    out = one("dare_linear", base, x, density=0.3, seed=1)
    kept = out != 0
    assert 0.25 < kept.float().mean() < 0.35
    assert torch.allclose(out.abs().sum(), x.abs().sum(), rtol=1e-5)  # norm-preserving rescale
    assert torch.allclose(out[kept] / x[kept], out[kept][0] / x[kept][0])  # one factor for every kept entry
    old = one("dare", base, x, density=0.3, seed=1)
    assert torch.allclose(old[kept], x[kept] / 0.3) and torch.equal(old != 0, kept)  # same mask, 1/density


def test_dare_is_unbiased_with_density_rescaling_and_keeps_the_density_fraction():
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    draws = torch.stack([one("dare_linear", torch.zeros_like(x), x, density=0.2, rescale="density", seed=s)
                         for s in range(50)])
    assert abs((draws != 0).float().mean().item() - 0.2) < 0.005
    error = (draws.mean(0) - x).mean().abs().item()  # per-entry means are noisy; their mean error is not
    assert error < 0.01


def test_della_keeps_density_on_average_and_favours_large_entries():
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    out = one("della_linear", torch.zeros_like(x), x, density=0.4, epsilon=0.2, seed=3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.02
    big = x.abs() > x.abs().median(dim=1, keepdim=True).values
    assert kept[big].float().mean() > 0.5 > kept[~big].float().mean()  # keep probability 0.2 → 0.6 by rank
    assert torch.allclose(out.abs().sum(), x.abs().sum(), rtol=1e-4)  # l1 rescale by default
    with pytest.raises(lw.MergeError, match="inside"):
        one("della", torch.zeros(4), torch.ones(4), density=0.9, epsilon=0.2)


def test_breadcrumbs_drops_outliers_and_small_entries():
    x = torch.arange(1.0, 101.0)  # magnitudes 1..100
    out = one("breadcrumbs", torch.zeros(100), x, density=0.9, gamma=0.05)
    assert torch.equal(out != 0, (x > 5) & (x <= 95))  # 5 largest and 5 smallest gone
    small = one("breadcrumbs", torch.zeros(10), torch.arange(1.0, 11.0), density=0.5)  # n_top = 0: keep the top half
    assert torch.equal(small != 0, torch.arange(10) >= 5)


def test_slerp_by_definition_and_near_zero_conventions():
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    assert torch.allclose(one("slerp", None, a, b, t=1 / 3), T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert torch.allclose(one("slerp", a, b, t=1 / 3), one("slerp", None, a, b, t=1 / 3))  # base + one model
    with pytest.raises(lw.MergeError, match="slerp merges exactly 1 model besides the base; got 2"):
        lw.merge({"w": a}, [{"w": b}, {"w": a + b}], "slerp")  # which two? mergekit refuses it too
    zero = torch.zeros(2)
    assert torch.allclose(one("slerp", None, zero, b, t=0.5), math.sin(math.pi / 4) * b)  # mergekit: 90°
    assert torch.allclose(one("slerp", None, zero, b, t=0.5, convention="layerwise"), 0.5 * b)


def test_nuslerp_uses_the_weight_ratio_and_task_vectors_from_a_base():
    a, b = T([[1.0, 0.0], [0.0, 2.0]]), T([[0.0, 1.0], [2.0, 0.0]])
    out = one("nuslerp", None, a, b, weights=[2.0, 1.0], nuslerp_flatten=False)  # t = 1/3, per row
    row0 = T([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    assert torch.allclose(out, torch.stack([row0, 2 * row0.flip(0)]), atol=1e-6)
    base = torch.ones(2, 2)
    assert torch.allclose(one("nuslerp", base, a + base, b + base, weights=[2.0, 1.0], nuslerp_flatten=False), out + 1,
                          atol=1e-6)


def test_multislerp_of_two_equals_slerp_at_their_weight_and_keeps_the_mean_norm():
    a, b = T([2.0, 0.0]), T([0.0, 2.0])
    assert torch.allclose(one("multislerp", None, a, b), T([math.sqrt(2), math.sqrt(2)]), atol=1e-6)
    with pytest.raises(lw.MergeError, match="cancel out"):
        one("multislerp", None, T([1.0, 0.0]), T([-1.0, 0.0]), T([0.0, 0.0]))


def test_karcher_mean_of_orthogonal_unit_vectors_is_their_bisector_times_the_mean_norm():
    out = one("karcher", None, T([3.0, 0.0]), T([0.0, 1.0]))
    assert torch.allclose(out, 2.0 * T([1.0, 1.0]) / math.sqrt(2), atol=1e-5)


def test_model_stock_interpolates_by_the_angle_between_task_vectors():
    base, a, b = torch.zeros(2), T([1.0, 0.0]), T([0.0, 1.0])
    # cos = 0 → t = 0: the base
    assert torch.allclose(one("model_stock", base, a, b), base)
    c = T([1.0, 1.0])  # cos(a, c) = 1/√2 → t = 2c / (1 + c)
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    assert torch.allclose(one("model_stock", base, a, c), t * (a + c) / 2, atol=1e-6)


def test_sce_weights_task_vectors_by_energy_after_the_sign_election():
    base, a, b = torch.zeros(2), T([2.0, 1.0]), T([1.0, -3.0])
    out = one("sce", base, a, b)
    ea, eb = (4 + 1) / 2, (1 + 9) / 2  # mean square of each task vector
    elected = [a[0] * ea + b[0] * eb, b[1] * eb]  # entry 1: sum -2 elects -, a disagrees
    assert torch.allclose(out, T([elected[0] / (ea + eb), elected[1] / eb]), atol=1e-6)


def test_nearswap_takes_the_model_near_the_base_and_blends_far_away():
    base, x = T([0.0, 0.0, 0.0]), T([0.05, 0.2, 1.0])
    out = one("nearswap", base, x, t=0.1)
    assert torch.allclose(out, T([0.05, 0.5 * 0.2, 0.1 * 1.0]))  # weight = min(1, t / |x - base|)
    with pytest.raises(lw.MergeError, match="needs the option t"):
        one("nearswap", base, x)


def test_passthrough_scales_one_model():
    assert torch.equal(one("passthrough", None, T([1.0, -2.0]), model_options=[{"scale": 0.5}]), T([0.5, -1.0]))
    with pytest.raises(lw.MergeError, match="exactly 1 model"):
        one("passthrough", None, T([1.0]), T([2.0]))


# --------------------------------------------------------------------------- files equal memory, for every method


def _needs(method, n_models=3):
    m = METHODS[method]
    lo, hi = m.models
    models = 1 if method == "slerp" else 2 if method == "nuslerp" else max(lo, min(hi, n_models))  # slerp: base → one
    options = {"t": 0.05} if method == "nearswap" else {}
    if "density" in {o.name for o in m.options}:
        options["density"] = 0.6
    return m.base != "none", models, options


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_files_equals_merge_for_every_method(tmp_path, method):
    gen = torch.Generator().manual_seed(1)
    sds = [{"layers.0.w": torch.randn(5, 4, generator=gen), "layers.1.w": torch.randn(5, 4, generator=gen),
            "bias": torch.randn(3, generator=gen), "steps": torch.tensor(i)} for i in range(4)]
    paths = [lw.save(sd, tmp_path / f"m{i}.safetensors") for i, sd in enumerate(sds)]
    with_base, n, options = _needs(method)
    base, models = (paths[0], paths[1:1 + n]) if with_base else (None, paths[:n])
    out = lw.merge_files(models, tmp_path / "out.safetensors", method, base=base, **options)
    expected = lw.merge(sds[0] if with_base else None, [lw.load(p) for p in models], method, **options)
    got = lw.load(out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), (method, k)


# --------------------------------------------------------------------------- per-layer values


def test_layer_positions_follow_mergekit():
    keys = ["embed.weight"] + [f"model.layers.{i}.mlp.w" for i in range(5)] + ["lm_head.weight"]
    positions = layer_positions(keys)
    assert [positions[f"model.layers.{i}.mlp.w"] for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert positions["embed.weight"] == positions["lm_head.weight"] == 0.0
    assert layer_positions(["embed.weight", "layers.0.w", "norm.weight"])["layers.0.w"] == 1.0  # one layer: t = 1


def test_gradients_filters_and_selectors_resolve_through_one_resolver():
    assert value_at([0.0, 1.0, 0.0], "x", t=0.25) == 0.5  # interpolated
    assert value_at([0.0, 1.0, 0.0], "x", t=0.5) == 1.0
    rules = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert value_at(rules, "layers.3.self_attn.q", t=0.5) == 0.5
    assert value_at(rules, "layers.3.mlp.up", t=0.5) == 0.7
    assert value_at(rules, "embed", t=0.0) == 0.5  # the rule without a filter is the default
    assert value_at([{"filter": "mlp", "value": 1}], "embed") is UNSET
    assert value_at({"layers.*.mlp.**": 0.1, "layers.3.**": 0.9}, "layers.3.mlp.up") == 0.9  # later overrides
    assert value_at({"layers.[0-1].**": 0.1}, "layers.3.mlp.up") is UNSET


def test_per_layer_t_in_a_merge():
    a = {f"layers.{i}.w": T([1.0, 0.0]) for i in range(3)} | {"head": T([1.0, 0.0])}
    b = {k: T([0.0, 1.0]) for k in a}
    out = lw.merge(None, [a, b], "slerp", t=[{"filter": "head", "value": 1.0}, {"value": [0.0, 1.0]}])
    assert torch.allclose(out["layers.0.w"], a["layers.0.w"]) and torch.allclose(out["layers.2.w"], b["layers.2.w"])
    assert torch.allclose(out["layers.1.w"], T([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(out["head"], b["head"])


def test_per_model_options_override_the_global_value():
    base, a, b = {"w": torch.zeros(4)}, {"w": T([4.0, 3.0, 2.0, 1.0])}, {"w": T([1.0, 2.0, 3.0, 4.0])}
    out = lw.merge(base, [a, b], "ties", density=0.25, model_options=[{}, {"density": 1.0}])["w"]
    assert torch.equal(out, T([2.5, 2.0, 3.0, 4.0]))  # a keeps only 4; b keeps everything


# --------------------------------------------------------------------------- dtypes


def test_mixed_float_dtypes_are_promoted_and_computed_in_float32():
    base = {"w": torch.zeros(3)}
    a = {"w": T([1.0, 2.0, 3.0]).bfloat16()}
    out = lw.merge(base, [a], "task_arithmetic")
    assert out["w"].dtype == torch.float32 and out["w"].tolist() == [1.0, 2.0, 3.0]
    assert lw.merge(base, [a], "task_arithmetic", dtype=torch.bfloat16)["w"].dtype == torch.bfloat16
    x = [torch.full((1,), v, dtype=torch.float16) for v in (2048.0, 1.0, 1.0)]  # fp16 spacing at 2048 is 2
    total = opts("linear", 3, normalize=False)
    assert merge_tensor("linear", x, None, total, compute_dtype=torch.float16).item() == 2048.0
    out = merge_tensor("linear", x, None, total)  # float32 by default, returned in the inputs' dtype
    assert out.dtype == torch.float16 and out.item() == 2050.0


def test_empty_tensors_give_empty_results_for_every_method():
    for method in METHODS:
        with_base, n, options = _needs(method)
        empty = torch.zeros(0, 3)
        out = merge_tensor(method, [empty] * n, empty if with_base else None,
                           opts(method, n, **options), key="w")
        assert out.shape == (0, 3), method


def test_complex_tensors_merge_linearly_or_are_refused_by_name():
    a, b = T([1 + 1j, 2 - 1j]), T([3 + 1j, 0 + 1j])
    assert torch.allclose(one("linear", None, a, b), (a + b) / 2)
    for method in ("ties", "dare_ties", "slerp", "della"):
        with_base, n, options = _needs(method)
        with pytest.raises(lw.MergeError, match=f"w: {method} needs magnitudes"):
            one(method, a if with_base else None, *[a, b][:n], **options)


# --------------------------------------------------------------------------- bad input


def test_unknown_options_methods_and_model_counts_are_named():
    with pytest.raises(lw.MergeError, match="takes no option 'gamma'"):
        one("ties", torch.zeros(1), torch.ones(1), gamma=0.1)
    with pytest.raises(lw.MergeError, match="choose one of linear"):
        get_method("tie")
    with pytest.raises(lw.MergeError, match="at least 2 models besides the base"):
        one("model_stock", torch.zeros(1), torch.ones(1))
    with pytest.raises(lw.MergeError, match="apply to all models"):
        one("ties", torch.zeros(1), torch.ones(1), model_options=[{"lambda": 2.0}])
    with pytest.raises(lw.MergeError, match=r"density=0 of model 0 for w must be in \(0, 1\]"):
        one("ties", torch.zeros(1), torch.ones(1), density=0)
    with pytest.raises(lw.MergeError, match="one {option: value} mapping per model"):
        one("ties", torch.zeros(1), torch.ones(1), model_options={"density": 0.5})
    with pytest.raises(lw.MergeError, match="models must be a list"):
        lw.merge(None, {"w": torch.ones(1)})
    with pytest.raises(lw.MergeError, match="gradient of numbers"):
        one("slerp", None, torch.ones(1), torch.zeros(1), t=[0.1, "x", None])


def test_describe_methods_lists_every_method_and_option_with_its_default():
    text = describe_methods()
    for m in METHODS.values():
        assert f"  {m.name}: " in text
    assert "epsilon (per model): " in text and "default 0.15" in text


settings_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                            st.text(max_size=3), st.lists(st.floats(-2, 2), max_size=3))


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(list(METHODS)), name=st.sampled_from(["density", "t", "lambda", "normalize", "rescale",
                                                                   "gamma", "epsilon", "seed", "select_topk", "eps",
                                                                   "weight", "max_iter", "convention"]),
       value=settings_values)
def test_any_option_value_gives_a_result_or_a_layerwise_error(method, name, value):
    with_base, n, options = _needs(method)
    gen = torch.Generator().manual_seed(0)
    sds = [{"layers.0.w": torch.randn(3, 2, generator=gen), "layers.1.w": torch.randn(3, 2, generator=gen)}
           for _ in range(n + 1)]
    options[name] = value
    try:
        out = lw.merge(sds[0] if with_base else None, sds[1:], method, **options)
    except lw.LayerwiseError:
        return
    assert all(t.shape == sds[0][k].shape for k, t in out.items())


def test_average_into_leaves_the_model_untouched_when_the_result_does_not_fit():
    a, b, into = nn.Linear(2, 3), nn.Linear(2, 3), nn.Sequential(nn.Linear(2, 3))
    into_bias = nn.Linear(2, 2)
    for target in (into, into_bias):
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(lw.MergeError, match="nothing was loaded"):
            lw.average([a, b], into=target)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_the_readme_table_is_the_registry():
    from pathlib import Path

    from layerwise._merge_methods import methods_markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert methods_markdown() in readme, "regenerate the README table with _merge_methods.methods_markdown()"


def test_weights_may_be_a_tensor_and_dtypes_may_be_named():
    a, b = {"w": T([1.0, 2.0])}, {"w": T([3.0, 6.0])}
    out = lw.merge(None, [a, b], weights=torch.tensor([1.0, 3.0]), dtype="bf16", compute_dtype="fp64")["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [2.5, 5.0]
    with pytest.raises(lw.LayerwiseError, match="not a floating dtype"):
        lw.merge(None, [a, b], dtype=torch.int64)


@pytest.mark.parametrize("size, error, match", [(1.5, lw.OptionTypeError, "whole bytes"), (-5, lw.OptionError, "at least one byte"),
                                                 ("0MB", lw.OptionError, "at least one byte"), (True, lw.OptionTypeError, "True")])
def test_bad_shard_sizes_are_refused_before_anything_is_written(tmp_path, size, error, match):
    paths = [lw.save({"w": torch.ones(2) * i}, tmp_path / f"{i}.safetensors") for i in range(2)]
    with pytest.raises(error, match=match):
        lw.merge_files(paths, tmp_path / "out", max_shard_size=size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.safetensors", "1.safetensors"]


def test_cli_lists_every_method_with_its_options_and_takes_options(tmp_path, capsys):
    from layerwise.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = capsys.readouterr().out
    for m in METHODS.values():
        assert f"  {m.name}: " in help_text
        for o in m.options:
            assert o.name in help_text
    paths = [lw.save({f"layers.{i}.w": T([float(j)]) for i in range(3)}, tmp_path / f"{j}.safetensors") for j in (0, 1, 3)]
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--method", "task_arithmetic", "--base", str(paths[0]), str(paths[1]), str(paths[2]),
                 "--option", "lambda=[0, 1]", "--option", "normalize=true", "-o", str(out), "--quiet"]) == 0
    assert [t.item() for t in lw.load(out).values()] == [0.0, 1.0, 2.0]  # mean task vector 2, λ from 0 to 1
    assert main(["merge", "--method", "ties", "--base", str(paths[0]), str(paths[1]), "--option", "gama=1",
                 "-o", str(tmp_path / "bad.safetensors"), "--quiet"]) == 2
    assert "takes no option 'gama'" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(list(METHODS)), shape=st.sampled_from([(), (1,), (2,), (3, 1), (1, 4), (2, 3, 2)]),
       seed=st.integers(0, 2**16), zero=st.booleans())
def test_every_method_keeps_the_shape_and_stays_finite_on_small_and_degenerate_tensors(method, shape, seed, zero):
    with_base, n, options = _needs(method)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen) for _ in range(n + 1)]
    if zero:
        xs[1] = xs[0].clone()  # a model equal to the base: a zero task vector
    try:
        out = merge_tensor(method, xs[1:], xs[0] if with_base else None, opts(method, n, **options), key="w")
    except lw.MergeError as e:  # only multislerp may refuse: directions that cancel out
        assert "cancel out" in str(e)
        return
    assert out.shape == shape and torch.isfinite(out).all(), (method, out)


@settings(max_examples=40, deadline=None)
@example(weights=[0, 0, 0], method="karcher")  # was a ZeroDivisionError
@example(weights=[1, -1, 0], method="karcher")
@given(weights=st.lists(st.one_of(st.floats(), st.integers(-5, 5), st.booleans()), min_size=0, max_size=4),
       method=st.sampled_from(["linear", "task_arithmetic", "ties", "multislerp", "karcher"]))
def test_any_weights_give_a_finite_result_or_a_layerwise_error(weights, method):
    sds = [{"w": torch.randn(4, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    base = sds[0] if METHODS[method].base == "required" else None
    try:
        out = lw.merge(base, sds[1:], method, weights=weights)
    except lw.LayerwiseError:
        return
    assert len(weights) == 3 and torch.isfinite(out["w"]).all()


def test_an_overflowing_merge_is_an_error_but_inputs_holding_inf_merge_as_they_are():
    sds = [{"w": T([1.0, -2.0])}, {"w": T([3.0, 4.0])}, {"w": T([-1.0, 0.5])}]
    assert torch.allclose(lw.merge(None, sds, weights=[1.5e308, 1, 1])["w"], sds[0]["w"])  # normalized first
    with pytest.raises(lw.MergeError, match="overflows torch.float32"):
        lw.merge(sds[0], sds[1:], "task_arithmetic", weights=[1.5e38, 1])
    wide = lw.merge(sds[0], sds[1:], "task_arithmetic", weights=[1.5e38, 1], compute_dtype="fp64", dtype="fp64")["w"]
    assert wide.dtype == torch.float64 and torch.isfinite(wide).all()
    masks = [{"m": T([0.0, -math.inf])}, {"m": T([0.0, -math.inf])}]
    assert lw.average(masks)["m"].tolist() == [0.0, -math.inf]  # an attention-mask buffer stays -inf


@pytest.mark.parametrize("shape", [(64, 48), (512, 300)])  # the second is large enough for the top-k replay
def test_ties_elects_signs_with_the_given_weights_as_mergekit_on_tie_heavy_bf16_inputs(shape):
    # bf16 values make exact cancellations common: 0.6·a + 0.4·b == 0 must elect + as mergekit does,
    # which scaling the weights first (to 1.0 and 0.667) would move off zero. They also tie many
    # entries with the k-th largest magnitude: mergekit's unstable argsort decides which are kept.
    torch.manual_seed(0)
    base, a, b = (torch.randn(*shape).bfloat16().float() * 0.05 for _ in range(3))
    got = lw.merge({"w": base}, [{"w": a}, {"w": b}], "ties", weights=[0.6, 0.4], density=0.5)["w"]

    def magnitude(d, density):  # mergekit's sparsify.magnitude
        mask = torch.zeros_like(d)
        mask.view(-1)[torch.argsort(d.abs().view(-1), descending=True)[: int(density * d.numel())]] = 1
        return d * mask

    deltas = torch.stack([magnitude(a - base, 0.5), magnitude(b - base, 0.5)])
    weights = torch.tensor([0.6, 0.4]).view(-1, 1, 1)
    weighted = deltas * weights
    mask = weighted.sign() == ((weighted.sum(0) >= 0).float() * 2 - 1)
    divisor = (weights * mask).sum(0)
    divisor[divisor == 0] = 1
    assert torch.equal(got, base + (weighted * mask).sum(0) / divisor)


# --------------------------------------------------------------------------- memory of whole-tensor merges (#14.6)


def peak_bytes(fn):
    """The most bytes torch's CPU allocator held at once during fn (its profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = top = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            top = max(top, live)
    return top


@pytest.mark.parametrize("method, options", [
    ("model_stock", {}), ("model_stock", {"filter_wise": True}), ("sce", {}), ("multislerp", {}), ("slerp", {}),
    ("dare_ties", {"density": 0.5}), ("dare_linear", {"density": 0.5}), ("della", {"density": 0.5}),
    ("della_linear", {"density": 0.5}), ("task_arithmetic", {}), ("nuslerp", {}), ("karcher", {}),
    ("ties", {"density": 0.5}), ("breadcrumbs", {"density": 0.5}), ("breadcrumbs_ties", {"density": 0.5}),
    ("sce", {"select_topk": 0.5}), ("sce", {"select_topk": 0.01}), ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True})])
def test_streamed_whole_tensor_merges_hold_the_inputs_the_output_and_slices(monkeypatch, method, options):
    # #14.6: at most (models + 2) x the tensor + 64 MB in merge_files, where the 64 MB are slices of
    # 1M entries. Scaled down here: slices of 4096 entries, so anything of the tensor's size shows.
    monkeypatch.setattr(_merge_sliced, "_SLICE", 4096)
    monkeypatch.setattr(_sparsify, "_CHUNK", 4096)
    monkeypatch.setattr(_replay, "CHUNK", 4096)
    monkeypatch.setattr(_replay, "_SMALL", 1024)
    _sparsify._replay_is_exact(), _merge_sliced._select_is_exact()  # once per process, not per tensor
    n, shape = {"slerp": 1, "nuslerp": 2}.get(method, 3), (512, 1024)
    size = 512 * 1024 * 4
    base = torch.randn(shape)

    def streamed():  # as merge_files reads them: each model's tensor exists from its read on
        for _ in range(n):
            yield torch.randn(shape).mul_(0.01).add_(base)

    o = resolve_options(get_method(method), ["w"], n, options=options)["w"]
    held = peak_bytes(lambda: merge_tensor(method, streamed(), base, o, key="w"))
    # The base was read before the window: the inputs and the output are n + 1 tensors, slices the rest
    # (karcher has no base: its iteration's step is the other tensor).
    # TIES, breadcrumbs and SCE's selection: its one index vector takes the output's place (the last task
    # vector is pruned, the variance's top k chosen, before the output exists).
    assert held <= (n + 1 + (method == "karcher")) * size + (1 << 20), held / size


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della_linear", "task_arithmetic", "breadcrumbs"])
def test_streamed_inputs_are_read_not_overwritten(method):
    # A checkpoint may hand out its cached tensor (a .pt file), and the same file may be given twice.
    torch.manual_seed(0)
    base, a = torch.randn(300, 300), torch.randn(300, 300)
    kept = a.clone()
    o = resolve_options(get_method(method), ["w"], 2, options={} if method == "task_arithmetic" else {"density": 0.5})["w"]
    streamed = merge_tensor(method, (t for t in (a, a)), base, o, key="w")
    assert torch.equal(a, kept)
    assert torch.equal(streamed, merge_tensor(method, [kept, kept], base, o, key="w"))
    bf16 = merge_tensor(method, (t for t in (a.bfloat16(), a.bfloat16())), base, o, key="w")  # copies: reused
    assert torch.equal(bf16, merge_tensor(method, [a.bfloat16().float()] * 2, base, o, key="w"))
