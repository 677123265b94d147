"""A partly-unfrozen run killed and resumed from its checkpoint continues bit-identically.

The checkpoint is what a training script saves: model, optimizer, LR scheduler, GradualUnfreeze
and EMA state dicts, written to a file. The resumed run rebuilds everything as at the start
(layers frozen, wrapped in DDP) and restores in the documented order: the GradualUnfreeze
state before the optimizer's, so the param groups it added exist again.
"""

import torch
from torch import nn

import layerwise as lw

STEPS, KILLED_AT = 8, 5


class Run:
    """Model (a frozen BatchNorm too), AdamW with weight decay, StepLR, GradualUnfreeze, EMA."""

    def __init__(self, ddp: bool = False):
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                                   nn.Linear(5, 2))
        lw.freeze(self.inner, "0", "1", "3")
        prefix = "module." if ddp else ""
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.inner)
        else:
            self.model = self.inner
        self.opt = torch.optim.AdamW(lw.param_groups(self.model), lr=0.05, weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.unfreeze = lw.GradualUnfreeze(self.model, self.opt, {2: prefix + "3", 4: [prefix + "0", prefix + "1"]},
                                           scheduler=self.scheduler, lr=0.02)
        self.ema = lw.EMA(self.inner, decay=0.9, warmup=2)

    def train(self, steps: range, rank: int = 0, world_size: int = 1) -> None:
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
            part = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
            self.unfreeze.step(step)
            self.model.train()
            self.opt.zero_grad()
            torch.nn.functional.mse_loss(self.model(x[part]), y[part]).backward()
            self.opt.step()
            self.scheduler.step()
            self.ema.update()

    def state_dict(self) -> dict:
        return {"model": self.inner.state_dict(), "opt": self.opt.state_dict(), "scheduler": self.scheduler.state_dict(),
                "unfreeze": self.unfreeze.state_dict(), "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["model"])
        self.unfreeze.load_state_dict(state["unfreeze"])  # first: the optimizer's groups must exist
        self.opt.load_state_dict(state["opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.ema.load_state_dict(state["ema"])


def _flat(state) -> dict[str, object]:
    """Every tensor and number of a nested state dict, by path."""
    if isinstance(state, dict):
        return {f"{k}/{path}": v for k, sub in state.items() for path, v in _flat(sub).items()}
    if isinstance(state, (list, tuple)):
        return {f"{i}/{path}": v for i, sub in enumerate(state) for path, v in _flat(sub).items()}
    return {"": state}


def assert_bit_identical(resumed: dict, uninterrupted: dict) -> None:
    got, want = _flat(resumed), _flat(uninterrupted)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def _both_runs(rank: int, world_size: int, path: str) -> tuple[dict, dict]:
    ddp = world_size > 1
    whole = Run(ddp)
    whole.train(range(STEPS), rank, world_size)
    killed = Run(ddp)
    killed.train(range(KILLED_AT), rank, world_size)
    torch.save(killed.state_dict(), f"{path}/rank{rank}.ckpt")
    del killed
    resumed = Run(ddp)
    resumed.load_state_dict(torch.load(f"{path}/rank{rank}.ckpt", weights_only=True))
    resumed.train(range(KILLED_AT, STEPS), rank, world_size)
    assert lw.frozen(resumed.inner) == [] and resumed.inner[1].training
    return resumed.state_dict(), whole.state_dict()


def test_a_resumed_run_continues_bit_identically(tmp_path):
    resumed, whole = _both_runs(0, 1, str(tmp_path))
    assert_bit_identical(resumed, whole)
    assert len(whole["opt"]["param_groups"]) == 2 + 1 + 1  # decay/no-decay, then one group per unfreezing


def test_a_resumed_ddp_run_continues_bit_identically_on_every_rank(run_ranks, tmp_path):
    ranks = run_ranks(_both_runs, str(tmp_path))
    for resumed, whole in ranks:
        assert_bit_identical(resumed, whole)
    # The replicas agree on the weights and the optimizer; BatchNorm statistics are each rank's
    # own until DDP broadcasts rank 0's at the next forward.
    (zero, _), (one, _) = ranks
    assert_bit_identical({"opt": one["opt"], "weights": _weights(one)}, {"opt": zero["opt"], "weights": _weights(zero)})


def _weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state["model"].items() if not k.startswith(("1.running", "1.num_batches"))}
