import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerwise as lw


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_steps(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 5, 4, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad(set_to_none=False)  # keep zero grads around: the stale-gradient trap
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
])
def test_frozen_tensors_are_bit_identical_after_training(interleaved, make_opt):
    opt = make_opt(interleaved.parameters())
    train_steps(interleaved, opt, 3)  # momentum, Adam moments and gradients now exist
    lw.freeze(interleaved, "lstm2", "norm")
    before = snapshot(interleaved)
    train_steps(interleaved, opt, 5, seed=1)
    after = snapshot(interleaved)
    frozen = [k for k in before if k.startswith(("lstm2.", "norm."))]
    assert "norm.running_mean" in frozen and "norm.num_batches_tracked" in frozen
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"{k} moved while frozen"
    for k in ("lstm1.weight_ih_l0", "linear.weight", "linear.bias"):
        assert not torch.equal(before[k], after[k]), f"{k} should train"


def test_requires_grad_alone_lets_weight_decay_move_a_frozen_weight(interleaved):
    """The trap freeze() avoids: a stale gradient plus AdamW keeps moving the weight."""
    opt = torch.optim.AdamW(interleaved.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(interleaved, opt, 3)
    interleaved.lstm2.requires_grad_(False)  # the hand-written freeze
    before = interleaved.lstm2.weight_hh_l0.detach().clone()
    train_steps(interleaved, opt, 2, seed=1)
    assert not torch.equal(before, interleaved.lstm2.weight_hh_l0)


def test_freeze_clears_gradients_and_returns_the_selection(interleaved):
    interleaved(torch.randn(2, 3, 4)).sum().backward()
    sel = lw.freeze(interleaved, "lstm2")
    assert sel.names() == ["lstm2.weight_ih_l0", "lstm2.weight_hh_l0", "lstm2.bias_ih_l0", "lstm2.bias_hh_l0"]
    assert all(p.grad is None and not p.requires_grad for p in interleaved.lstm2.parameters())
    assert interleaved.lstm1.weight_ih_l0.grad is not None
    assert lw.frozen(interleaved) == sel.names()


def test_interleaved_layers_get_no_gradient_and_the_others_do(interleaved):
    lw.freeze(interleaved, "lstm2")
    interleaved(torch.randn(2, 3, 4)).sum().backward()
    assert all(p.grad is None for p in interleaved.lstm2.parameters())
    assert all(p.grad is not None for p in [*interleaved.lstm1.parameters(), *interleaved.linear.parameters()])


def test_norm_statistics_stay_fixed_through_train_mode(convbn):
    lw.freeze(convbn, "features")
    stats = {k: v.clone() for k, v in convbn.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(stats) == 6  # two BatchNorms, one of them affine=False
    convbn.train()
    for _ in range(3):
        convbn(torch.randn(4, 1, 8, 8))
    for k, v in convbn.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    assert not convbn.features[1].training and not convbn.features[4].training
    assert convbn.classifier.training


def test_a_norm_whose_parameters_are_all_frozen_is_frozen(convbn):
    lw.freeze(convbn, "features.1.weight", "features.1.bias")
    assert not convbn.train().features[1].training
    # The affine=False norm has no parameters and its enclosing module still trains.
    assert convbn.features[4].training


def test_type_norm_and_a_parameterless_norm_path_can_be_frozen(convbn):
    lw.freeze(convbn, "features.4")  # BatchNorm2d(affine=False): no parameter, no error
    assert not convbn.train().features[4].training and convbn.features[1].training
    lw.unfreeze(convbn)
    lw.freeze(convbn, "type:norm")
    assert not convbn.train().features[1].training and not convbn.features[4].training


def test_norm_stats_train_opts_out(convbn):
    lw.freeze(convbn, "features", norm_stats="train")
    convbn.train()
    before = convbn.features[1].running_mean.clone()
    convbn(torch.randn(4, 1, 8, 8))
    assert not torch.equal(before, convbn.features[1].running_mean)
    with pytest.raises(ValueError, match="norm_stats"):
        lw.freeze(convbn, norm_stats="keep")


def test_unfreeze_restores_training_and_statistics(convbn):
    reference = copy.deepcopy(convbn)
    lw.freeze(convbn, "features")
    convbn.eval()
    lw.unfreeze(convbn, "features")
    assert lw.frozen(convbn) == []
    assert all(p.requires_grad for p in convbn.parameters())
    convbn.train()
    reference.train()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(convbn(x), reference(x))
    assert torch.equal(convbn.features[1].running_mean, reference.features[1].running_mean)
    assert "train" not in convbn.features[1].__dict__


def test_unfreeze_follows_the_parent_mode():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    lw.freeze(net)
    net.train()
    lw.unfreeze(net)
    assert net[1].training


def test_frozen_prefix_skips_its_backward(interleaved):
    seen = []
    interleaved.lstm1.register_forward_hook(lambda m, i, out: seen.append(out[0].requires_grad))
    lw.freeze(interleaved, "lstm1")
    interleaved(torch.randn(2, 3, 4)).sum().backward()
    # Nothing before lstm2 needs a gradient, so autograd records no graph for lstm1 at all.
    assert seen == [False]


def test_frozen_model_deep_copies_and_pickles(convbn):
    lw.freeze(convbn, "features")
    for clone in (copy.deepcopy(convbn), pickle.loads(pickle.dumps(convbn))):
        assert not clone.train().features[1].training
        lw.unfreeze(clone)
        assert clone.train().features[1].training
    assert not convbn.train().features[1].training  # the original is untouched


def test_missing_selector_is_an_error_unless_missing_ok(interleaved):
    with pytest.raises(lw.SelectionError, match="lstm3"):
        lw.freeze(interleaved, "lstm3")
    assert lw.frozen(interleaved) == []
    assert len(lw.freeze(interleaved, "lstm3", missing_ok=True)) == 0


def test_freeze_everything_but(interleaved):
    lw.freeze(interleaved, "!linear")
    assert [n for n, p in interleaved.named_parameters() if p.requires_grad] == ["linear.weight", "linear.bias"]


# --------------------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreeze_adds_each_layer_once_with_its_options(interleaved):
    lw.freeze(interleaved, "lstm1", "lstm2")
    opt = torch.optim.SGD(lw.param_groups(interleaved), lr=0.1, momentum=0.9)
    schedule = lw.GradualUnfreeze(interleaved, opt, {1: "lstm2", 3: ["lstm1"]}, lr=0.01)
    assert schedule.step(0) == []
    assert schedule.step(1) == lw.select(interleaved, "lstm2").names()
    assert schedule.step(1) == [] and schedule.step(2) == []
    assert opt.param_groups[-1]["lr"] == 0.01 and opt.param_groups[-1]["momentum"] == 0.9  # given, inherited
    assert schedule.step(5) == lw.select(interleaved, "lstm1").names()
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(held) == len(set(held)) == len(list(interleaved.parameters()))
    assert lw.frozen(interleaved) == []
    train_steps(interleaved, opt, 1)


def test_gradual_unfreeze_does_not_re_add_what_the_optimizer_holds(interleaved):
    opt = torch.optim.SGD(interleaved.parameters(), lr=0.1)
    lw.freeze(interleaved, "lstm2")
    schedule = lw.GradualUnfreeze(interleaved, opt, {2: "lstm2"})
    assert schedule.step(2) == [] and len(opt.param_groups) == 1
    assert lw.frozen(interleaved) == []


def test_gradual_unfreeze_checks_selectors_up_front_and_resumes(interleaved):
    opt = torch.optim.SGD(interleaved.linear.parameters(), lr=0.1)
    with pytest.raises(lw.SelectionError, match="lstm9"):
        lw.GradualUnfreeze(interleaved, opt, {1: "lstm9"})
    lw.freeze(interleaved, "lstm1", "lstm2")
    schedule = lw.GradualUnfreeze(interleaved, opt, {1: "lstm2", 2: "lstm1"})
    schedule.step(1)
    state = schedule.state_dict()

    torch.manual_seed(0)
    fresh = type(interleaved)()
    lw.freeze(fresh, "lstm1", "lstm2")
    fresh_opt = torch.optim.SGD(fresh.linear.parameters(), lr=0.1)
    resumed = lw.GradualUnfreeze(fresh, fresh_opt, {1: "lstm2", 2: "lstm1"})
    resumed.load_state_dict(state)
    assert lw.frozen(fresh) == lw.frozen(interleaved)
    assert [g.get("names") for g in fresh_opt.param_groups] == [g.get("names") for g in opt.param_groups]


@pytest.mark.parametrize("args, options, error, message", [
    (("sgd",), {}, lw.OptionTypeError, "GradualUnfreeze takes the torch.optim.Optimizer to extend, got str"),
    ((), {"lr": -1.0}, lw.OptionError, "GradualUnfreeze sets lr=-1.0"),
    ((), {"lrr": 0.1}, lw.OptionError, "GradualUnfreeze sets 'lrr', which SGD does not take"),
])
def test_gradual_unfreeze_checks_the_new_group_when_made_not_when_it_fires(interleaved, args, options, error, message):
    opt = torch.optim.SGD(interleaved.linear.parameters(), lr=0.1)
    lw.freeze(interleaved, "lstm2")
    with pytest.raises(error, match=message):
        lw.GradualUnfreeze(interleaved, *(args or (opt,)), {3: "lstm2"}, **options)


@pytest.mark.parametrize("state", [{}, None, {"done": [[1], [7]]}, {"done": [[1], [1]]}, {"done": [["1"]]},
                                   {"done": [1, 2]}])
def test_gradual_unfreeze_refuses_a_foreign_state_before_replaying_any_of_it(interleaved, state):
    lw.freeze(interleaved, "lstm1", "lstm2")
    opt = torch.optim.SGD(interleaved.linear.parameters(), lr=0.1)
    schedule = lw.GradualUnfreeze(interleaved, opt, {1: "lstm2", 2: "lstm1"})
    with pytest.raises(lw.StateError, match="GradualUnfreeze.load_state_dict takes"):
        schedule.load_state_dict(state)
    assert len(opt.param_groups) == 1 and sorted(lw.frozen(interleaved)) == sorted(
        n for n, _ in interleaved.named_parameters() if n.startswith("lstm"))
    schedule.step(1)
    with pytest.raises(lw.StateError, match="has stepped already"):
        schedule.load_state_dict(schedule.state_dict())


def test_a_misspelt_negation_is_an_error_not_a_silent_freeze(interleaved):
    with pytest.raises(lw.SelectionError) as e:
        lw.freeze(interleaved, "lstm2", "!lstm2.wieght_ih_l0")
    assert "'!lstm2.wieght_ih_l0'" in str(e.value) and "lstm2.weight_ih_l0" in str(e.value)
    assert lw.frozen(interleaved) == []


def test_unfreeze_takes_the_selectors_freeze_takes(convbn):
    lw.freeze(convbn, "type:BatchNorm2d")
    assert not convbn.train().features[4].training
    lw.unfreeze(convbn, "type:BatchNorm2d")  # also the parameterless (affine=False) one
    assert convbn.train().features[4].training


def test_unfreeze_returns_a_norm_to_the_mode_it_had():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    net.train()
    net[1].eval()  # kept in eval on purpose
    lw.freeze(net, "1")
    lw.unfreeze(net, "1")
    assert net.training and not net[1].training, "exactly as before freezing"
    lw.freeze(net, "1")
    net.eval()  # the model's mode changed meanwhile: the norm follows it
    lw.unfreeze(net, "1")
    assert not net[1].training
    lw.freeze(net, "1")
    net.train()
    lw.unfreeze(net, "1")
    assert net[1].training


@pytest.mark.parametrize("make, expected", [
    # closed form on the group's initial lr: 0.1 * 0.5 ** epoch
    (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.5 ** e), 0.1 * 0.5 ** 3),
    # chainable: halves from the lr it joined with, at each of the two steps after it joined
    (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), 0.1 * 0.5 ** 2),
    (lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=1),
                                                         torch.optim.lr_scheduler.ExponentialLR(o, 0.5)],
                                                     milestones=[1]), 0.1 * 0.5 ** 2),
])
def test_gradual_unfreeze_extends_lr_schedulers(make, expected):
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lw.freeze(net, "1")
    opt = torch.optim.SGD(net[0].parameters(), lr=1.0)
    scheduler = make(opt)
    schedule = lw.GradualUnfreeze(net, opt, {1: "1"}, scheduler=scheduler, lr=0.1)
    opt.step(), scheduler.step()
    schedule.step(1)
    for _ in range(2):
        opt.step(), scheduler.step()  # without scheduler=, torch refuses the group it does not know
    assert opt.param_groups[1]["lr"] == pytest.approx(expected)
    assert len(scheduler.get_last_lr()) == 2


