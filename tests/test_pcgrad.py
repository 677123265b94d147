import copy
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import layerwise as lw
from layerwise.errors import GradError

# --------------------------------------------------------------------------- PCGrad


class TwoTasks(nn.Module):
    """A trunk both losses reach, and a head only the second reaches: gradients set by hand."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Parameter(torch.zeros(2))
        self.head = nn.Parameter(torch.zeros(1))

    def losses(self, g1: list[float], g2: list[float], head: float = 0.0) -> list[torch.Tensor]:
        return [self.trunk @ torch.tensor(g1), self.trunk @ torch.tensor(g2) + head * self.head.sum()]


@pytest.mark.parametrize("reduction, expected", [("mean", [0.25, 0.75]), ("sum", [0.5, 1.5])])
def test_pcgrad_projects_two_conflicting_gradients(reduction, expected):
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1 . g2 = -1):
    # g1 -> g1 - (-1 / |g2|^2) g2 = (0.5, 0.5) and g2 -> g2 - (-1 / |g1|^2) g1 = (0, 1).
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 1.0]), model, "trunk", reduction=reduction)
    assert torch.equal(model.trunk.grad, torch.tensor(expected))


def test_pcgrad_leaves_agreeing_gradients_alone():
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 2.0], [3.0, -1.0]), model, "trunk", reduction="sum")
    assert torch.equal(model.trunk.grad, torch.tensor([4.0, 1.0]))


def test_pcgrad_a_parameter_one_loss_does_not_reach_is_zero_for_that_loss():
    # Over (trunk, head): g1 = (1, 0, 0) does not reach the head, g2 = (-1, 0, 1); g1 . g2 = -1.
    # g1 -> g1 + g2 / 2 = (0.5, 0, 0.5) and g2 -> g2 + g1 = (0, 0, 1).
    # The trunk (both reach it) gets the mean, the head (only loss 1 reaches it) the sum.
    model = TwoTasks()
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 0.0], head=1.0), model)
    assert torch.equal(model.trunk.grad, torch.tensor([0.25, 0.0]))
    assert torch.equal(model.head.grad, torch.tensor([1.5]))


def test_pcgrad_outside_the_selection_is_the_plain_sum():
    model = TwoTasks()
    # On the trunk alone, g1 = (1, 0) and g2 = (-1, 0) cancel each other completely.
    lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 0.0], head=3.0), model, "trunk")
    assert torch.equal(model.trunk.grad, torch.zeros(2))
    assert torch.equal(model.head.grad, torch.tensor([3.0]))


def _reference_pcgrad(grads: list[torch.Tensor], orders: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Yu et al.'s algorithm written out directly, with the order of the other tasks given."""
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = g @ grads[j]
            if dot < 0:
                g -= dot / grads[j].square().sum() * grads[j]
        projected.append(g)
    return torch.stack(projected).mean(0)


def test_pcgrad_matches_the_direct_algorithm_in_one_of_the_random_orders():
    torch.manual_seed(0)
    net = nn.Linear(6, 1, bias=False)
    inputs = torch.randn(3, 6, dtype=torch.float64)
    inputs[2] = -inputs[0] - inputs[1]  # make the three tasks conflict
    net.double()
    results = []
    for seed in (0, 0, 1):
        lw.pcgrad([net(x).sum() for x in inputs], net, generator=torch.Generator().manual_seed(seed))
        results.append(net.weight.grad.flatten())
    assert torch.equal(results[0], results[1])  # seeded: reproducible
    candidates = [_reference_pcgrad(list(inputs), orders) for orders in itertools.product(
        *[list(itertools.permutations([j for j in range(3) if j != i])) for i in range(3)])]
    for result in results:
        assert any(torch.allclose(result, c, rtol=1e-12, atol=1e-12) for c in candidates)
    assert len({tuple(c.tolist()) for c in candidates}) > 1  # the order matters here


