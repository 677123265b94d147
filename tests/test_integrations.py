"""The Lightning and Hugging Face callbacks, each in a real Trainer on the CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import layerwise as lw


def toy_data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


# --------------------------------------------------------------------------- Lightning


def test_lightning_callback_freezes_unfreezes_monitors_and_swaps_the_ema_for_validation(tmp_path):
    import lightning.pytorch as pl  # the dev extra installs it: CI runs this test, never skips it

    from layerwise.integrations.lightning import LayerwiseCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.head = nn.Linear(8, 2)
            self.epoch_start_weights, self.ema_in_validation, self.restored, self.grad_norms = [], [], [], []

        def forward(self, x):
            return self.head(self.encoder(x))

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, _):
            ema = self.trainer.callbacks[0].ema
            self.ema_in_validation.append(torch.equal(self.head.weight, ema.shadow[ema.names.index("head.weight")]))

        def on_train_batch_end(self, *_):
            self.last_trained = self.head.weight.detach().clone()

        def on_before_optimizer_step(self, optimizer):
            self.grad_norms.append(self.head.weight.grad.norm().item())

        def on_train_epoch_start(self):
            self.epoch_start_weights.append(self.encoder[0].weight.detach().clone())

        def on_train_epoch_end(self):  # runs after the epoch's validation
            self.restored.append(torch.equal(self.head.weight, self.last_trained))

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(lw.param_groups(self, lr=1e-2, weight_decay=0.1))
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)]

    torch.manual_seed(0)
    module = Module()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    callback = LayerwiseCallback(freeze="encoder", unfreeze_schedule={2: "encoder.0"}, grad_monitor={"every": 2},
                                 ema=0.5)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(toy_data(), batch_size=8), DataLoader(toy_data(16), batch_size=8))

    final = module.state_dict()
    for key in ("encoder.1.weight", "encoder.1.running_mean", "encoder.1.num_batches_tracked"):
        assert torch.equal(final[key], initial[key]), f"{key} stayed frozen"
    assert torch.equal(module.epoch_start_weights[2], initial["encoder.0.weight"]), "frozen for epochs 0 and 1"
    assert not torch.equal(final["encoder.0.weight"], initial["encoder.0.weight"]), "trained after unfreezing"
    held = {n for g in trainer.optimizers[0].param_groups for n in g["names"]}
    assert {"encoder.0.weight", "encoder.0.bias"} <= held, "frozen after configure_optimizers: held, skipped"
    logged = {r["step"]: r["grad_norm"] for r in callback.monitor.history if r["layer"] == "head.weight"}
    assert sorted(logged) == [0, 2, 4, 6, 8, 10]
    assert logged == {s: pytest.approx(module.grad_norms[s], rel=1e-5) for s in logged}, "this step's gradients"
    assert module.ema_in_validation and all(module.ema_in_validation)
    assert module.restored == [True, True, True]


class _Metrics:
    """A Lightning logger that keeps what it is given: {step: {key: value}}."""

    def __new__(cls):
        from lightning.pytorch.loggers.logger import Logger

        class Keep(Logger):
            name, version = "keep", 0

            def __init__(self):
                super().__init__()
                self.steps: dict[int, dict[str, float]] = {}

            def log_metrics(self, metrics, step=None):
                self.steps.setdefault(step, {}).update(metrics)

            def log_hyperparams(self, *args, **kwargs):
                pass

        return Keep()


def test_lightning_grad_keys_log_what_lightnings_grad_norm_utility_gives(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import grad_norm

    from layerwise.integrations.lightning import LayerwiseCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.reference = nn.Linear(4, 8), nn.Linear(8, 2), {}

        def training_step(self, batch, _):
            return F.cross_entropy(self.head(torch.relu(self.body(batch[0]))), batch[1])

        def on_before_optimizer_step(self, optimizer):  # where Lightning's docs call grad_norm
            self.reference[self.trainer.global_step] = {k: v.item() for k, v in grad_norm(self, norm_type=2).items()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module, logger = Module(), _Metrics()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=logger, log_every_n_steps=2,
                         callbacks=[LayerwiseCallback(grad_monitor=True, grad_keys="lightning")],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(toy_data(), batch_size=8))  # 4 steps, logged at 0 and 2
    logged = {step: {k: v for k, v in metrics.items() if k.startswith("grad_2.0_norm")}
              for step, metrics in logger.steps.items()}
    logged = {step: m for step, m in logged.items() if m}
    assert list(logged) == [0, 2]
    for step, metrics in logged.items():
        assert metrics == pytest.approx(module.reference[step], rel=1e-5)
    with pytest.raises(lw.OptionError, match="grad_keys='pl'"):
        LayerwiseCallback(grad_keys="pl")

def test_lightning_unfrozen_layers_get_columns_from_their_first_step_their_options_a_warmup_and_resume(tmp_path):
    import lightning.pytorch as pl

    from layerwise.integrations.lightning import LayerwiseCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
            self.applied = []  # (global step, lr the step applied to encoder.weight, measured from Δw = -lr·g)

        def forward(self, x):
            return self.head(torch.relu(self.encoder(x)))

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def on_before_optimizer_step(self, optimizer):  # inside step(): after the callback's pre-step hook
            self._before = (self.encoder.weight.detach().clone(), None if self.encoder.weight.grad is None
                            else self.encoder.weight.grad.clone())

        def on_train_batch_end(self, *_):
            w, g = self._before
            if g is not None and g.abs().max() > 0:
                self.applied.append((self.trainer.global_step - 1,
                                     ((w - self.encoder.weight.detach()).norm() / g.norm()).item()))

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)  # one group, plain SGD: Δw = -lr·g
            return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)]

    def fit(epochs: int, ckpt_path=None, save: bool = False):
        torch.manual_seed(0)
        module, logger = Module(), _Metrics()
        callback = LayerwiseCallback(freeze="encoder", unfreeze_schedule={1: "encoder"}, unfreeze_options={"lr": 0.04},
                                     unfreeze_warmup_steps=4, unfreeze_warmup_ratio=0.25, grad_monitor=True,
                                     ema=0.5, ema_apply_at_end=True)
        saving = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")] if save else []
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, callbacks=[callback, *saving], logger=logger,
                             enable_checkpointing=save,
                             log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, num_sanity_val_steps=0)
        trainer.fit(module, DataLoader(toy_data(), batch_size=8), ckpt_path=ckpt_path)  # 4 steps an epoch
        return module, logger, callback, trainer

    module, logger, callback, trainer = fit(3)
    # Epoch 1 (steps 4-7): base lr 0.04 at the schedule's 0.5, warmed up 0.25 → 1 over 4 steps; epoch 2 at 0.25.
    expected = [0.04 * 0.5 * (0.25 + 0.75 * k / 4) for k in range(4)] + [0.04 * 0.25] * 4
    assert [step for step, _ in module.applied] == list(range(4, 12)), "encoder frozen through epoch 0"
    assert [lr for _, lr in module.applied] == pytest.approx(expected, rel=1e-4)
    assert len(trainer.optimizers[0].param_groups) == 1 and trainer.optimizers[0].param_groups[0]["lr"] == 0.0125
    first = {key: min(s for s, metrics in logger.steps.items() if key in metrics)
             for key in ("grad_norm/head.weight", "grad_norm/encoder.weight")}
    assert first == {"grad_norm/head.weight": 0, "grad_norm/encoder.weight": 4}, "columns from the first trained step"
    shadow = dict(zip(callback.ema.names, callback.ema.shadow))
    assert all(torch.equal(p, shadow[n]) for n, p in module.named_parameters()), "EMA weights kept at the end"

    fit(2, save=True)  # a checkpoint after epoch 1: the encoder unfrozen, its 4 warm-up steps taken
    resumed_module, _, resumed, _ = fit(3, ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert resumed.ema.num_updates == 12 and resumed.plan.unfrozen.state_dict() == {1: 8}
    assert all(torch.equal(x, y) for x, y in zip(resumed.ema.shadow, callback.ema.shadow)), "as if never stopped"
    assert [lr for _, lr in resumed_module.applied] == pytest.approx([0.04 * 0.25] * 4, rel=1e-4)


# --------------------------------------------------------------------------- Hugging Face


class Tokens(Dataset):
    def __init__(self, n: int):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 30, (n, 8), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": (self.ids[i, 0] > 15).long()}


def test_hf_trainer_callback_freezes_unfreezes_monitors_and_swaps_the_ema_for_evaluation(tmp_path):
    import transformers  # the dev extra installs it: CI runs this test, never skips it

    from layerwise.integrations.hf import LayerwiseTrainerCallback

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ours = LayerwiseTrainerCallback(freeze=["bert.embeddings", "bert.encoder.layer.0"],
                                    unfreeze_schedule={1: "bert.encoder.layer.0"}, grad_monitor=2, ema=0.5)

    class Probe(transformers.TrainerCallback):
        """Runs before ours: sees the training weights at step end, the EMA weights during evaluation."""

        def __init__(self):
            self.during_eval, self.restored, self.layer0_at_epoch = [], [], []

        def on_epoch_begin(self, args, state, control, model=None, **kw):
            self.layer0_at_epoch.append(model.bert.encoder.layer[0].output.dense.weight.detach().clone())

        def on_step_end(self, args, state, control, model=None, **kw):
            self.trained = model.classifier.weight.detach().clone()

        def on_prediction_step(self, args, state, control, **kw):
            ema = ours.ema
            self.during_eval.append(torch.equal(model.classifier.weight, ema.shadow[ema.names.index("classifier.weight")]))

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step:
                self.restored.append(torch.equal(model.classifier.weight, self.trained))

    probe = Probe()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        eval_strategy="steps", eval_steps=3, learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True, logging_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(16), eval_dataset=Tokens(8),
                                   callbacks=[probe, ours])
    ours.set_trainer(trainer)
    trainer.train()

    final = model.state_dict()
    embeddings = [k for k in initial if k.startswith("bert.embeddings.")]
    assert embeddings and all(torch.equal(final[k], initial[k]) for k in embeddings)
    layer0 = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(probe.layer0_at_epoch[1], initial[layer0]), "frozen through epoch 0"
    assert not torch.equal(final[layer0], initial[layer0]), "trained once unfrozen at epoch 1"
    assert all(p.requires_grad for p in lw.select(model, "bert.encoder.layer.0").params())
    assert trainer.lr_scheduler.get_last_lr()[0] < 1e-2, "the LR schedule ran on"
    assert sorted({r["step"] for r in ours.monitor.history}) == [2, 4, 6], "the Trainer's global steps"
    assert probe.during_eval and all(probe.during_eval)
    assert probe.restored and all(probe.restored)
    assert torch.equal(model.classifier.weight, probe.trained), "training weights back after the last evaluation"


def _tiny_bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def test_hf_trainer_logs_unfrozen_layers_from_their_first_step_warms_them_up_and_resumes_the_ema(tmp_path):
    import transformers

    from layerwise.integrations.hf import STATE_FILE, LayerwiseTrainerCallback

    layer0 = "bert.encoder.layer.0.output.dense.weight"

    class Probe(transformers.TrainerCallback):
        """After ours: the lr each optimizer step applies to layer 0 and to the classifier, and what on_log gets
        (what every report_to integration gets)."""

        def __init__(self, ours):
            self.ours, self.lrs, self.logged = ours, [], []

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            self.ema_at_start = {k: v.clone() for k, v in self.ours.ema.state_dict()["shadow"].items()}
            params = dict(model.named_parameters())

            def record(opt, *_):
                lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
                self.lrs.append((lr_of[id(params[layer0])], lr_of[id(params["classifier.weight"])],
                                 len(opt.param_groups)))

            self.hook = optimizer.optimizer.register_step_pre_hook(record)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logged.append((state.global_step, dict(logs)))

    def run(resume: bool):
        model = _tiny_bert()
        ours = LayerwiseTrainerCallback(freeze="bert.encoder.layer.0", unfreeze_schedule={1: "bert.encoder.layer.0"},
                                        unfreeze_options={"weight_decay": 0.0}, unfreeze_warmup_steps=2,
                                        unfreeze_warmup_ratio=0.25, grad_monitor=True, ema=0.5, ema_apply_at_end=True)
        probe = Probe(ours)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", weight_decay=0.1, report_to=[], save_strategy="steps", save_steps=3,
            logging_steps=2, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(16))
        trainer.add_callback(ours.set_trainer(trainer))
        trainer.add_callback(probe)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3") if resume else None)
        return model, ours, probe, trainer

    model, ours, probe, trainer = run(resume=False)
    # 4 steps an epoch: layer 0 trains from global step 5 (epoch 1), warmed up over 2 steps from 0.25 × lr.
    assert [lr for lr, _, _ in probe.lrs] == [1e-2] * 4 + [2.5e-3, 6.25e-3] + [1e-2] * 2
    assert [lr for _, lr, _ in probe.lrs] == [1e-2] * 8, "the rest of its group keeps its lr"
    # Inside step() layer 0 has groups of its own (its weights' and its no-decay ones' options, with
    # unfreeze_options over them); between steps the optimizer has the Trainer's two groups.
    assert [groups for *_, groups in probe.lrs] == [2] * 4 + [4] * 4
    assert len(trainer.optimizer.param_groups) == 2 and len(trainer.optimizer.state_dict()["param_groups"]) == 2

    history = {row["step"]: row for row in trainer.state.log_history if "grad_norm/classifier.weight" in row}
    assert sorted(history) == [2, 4, 6, 8], "every logging_steps, on the Trainer's global step"
    own = [r["step"] for r in trainer.state.log_history if {"loss", "grad_norm", "learning_rate"} <= r.keys()]
    assert own == [2, 4, 6, 8], "the Trainer's own logs of those steps are kept (our log once cleared should_log)"
    assert [s for s in history if f"grad_norm/{layer0}" in history[s]] == [6, 8], "from its first trained step"
    monitored = {r["step"]: r["grad_norm"] for r in ours.monitor.history if r["layer"] == "classifier.weight"}
    assert {s: history[s]["grad_norm/classifier.weight"] for s in history} == monitored
    assert [s for s, logs in probe.logged if "grad_norm/classifier.weight" in logs] == [2, 4, 6, 8], \
        "on_log, hence every report_to integration, gets them"

    shadow = dict(zip(ours.ema.names, ours.ema.shadow))
    assert all(torch.equal(p, shadow[n]) for n, p in model.named_parameters() if n in shadow), "EMA kept at the end"
    saved = torch.load(tmp_path / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert saved["ema"]["num_updates"] == 3 and saved["unfreeze"] == {"done": []}

    resumed_model, resumed, resumed_probe, _ = run(resume=True)
    assert all(torch.equal(resumed_probe.ema_at_start[n], t) for n, t in saved["ema"]["shadow"].items()), \
        "EMA restored at step 3"
    assert resumed.ema.num_updates == 8, "3 restored + 5 after the resume"
    shadow = dict(zip(resumed.ema.names, resumed.ema.shadow))
    assert all(torch.equal(p, shadow[n]) for n, p in resumed_model.named_parameters() if n in shadow)


def test_ema_and_unfreezing_progress_resume_from_the_callback_state(interleaved):
    from layerwise.integrations._core import Plan

    lw.freeze(interleaved, "lstm1")
    optimizer = torch.optim.SGD(lw.param_groups(interleaved, lr=0.1))
    plan = Plan(unfreeze_schedule={1: "lstm1"}, ema={"decay": 0.5})
    plan.optimizer_ready(interleaved, optimizer)
    plan.epoch_started(1)
    with torch.no_grad():
        interleaved.linear.weight.add_(1.0)
    plan.optimizer_stepped()
    state = plan.state_dict()

    torch.manual_seed(0)
    fresh = type(interleaved)()
    lw.freeze(fresh, "lstm1")
    fresh_optimizer = torch.optim.SGD(lw.param_groups(fresh, lr=0.1))
    resumed = Plan(unfreeze_schedule={1: "lstm1"}, ema={"decay": 0.5})
    resumed.load_state_dict(state)  # before the optimizer exists, as Lightning restores callbacks
    resumed.optimizer_ready(fresh, fresh_optimizer)
    assert lw.frozen(fresh) == [] and len(fresh_optimizer.param_groups) == len(optimizer.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow, plan.ema.shadow))


@pytest.mark.parametrize("bad", [{"ema": {"decay": 2.0}}, {"grad_monitor": {"every": 0}},
                                 {"unfreeze_schedule": {1: "no_such_layer"}}, {"freeze": "no_such_layer"}])
def test_a_bad_option_at_fit_start_leaves_model_and_optimizer_as_they_were(interleaved, bad):
    from layerwise.integrations._core import Plan

    optimizer = torch.optim.SGD(interleaved.parameters(), lr=0.1)
    before = {n: p.requires_grad for n, p in interleaved.named_parameters()}
    hooks = (dict(optimizer._optimizer_step_pre_hooks), dict(optimizer._optimizer_step_post_hooks))
    plan = Plan(**{"freeze": "lstm1", "grad_monitor": 1, "ema": 0.9, "unfreeze_schedule": {2: "lstm1"},
                   "unfreeze_options": {"lr": 0.01}, **bad})
    with pytest.raises(lw.LayerwiseError):
        plan.optimizer_ready(interleaved, optimizer)
    assert {n: p.requires_grad for n, p in interleaved.named_parameters()} == before  # nothing frozen
    assert (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks) == hooks  # nothing hooked
    assert plan.monitor is None and plan.ema is None and plan.unfreezer is None


@pytest.mark.parametrize("missing, extra, load", [
    ("lightning.pytorch", "lightning", lambda: __import__("layerwise.integrations.lightning")),
    ("transformers", "hf", lambda: __import__("layerwise.integrations.hf")),
    ("tensorboard", "tensorboard", lambda: lw.TensorBoardSink("/tmp")),
])
def test_a_missing_extra_names_the_pip_install_that_fixes_it(monkeypatch, missing, extra, load):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # as if the package were not installed
    for name in ("layerwise.integrations.lightning", "layerwise.integrations.hf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'layerwise\[{extra}\]'"):
        load()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import sys

    net = nn.Linear(2, 1)
    monitor = lw.GradMonitor(net, every=1)
    net(torch.ones(1, 2)).sum().backward()
    monitor.step()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'layerwise\[plot\]'"):
        monitor.plot(tmp_path / "g.png")


@pytest.mark.parametrize("options, error", [
    ({"unfreeze_warmup_steps": -1}, lw.OptionError), ({"unfreeze_warmup_steps": 2.5}, lw.OptionTypeError),
    ({"unfreeze_warmup_ratio": 0.0}, lw.OptionError), ({"unfreeze_warmup_ratio": "0.1"}, lw.OptionTypeError),
    ({"ema_apply_at_end": True}, lw.OptionError), ({"ema_apply_at_end": 1}, lw.OptionTypeError),
    ({"grad_monitor": "yes"}, lw.OptionTypeError), ({"ema": [0.999]}, lw.OptionTypeError),  # ValueError, TypeError
])
def test_callback_options_are_checked_when_made(options, error):
    from layerwise.integrations._core import Plan

    with pytest.raises(error, match=next(iter(options))):
        Plan(unfreeze_schedule={1: "x"}, **options)


def test_a_step_that_raises_leaves_the_optimizer_groups_as_built():
    from layerwise.integrations._unfrozen import UnfrozenGroups

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    unfrozen = UnfrozenGroups(optimizer, {"lr": 0.01}, warmup_steps=0, warmup_ratio=0.1)
    unfrozen.add(1, list(net[0].parameters()))
    built = optimizer.state_dict()["param_groups"]

    def closure():
        raise FloatingPointError("a loss went NaN")

    with pytest.raises(FloatingPointError):
        optimizer.step(closure)
    assert optimizer.state_dict()["param_groups"] == built and len(optimizer.param_groups) == 1
    net(torch.ones(1, 2)).sum().backward()
    before = net[0].weight.detach().clone()
    optimizer.step()
    assert torch.allclose(net[0].weight, before - 0.01 * net[0].weight.grad), "the options' lr applied"
    assert len(optimizer.param_groups) == 1 and unfrozen.state_dict() == {1: 1}