def test_gradual_unfreeze_refuses_a_scheduler_it_cannot_extend():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lw.freeze(net, "1")
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="OneCycleLR .* unfreeze in place"):
        lw.GradualUnfreeze(net, opt, {1: "1"}, scheduler=scheduler).step(1)


def test_gradual_unfreeze_handles_names_that_look_like_selectors():
    net = nn.ModuleDict({"a b": nn.Linear(2, 2), "c": nn.Linear(2, 2)})
    lw.freeze(net, "re:a b\\..*")
    opt = torch.optim.SGD(net["c"].parameters(), lr=0.1)
    assert lw.GradualUnfreeze(net, opt, {1: "re:a b\\..*"}).step(1) == ["a b.weight", "a b.bias"]
    assert lw.frozen(net) == [] and len(opt.param_groups) == 2


def test_gradual_unfreeze_resumes_steps_that_unfroze_several_entries(interleaved):
    def make():
        torch.manual_seed(0)
        model = type(interleaved)()
        lw.freeze(model, "lstm1", "lstm2")
        return model, torch.optim.SGD(model.linear.parameters(), lr=0.1)

    model, opt = make()
    schedule = lw.GradualUnfreeze(model, opt, {1: "lstm2", 2: "lstm1"})
    schedule.step(5)  # both entries in one step: one group
    fresh, fresh_opt = make()
    resumed = lw.GradualUnfreeze(fresh, fresh_opt, {1: "lstm2", 2: "lstm1"})
    resumed.load_state_dict(schedule.state_dict())
    assert [g.get("names") for g in fresh_opt.param_groups] == [g.get("names") for g in opt.param_groups]
    fresh_opt.load_state_dict(opt.state_dict())


