import hashlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw

from conftest import TiedLM


def digest(sd) -> str:
    h = hashlib.sha256()
    for k, t in sd.items():
        h.update(k.encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def models(n=3, seed=0, factory=lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))):
    torch.manual_seed(seed)
    out = [factory() for _ in range(n)]
    for i, m in enumerate(out):
        for b in m.buffers():
            if not b.is_floating_point():
                b.fill_(10 * (i + 1))
    return out


# --------------------------------------------------------------------------- average


def test_mean_equals_hand_computation_and_int_buffers_are_copied():
    a, b, c = models()
    avg = lw.average([a, b, c])
    for k, t in a.state_dict().items():
        if t.is_floating_point():
            assert torch.allclose(avg[k], (t + b.state_dict()[k] + c.state_dict()[k]) / 3, atol=1e-7), k
    assert avg["1.num_batches_tracked"].item() == 10  # the first model's counter, not 20
    assert avg["1.num_batches_tracked"].dtype == torch.long


def test_weights_are_normalized():
    a, b = models(2)
    avg = lw.average([a, b], weights=[3, 1])
    assert torch.allclose(avg["0.weight"], 0.75 * a[0].weight + 0.25 * b[0].weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    sds = [{"w": (1 + torch.rand(4096, generator=gen)).to(dtype)} for _ in range(7)]
    avg = lw.average(sds)["w"]
    exact = sum(sd["w"].double() for sd in sds) / 7
    naive = sds[0]["w"] / 7
    for sd in sds[1:]:
        naive = naive + sd["w"] / 7
    half_ulp = exact.abs() * torch.finfo(dtype).eps / 2
    assert avg.dtype == dtype
    assert ((avg.double() - exact).abs() <= half_ulp * 1.01).all(), "float32 accumulation rounds once"
    assert ((naive.double() - exact).abs() > half_ulp * 1.01).any(), "naive half accumulation visibly differs"


def test_into_loads_strictly_and_keeps_tied_weights_tied():
    torch.manual_seed(0)
    a, b, target = TiedLM(), TiedLM(), TiedLM()
    avg = lw.average([a, b], into=target)
    assert avg["decoder.weight"] is avg["embed.weight"]
    assert target.decoder.weight is target.embed.weight
    assert torch.allclose(target.embed.weight, (a.embed.weight + b.embed.weight) / 2)


def test_inputs_are_never_modified():
    a, b, c = models()
    before = [digest(m.state_dict()) for m in (a, b, c)]
    for method, kw in [("linear", {}), ("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare", {"density": 0.5})]:
        out = lw.merge(a, [b, c], method, **kw)
        for t in out.values():
            t.add_(1)  # results own their memory: this must not reach the inputs
    lw.merge(None, [b, c], "slerp")
    assert [digest(m.state_dict()) for m in (a, b, c)] == before


# --------------------------------------------------------------------------- merge methods, by hand


def test_task_arithmetic_by_hand():
    base, a, b = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([1.5, 3.0])}
    out = lw.merge(base, [a, b], "task_arithmetic", weights=[1.0, 2.0], scale=0.5)["w"]
    # base + 0.5 * (1*(a-base) + 2*(b-base)) = [1,1] + 0.5*([1,-1] + [1,4])
    assert torch.allclose(out, torch.tensor([2.0, 2.5]))


def test_ties_trims_elects_and_takes_the_disjoint_mean():
    base = {"w": torch.zeros(5)}
    t1 = {"w": torch.tensor([4.0, -1.0, 0.5, 3.0, -2.0])}
    t2 = {"w": torch.tensor([2.0, 3.0, -6.0, -1.0, 0.1])}
    t3 = {"w": torch.tensor([-1.0, 2.0, -1.0, 2.0, 0.2])}
    out = lw.merge(base, [t1, t2, t3], "ties", density=0.6, convention="layerwise")["w"]
    # layerwise 0.1's convention. Trim to the top 3 of 5 magnitudes per task:
    #   t1 -> [4, 0, 0, 3, -2]; t2 -> [2, 3, -6, 0, 0]; t3 -> [-1, 2, -1, 2, 0] (ties at 1 kept)
    # Elected signs of the sums [5, 5, -7, 5, -2]: [+, +, -, +, -]
    # Disjoint means: [(4+2)/2, (3+2)/2, (-6-1)/2, (3+2)/2, -2]
    assert torch.allclose(out, torch.tensor([3.0, 2.5, -3.5, 2.5, -2.0]))