@given(st.integers(1, 8), st.integers(0, 2 ** 16))
def test_pcgrad_of_two_tasks_conflicts_with_neither(dim, seed):
    # Projected on each other's normal plane, the summed update has g_i . update >= 0 for
    # both tasks (Cauchy-Schwarz): to first order, neither loss goes up.
    g1, g2 = torch.randn(2, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
    lw.pcgrad([w @ g1, w @ g2], nn.ParameterList([w]), reduction="sum")
    for g in (g1, g2):
        assert w.grad @ g >= -1e-12 * g1.norm() * g2.norm()


def test_pcgrad_other_parameters_get_the_gradient_of_the_summed_losses(vit):
    x = torch.randn(4, 5, 12)
    plain = copy.deepcopy(vit)
    plain(x)[:, 0].sum().backward()
    plain(x)[:, 1].sum().backward()
    out = vit(x)
    lw.pcgrad([out[:, 0].sum(), out[:, 1].sum()], vit, "blocks.3")
    for (name, p), q in zip(vit.named_parameters(), plain.parameters()):
        if not name.startswith("blocks.3"):
            torch.testing.assert_close(p.grad, q.grad)


def test_pcgrad_bad_losses_are_named_and_change_nothing():
    model = TwoTasks()
    with pytest.raises(GradError, match="two losses or more, got 1"):
        lw.pcgrad(model.losses([1.0, 0.0], [0.0, 1.0])[:1], model)
    with pytest.raises(GradError, match="loss 1 reaches none of the selected parameters \\('trunk'\\)"):
        lw.pcgrad([model.trunk.sum(), model.head.sum()], model, "trunk")
    with pytest.raises(GradError, match="loss 0 does not require grad"):
        lw.pcgrad([torch.tensor(1.0), model.head.sum()], model)
    with pytest.raises(GradError, match="loss 1 must be a one-element tensor, got shape \\(2,\\)"):
        lw.pcgrad([model.head.sum(), model.trunk * 2], model)
    assert model.trunk.grad is None and model.head.grad is None




def test_pcgrad_generator_must_be_a_torch_generator():
    model = TwoTasks()
    with pytest.raises(lw.OptionTypeError, match="generator must be a torch.Generator"):
        lw.pcgrad(model.losses([1.0, 0.0], [-1.0, 1.0]), model, generator=0)
    assert model.trunk.grad is None


@pytest.mark.parametrize("selected", ["**", "1"])  # the sparse embedding projected, or outside the selection
def test_pcgrad_of_sparse_gradients_equals_that_of_their_dense_equals(selected):
    nets = []
    for sparse in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(5, 3, sparse=sparse), nn.Linear(3, 1))
        x = torch.tensor([1, 3, 1])
        lw.pcgrad([net(x).sum(), -net(x).pow(2).sum()], net, selected, generator=torch.Generator().manual_seed(0))
        nets.append(net)
    for p, q in zip(*(net.parameters() for net in nets)):
        assert torch.allclose(p.grad.to_dense(), q.grad)


def _two_task_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trunk: str) -> dict[str, torch.Tensor]:
    """Three SGD steps of PCGrad on two conflicting task losses over outputs 0-1 and 2."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        out = model(x)
        losses = [(out[:, :2] - y[:, :2]).square().mean(), (out[:, 2:] - y[:, 2:]).square().mean()]
        lw.pcgrad(losses, model, trunk, generator=torch.Generator().manual_seed(step))
        opt.step()
    return {k: v.clone() for k, v in getattr(model, "module", model).state_dict().items()}


def _task_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _task_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)


def _sharded_pcgrad(rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    x, y = (t.chunk(world_size)[rank] for t in _task_batch())  # each rank its share of the global batch
    results = [_two_task_steps(DistributedDataParallel(_task_net(), **options), x, y, "module.0")
               for options in ({}, {"find_unused_parameters": True}, {"static_graph": True})]
    # FSDP2 both ways, and HSDP replicating over the ranks (its shard group alone holds one rank's data)
    for reshard, shape in ((True, (world_size,)), (False, (world_size,)), (True, (world_size, 1))):
        model, mesh = _task_net(), init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")[-len(shape):])
        fully_shard(model[0], mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        _two_task_steps(model, x, y, "0")
        results.append({k: v.full_tensor() for k, v in model.state_dict().items()})
    return results


def test_pcgrad_under_ddp_and_fsdp2_equals_one_process_over_the_global_batch(run_ranks):
    # Under DDP the task gradients were local to each rank: the replicas drifted apart, silently. Under
    # FSDP2 autograd never reaches the sharded parameters: pcgrad said no loss reached any of them.
    want = _two_task_steps(_task_net(), *_task_batch(), "0")
    for rank in run_ranks(_sharded_pcgrad):
        assert len(rank) == 6
        for got in rank:
            for name, value in want.items():
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