def unfreeze_under_a_process_group(rank, world_size):
    import warnings

    net = nn.Linear(2, 2)
    lw.freeze(net)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lw.unfreeze(net)
    return [str(w.message) for w in caught]


def test_unfreezing_under_torch_distributed_warns_about_ddp(run_ranks):
    (messages,) = run_ranks(unfreeze_under_a_process_group, world_size=1)
    assert any("pass the wrapper" in m for m in messages)


# --------------------------------------------------------------------------- validation, all or nothing


@pytest.mark.parametrize("key, error", [(1.7, lw.OptionTypeError), ("1", lw.OptionTypeError), (True, lw.OptionTypeError),
                                        (-1, lw.OptionError)])
def test_gradual_unfreeze_schedule_keys_are_non_negative_ints(key, error):
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lw.freeze(net, "1")
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    with pytest.raises(error, match="schedule keys are epochs or steps"):
        lw.GradualUnfreeze(net, opt, {key: "1"})
    with pytest.raises(lw.OptionTypeError, match="GradualUnfreeze.step takes the epoch"):
        lw.GradualUnfreeze(net, opt, {1: "1"}).step("1")


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=10),
    # the first inner scheduler could be extended, the second cannot: neither may change
    lambda o: torch.optim.lr_scheduler.SequentialLR(o, [torch.optim.lr_scheduler.ConstantLR(o, 0.5, total_iters=1),
                                                        torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1)],
                                                    milestones=[1]),
])
def test_a_gradual_unfreeze_step_that_fails_changes_nothing(make):
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    lw.freeze(net, "1", "2")
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    scheduler = make(opt)
    inner = getattr(scheduler, "_schedulers", [scheduler])
    before = copy.deepcopy([{k: v for k, v in vars(s).items() if k != "optimizer"} for s in inner])
    schedule = lw.GradualUnfreeze(net, opt, {1: "1", 2: "2"}, scheduler=scheduler)
    with pytest.raises(lw.OptionError, match="cannot be extended"):
        schedule.step(2)
    assert lw.frozen(net) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert not net.train()[1].training and len(opt.param_groups) == 1 and schedule.state_dict() == {"done": []}
    after = [{k: v for k, v in vars(s).items() if k != "optimizer"} for s in inner]
    assert repr(after) == repr(before)


