import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

import layerwise as lw


def make_model(rank: int) -> nn.Module:
    torch.manual_seed(rank)  # different weights on each rank
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())


def average_all(rank, world_size):
    model = make_model(rank)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist.all_reduce(torch.zeros(1))
    lw.average_parameters(model, "!1.bias")
    return before, {k: v.clone() for k, v in model.state_dict().items()}


def test_average_parameters_makes_parameters_equal_to_the_mean(run_ranks):
    (b0, a0), (b1, a1) = run_ranks(average_all)
    for k in b0:
        if k == "1.bias":  # not selected: stays local
            assert torch.equal(a0[k], b0[k]) and torch.equal(a1[k], b1[k])
        else:
            assert torch.allclose(a0[k], (b0[k] + b1[k]) / 2) and torch.equal(a0[k], a1[k]), k
            assert a0[k].dtype == b0[k].dtype


def periodic(rank, world_size):
    model = make_model(rank)
    averager = lw.PeriodicAverager(model, period=3, warmup_steps=2, select="0")
    log = []
    for _ in range(9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank + 1.0)  # the ranks drift apart every step
        model.zero_grad(set_to_none=True)  # no gradients: torch's own averager would skip everything
        due = averager.step()
        total = model[0].weight.detach().clone()
        dist.all_reduce(total)
        log.append((due, torch.allclose(total / world_size, model[0].weight)))
    return log, averager.state_dict()


def test_periodic_averager_averages_only_on_its_period(run_ranks):
    (steps, state), (other, _) = run_ranks(periodic)
    assert [due for due, _ in steps] == [False, False, True, False, False, True, False, False, True]
    assert [equal for _, equal in steps] == [due for due, _ in steps]
    assert state == {"steps": 9} and other == steps


def test_averaging_without_a_process_group_says_what_to_do():
    assert not dist.is_initialized()
    with pytest.raises(lw.LayerwiseError, match="init_process_group"):
        lw.average_parameters(nn.Linear(2, 2))


def _mismatch(rank, case):
    if case == "shape":  # (2, 3) and (3, 2): the same number of elements, silently averaged before
        model = nn.Linear(3, 2) if rank == 0 else nn.Linear(2, 3)
    elif case == "dtype":
        model = nn.Linear(3, 2) if rank == 0 else nn.Linear(3, 2).double()
    else:
        model = nn.Sequential(nn.Linear(3, 2)) if rank == 0 else nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    before = [p.detach().clone() for p in model.parameters()]
    messages = []
    for call in (lambda: lw.average_parameters(model), lambda: lw.PeriodicAverager(model, period=1)):
        try:
            call()
            messages.append(None)
        except lw.DistributedError as e:
            messages.append(str(e))
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return messages, unchanged


def mismatched(rank, world_size, cases):
    return [_mismatch(rank, case) for case in cases]


CASES = {
    "shape": r"weight is \(2, 3\) torch.float32 on rank 0 but \(3, 2\) torch.float32 on rank 1",
    "dtype": r"weight is \(2, 3\) torch.float32 on rank 0 but \(2, 3\) torch.float64 on rank 1",
    "names": r"rank 1 has 1\.weight, rank 0 does not",
}


def test_ranks_that_selected_different_parameters_all_raise_the_same_error(run_ranks):
    r0, r1 = run_ranks(mismatched, list(CASES))
    for match, (m0, same0), (m1, same1) in zip(CASES.values(), r0, r1):
        assert m0 == m1 and all(m is not None and re.search(match, m) for m in m0), m0
        assert same0 and same1


def test_bad_periods_are_named():
    with pytest.raises(lw.OptionTypeError, match="period=1.5"):
        lw.PeriodicAverager(nn.Linear(2, 2), period=1.5)
    with pytest.raises(lw.OptionError, match="warmup_steps=-1"):
        lw.PeriodicAverager(nn.Linear(2, 2), period=2, warmup_steps=-1)


def test_a_group_that_is_not_a_process_group_is_named_when_given():
    with pytest.raises(lw.OptionTypeError, match="PeriodicAverager: group must be a torch.distributed ProcessGroup"):
        lw.PeriodicAverager(nn.Linear(2, 2), period=2, group=[0, 1])  # it failed at the first averaging step
    with pytest.raises(lw.OptionTypeError, match="average_parameters: group must be"):
        lw.average_parameters(nn.Linear(2, 2), group="world")


def test_a_malformed_averager_state_changes_nothing():
    averager = lw.PeriodicAverager(nn.Linear(2, 2), period=2)
    for bad in ({"steps": 1.5}, {"step": 3}, {"steps": -1}, [3]):
        with pytest.raises(lw.StateError, match="steps"):
            averager.load_state_dict(bad)
    averager.load_state_dict({"steps": 4})
    assert averager.state_dict() == {"steps": 4}


def _average_sharded(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(make_model(0).float(), mesh=init_device_mesh("cpu", (world_size,)))
    before = [p.to_local().clone() for p in model.parameters()]
    messages = []
    for call in (lambda: lw.average_parameters(model), lambda: lw.PeriodicAverager(model, period=1)):
        try:
            call()
        except lw.DistributedError as e:
            messages.append(str(e))
    return messages, all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))


def test_averaging_fsdp2_shards_is_refused_on_every_rank_and_changes_nothing(run_ranks):
    # The ranks hold different shards: averaging them mixed unrelated elements (an even shard) or raised
    # DTensor's "cannot flatten unevenly sharded tensor" (an uneven one).
    for messages, unchanged in run_ranks(_average_sharded):
        assert len(messages) == 2 and unchanged
        assert all("0.weight, 0.bias, 1.weight ... are sharded" in m for m in messages), messages


def _wrapped_too_late(rank, world_size):
    """The order mistakes users make around fully_shard; each must raise, never train silently wrong."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    errors = {}
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built on the parameters fully_shard replaces
    ema = lw.EMA(model, decay=0.9)
    lw.freeze(model, "0")
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    for name, call in (("tie", lambda: lw.tie(model, "2.weight", "0.weight")),
                       ("unfreeze", lambda: lw.GradualUnfreeze(model, opt, {1: "0"})),
                       ("ema", ema.update)):
        try:
            call()
        except lw.StateError as e:
            errors[name] = str(e)
    errors["audit"] = [(f.check, len(f.names)) for f in lw.audit(model, opt)]
    built_after = torch.optim.SGD(lw.param_groups(model), lr=0.1)
    lw.GradualUnfreeze(model, built_after, {1: "0"})  # the right order: accepted
    errors["audit after"] = [f.check for f in lw.audit(model, built_after)]
    errors["untied"] = model[2].weight is not model[0].weight
    return errors


def test_wrapping_order_mistakes_under_fsdp2_raise_instead_of_training_silently_wrong(run_ranks):
    # A tie after fully_shard was undone by FSDP2 at the next forward, and a GradualUnfreeze on an optimizer
    # built before it trained stale tensors: both silently.
    for errors in run_ranks(_wrapped_too_late):
        assert "0.weight already sharded by FSDP2" in errors["tie"] and errors["untied"]
        assert "optimizer was built before fully_shard replaced the parameters of FSDPSequential" in errors["unfreeze"]
        assert "0.weight was replaced by a new parameter" in errors["ema"]
        assert ("not-in-model", 4) in errors["audit"] and errors["audit after"] == []