def test_slerp_by_hand_and_colinear_fallback():
    a, b = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    assert torch.allclose(lw.merge(None, [a, b], "slerp", t=0.5)["w"], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(lw.merge(None, [a, b], "slerp", t=1 / 3)["w"],
                          torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    c = {"w": torch.tensor([2.0, 0.0])}  # colinear: plain interpolation
    assert torch.equal(lw.merge(None, [a, c], "slerp", t=0.25)["w"], torch.tensor([1.25, 0.0]))


def test_dare_is_seeded_and_rescales_the_kept_entries():
    base = {"w": torch.zeros(10000)}
    a = {"w": torch.ones(10000)}
    one = lw.merge(base, [a], "dare", density=0.25, seed=3)["w"]
    assert torch.equal(one, lw.merge(base, [a], "dare", density=0.25, seed=3)["w"])
    assert not torch.equal(one, lw.merge(base, [a], "dare", density=0.25, seed=4)["w"])
    assert set(one.unique().tolist()) == {0.0, 4.0}
    assert abs((one != 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(lw.merge(base, [a], "dare", density=1.0)["w"], a["w"])


def test_options_per_layer_and_select():
    a = {"attn.w": torch.ones(2), "mlp.w": torch.ones(2), "head.w": torch.ones(2)}
    b = {"attn.w": torch.full((2,), 3.0), "mlp.w": torch.full((2,), 3.0), "head.w": torch.full((2,), 3.0)}
    out = lw.merge(None, [a, b], "slerp", t={"attn": 0.25, "mlp": 0.75})  # colinear: 1 + 2t
    assert out["attn.w"].tolist() == [1.5, 1.5] and out["mlp.w"].tolist() == [2.5, 2.5]
    assert out["head.w"].tolist() == [2.0, 2.0]  # the default t
    a = {k: torch.zeros(2) for k in a}
    base = {k: torch.full((2,), 5.0) for k in a}
    out = lw.merge(base, [a, b], "linear", select="attn")
    assert out["attn.w"].tolist() == [1.5, 1.5] and out["mlp.w"].tolist() == [5.0, 5.0]


@given(st.integers(1, 4), st.floats(0.05, 1.0))
def test_ties_with_one_model_keeps_its_top_entries(seed, density):
    gen = torch.Generator().manual_seed(seed)
    base, task = {"w": torch.randn(50, generator=gen)}, {"w": torch.randn(50, generator=gen)}
    out = lw.merge(base, [task], "ties", density=density)["w"]
    tau = task["w"] - base["w"]
    kept = (out - base["w"]).abs() > 1e-6
    assert kept.sum() >= int(50 * density)
    assert torch.allclose((out - base["w"])[kept], tau[kept], atol=1e-6)
    if kept.any() and (~kept).any():
        assert tau.abs()[kept].min() >= tau.abs()[~kept].max() - 1e-6


# --------------------------------------------------------------------------- bad input


def test_every_difference_is_listed_at_once():
    a = {"x": torch.zeros(2), "y": torch.zeros(3), "z": torch.zeros(1), "gone": torch.zeros(1)}
    b = {"x": torch.zeros(2), "y": torch.zeros(4), "z": torch.zeros(1, dtype=torch.int64), "new": torch.zeros(1)}
    with pytest.raises(lw.MergeError) as e:
        lw.average([a, b])
    message = str(e.value)
    for part in ("lacks 1 key(s) of model 0: gone", "has 1 key(s) model 0 lacks: new", "y: shape (3,)", "(4,)",
                 "z: dtype torch.float32", "torch.int64", "4 differences"):
        assert part in message, part


@pytest.mark.parametrize("weights, match", [([1.0], "2 models"), ([1.0, -1.0], "sum to zero"),
                                            ([0.0, 0.0], "sum to zero"), ([1.0, float("nan")], "finite"),
                                            ([1e308, 1e308], "overflow")])
def test_bad_weights(weights, match):
    with pytest.raises(lw.MergeError, match=match):
        lw.average(models(2), weights=weights)


def test_bad_methods_and_options():
    a, b, c = models()
    with pytest.raises(lw.MergeError, match="exactly 2 models"):
        lw.merge(None, [a, b, c], "slerp")
    with pytest.raises(lw.MergeError, match="pass base="):
        lw.merge(None, [a, b], "ties")
    with pytest.raises(lw.MergeError, match=r"density=1.5 .* must be in \(0, 1\]"):
        lw.merge(a, [b, c], "ties", density=1.5)
    with pytest.raises(lw.MergeError, match=r"density=0 "):
        lw.merge(a, [b, c], "dare", density={"0": 0})
    with pytest.raises(lw.MergeError, match="choose one of linear"):
        lw.merge(a, [b], "avg")
    with pytest.raises(lw.MergeError, match="unknown merge method 3; choose one of linear"):
        lw.merge(a, [b], 3)  # AttributeError: 'int' object has no attribute 'base'
    with pytest.raises(lw.MergeError, match="takes no option 'density'"):
        lw.merge(a, [b], "task_arithmetic", density=0.5)
    with pytest.raises(lw.SelectionError, match="'attn'"):
        lw.merge(None, [a, b], "slerp", t={"attn": 0.3})
    with pytest.raises(lw.MergeError, match="task_arithmetic: 'scale' and 'lambda_' are the same option; give one"):
        lw.merge(a, [b, c], "task_arithmetic", scale=0.5, lambda_=0.7)  # named 'lambda' and 'lambda' before


# --------------------------------------------------------------------------- greedy soup


def test_greedy_soup_keeps_candidates_while_the_score_does_not_drop():
    weights = [4.0, 0.0, 2.0, 9.0]
    nets = []
    for w in weights:
        net = nn.Linear(1, 1, bias=False)
        nn.init.constant_(net.weight, w)
        nets.append(net)
    calls = []

    def evaluate(model):  # the best weight is 2.5
        calls.append(model.weight.item())
        return -abs(model.weight.item() - 2.5)

    vessel = nn.Linear(1, 1, bias=False)
    soup, chosen = lw.greedy_soup(nets, evaluate, vessel)
    # Alone: 2.0 (0.5 off) > 4.0 (1.5) > 0.0 (2.5) > 9.0 (6.5).
    # {2, 4} = 3.0 (0.5 off, no drop: kept); {2, 4, 0} = 2.0 (0.5 off: kept); {2, 4, 0, 9} = 3.75: dropped.
    assert chosen == [2, 0, 1]
    assert soup["weight"].item() == 2.0 and vessel.weight.item() == 2.0
    assert len(calls) == 4 + 3


# --------------------------------------------------------------------------- review follow-ups


def test_greedy_soup_may_use_a_candidate_as_the_vessel():
    nets = []
    for w in (1.0, 3.0, 10.0):
        net = nn.Linear(1, 1, bias=False)
        nn.init.constant_(net.weight, w)
        nets.append(net)
    soup, chosen = lw.greedy_soup(nets, lambda m: -abs(m.weight.item() - 2.0), nets[0])
    assert chosen == [0, 1] and soup["weight"].item() == 2.0
    assert [n.weight.item() for n in nets[1:]] == [3.0, 10.0]


@pytest.mark.parametrize("bad", [float("nan"), "good", None, torch.ones(2), ZeroDivisionError])
def test_greedy_soup_with_a_failing_evaluate_leaves_the_vessel_as_it_was(bad):
    nets = [nn.Linear(1, 1, bias=False) for _ in range(3)]
    vessel = nn.Linear(1, 1, bias=False)
    held = vessel.weight.detach().clone()
    calls = []

    def evaluate(m):
        calls.append(m.weight.item())
        if len(calls) < 3:
            return -len(calls)
        if bad is ZeroDivisionError:
            raise ZeroDivisionError
        return bad

    with pytest.raises(ZeroDivisionError if bad is ZeroDivisionError else lw.MergeError,
                       match="" if bad is ZeroDivisionError else "evaluate returned .* for candidate 2"):
        lw.greedy_soup(nets, evaluate, vessel)
    assert torch.equal(vessel.weight, held)


def test_ties_keeps_at_least_the_largest_entry_of_a_small_tensor():
    base = {"b": torch.zeros(3)}
    out = lw.merge(base, [{"b": torch.tensor([1.0, 0.5, 0.2])}, {"b": torch.tensor([1.0, 0.1, 0.0])}], "ties", density=0.2)
    assert out["b"].tolist() == [1.0, 0.0, 0.0]  # density 0.2 of 3 entries: the largest survives


def test_a_wrapper_prefix_gets_a_hint():
    torch.manual_seed(0)
    net = nn.Linear(2, 2)
    wrapped = {f"module.{k}": v for k, v in net.state_dict().items()}
    with pytest.raises(lw.MergeError, match="differs only by the prefix 'module.'"):
        lw.average([net, wrapped])


def test_dare_seed_must_be_an_integer():
    with pytest.raises(lw.MergeError, match="seed='x'"):
        lw.merge({"w": torch.zeros(2)}, [{"w": torch.ones(2)}], "dare", seed="x")


def test_della_takes_epsilon_zero_as_mergekit_does():
    # mergekit checks only that density ± epsilon stays in (0, 1): epsilon = 0 keeps each entry with p = density.
    base, a, b = {"w": torch.zeros(6)}, {"w": torch.arange(6.0)}, {"w": -torch.ones(6)}
    out = lw.merge(base, [a, b], "della_linear", weights=[0.5, 2.0], density=1.0, epsilon=0.0, scale=0.9)["w"]
    assert torch.equal(out, 0.9 * (0.5 * torch.arange(6.0) + 2.0 * -torch.ones(6)))
    kept = lw.merge(base, [a], "della_linear", density=0.5, epsilon=0.0, rescale=False)["w"]
    assert set(kept.tolist()) <= set(range(6)) and 0 < (kept != 0).sum() < 6


def test_greedy_soup_names_an_evaluate_that_is_not_a_callable():
    nets = [nn.Linear(1, 1, bias=False) for _ in range(2)]
    vessel = nn.Linear(1, 1, bias=False)
    held = vessel.weight.detach().clone()
    with pytest.raises(lw.OptionTypeError, match="greedy_soup: evaluate must be a callable model -> score, got float"):
        lw.greedy_soup(nets, 0.5, vessel)
    assert torch.equal(vessel.weight, held)


@pytest.mark.parametrize("merge", [lambda ms: lw.average(ms), lambda ms: lw.merge(ms[0], ms[1:], "task_arithmetic")])
def test_a_model_on_the_meta_device_is_named_before_merging(merge):
    models = [nn.Linear(2, 2), nn.Linear(2, 2, device="meta"), nn.Linear(2, 2)]
    with pytest.raises(lw.MergeError, match="'weight' is on the meta device .* materialize the model first"):
        merge(models)


def _soup_member(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # (3, 6): an uneven shard over two ranks
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _sharded_merges(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def sharded(seed):
        model = _soup_member(seed)
        fully_shard(model[0], mesh=init_device_mesh("cpu", (world_size,)))
        return fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))

    base, a, b, into = sharded(0), sharded(1), sharded(2), sharded(3)
    mean = lw.average([a, b], weights=[1.0, 3.0], into=into)  # every rank calls: the shards are gathered
    ties = lw.merge(base, [a, b], "ties", density=0.5)
    return {"mean": mean, "ties": ties, "into": {k: v.full_tensor() for k, v in into.state_dict().items()},
            "local": into[2].weight.to_local().clone()}


def test_merging_fsdp2_models_equals_merging_the_unsharded_ones(run_ranks):
    # The sharded state dicts raised torch's "invalid python storage" (a DTensor has no data pointer).
    members = [_soup_member(seed) for seed in range(3)]
    mean = lw.average(members[1:], weights=[1.0, 3.0])
    ties = lw.merge(members[0], members[1:], "ties", density=0.5)
    for rank, result in enumerate(run_ranks(_sharded_merges)):
        for k in mean:
            assert torch.equal(result["mean"][k], mean[k]) and torch.equal(result["into"][k], mean[k]), k
            assert torch.equal(result["ties"][k], ties[k]), k
        assert torch.equal(result["local"], mean["2.weight"].tensor_split(2)[rank])