# --------------------------------------------------------------------------- DDP


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))


def _batches(steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(steps)]


def _train_unfreezing(model: nn.Module, prefix: str, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Layers 0 and 2 frozen, unfrozen at steps 2 and 3, layer 4 frozen at step 4; SGD with momentum."""
    opt = torch.optim.SGD(lw.param_groups(model, weight_decay=0.01), lr=0.1, momentum=0.9)
    schedule = lw.GradualUnfreeze(model, opt, {2: prefix + "2", 3: prefix + "0"}, lr=0.05)
    for step, (x, y) in enumerate(_batches()):
        schedule.step(step)
        if step == 4:
            lw.freeze(model, prefix + "4")
        opt.zero_grad()
        part = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)  # this rank's share
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()
    inner = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _ddp_unfreezing(rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel

    results = []
    for options in ({}, {"static_graph": True}):
        model = _mlp()
        lw.freeze(model, "0", "2")
        ddp = DistributedDataParallel(model, **options)
        results.append(_train_unfreezing(ddp, "module.", rank, world_size))
    # Everything frozen (no reducer can be built over nothing), a forward, then one layer back.
    lw.freeze(ddp)
    ddp(torch.ones(2, 3))
    lw.unfreeze(ddp, "module.4.bias")
    ddp(torch.full((2, 3), float(rank))).sum().backward()
    results.append({"4.bias.grad": model[4].bias.grad.clone()})
    return results


def test_unfreezing_and_freezing_a_ddp_model_equals_one_process_over_the_global_batch(run_ranks):
    ranks = run_ranks(_ddp_unfreezing)
    model = _mlp()
    lw.freeze(model, "0", "2")
    expected = _train_unfreezing(model, "")
    for default, static_graph in (r[:2] for r in ranks):
        for name, value in expected.items():
            torch.testing.assert_close(default[name], value, rtol=1e-6, atol=1e-6, msg=name)
            torch.testing.assert_close(static_graph[name], value, rtol=1e-6, atol=1e-6, msg=name)
    for name in expected:
        assert torch.equal(ranks[0][0][name], ranks[1][0][name]), name  # the replicas never drift apart
    assert torch.equal(ranks[0][2]["4.bias.grad"], ranks[1][2]["4.bias.grad"])  # all-reduced after a full freeze


# --------------------------------------------------------------------------- FSDP2


def _train_fsdp_style(model: nn.Module, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """One fully_shard unit: layer 0 frozen throughout, 2.weight unfrozen at step 1, 4.bias frozen at step 2."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    snapshot = {}
    for step, (x, y) in enumerate(_batches(4)):
        if step == 1:
            lw.unfreeze(model, "2.weight")
        if step == 2:
            lw.freeze(model, "4.bias")
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items() if k == "4.bias"}
        opt.zero_grad()
        shares = [rank] if world_size > 1 else [0, 1]  # one process does both ranks' halves, averaged
        for r in shares:
            part = slice(r * 4, r * 4 + 4)
            (torch.nn.functional.mse_loss(model(x[part]), y[part]) / len(shares)).backward()
        opt.step()
    gather = (lambda v: v.full_tensor()) if world_size > 1 else (lambda v: v)
    return {"final": {k: gather(v.detach()).clone() for k, v in model.state_dict().items()},
            "at_freeze": {k: gather(v) for k, v in snapshot.items()}}


def _fsdp_freezing(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    lw.freeze(model, "0", "2.weight")
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return _train_fsdp_style(model, rank, world_size)


def test_freezing_inside_one_fsdp2_unit_keeps_frozen_weights_bit_identical(run_ranks):
    ranks = run_ranks(_fsdp_freezing)
    model = _mlp()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    lw.freeze(model, "0", "2.weight")
    expected = _train_fsdp_style(model, 0, 1)
    for result in ranks:
        final = result["final"]
        assert torch.equal(final["0.weight"], initial["0.weight"]) and torch.equal(final["0.bias"], initial["0.bias"])
        assert torch.equal(final["4.bias"], result["at_freeze"]["4.bias"])  # frozen mid-run: not one ulp since
        assert not torch.equal(final["2.weight"], initial["2.weight"])  # unfrozen mid-run: it trained
        for name, value in expected["final"].items():
            torch.testing.assert_close(final[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_a_bad_norm_stats_is_an_option_error_and_freezes_nothing(interleaved):
    with pytest.raises(lw.OptionError, match="norm_stats must be 'freeze' or 'train'"):
        lw.freeze(interleaved, "lstm1", norm_stats="fixed")
    assert lw.frozen(interleaved) == []


def test_unfreeze_leaves_integer_parameters_frozen_and_refuses_them_alone():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[0].register_parameter("codes", nn.Parameter(torch.arange(4), requires_grad=False))  # a quantized weight
    lw.freeze(net)
    lw.unfreeze(net)  # RuntimeError half-way before: 0.weight unfrozen, 0.bias and 1 left frozen
    assert lw.frozen(net) == ["0.codes"]
    lw.freeze(net)
    with pytest.raises(lw.SelectionError, match="unfreeze: 0.codes holds torch.int64 values, which cannot require"):
        lw.unfreeze(net, "0.codes")
    assert len(lw.frozen(net)) == 5


def test_gradual_unfreeze_names_a_scheduler_that_is_none_when_given():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    lw.freeze(net, "1")
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    with pytest.raises(lw.OptionTypeError, match="scheduler=<class .*StepLR'> is not an LR scheduler"):
        lw.GradualUnfreeze(net, opt, {1: "1"}, scheduler=torch.optim.lr_scheduler.StepLR)  # the class, not one
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, 1.0, total_steps=10)  # refused only if a group is added
    assert lw.GradualUnfreeze(net, opt, {1: "1"}, scheduler=one_cycle).schedulers == [one_cycle]
