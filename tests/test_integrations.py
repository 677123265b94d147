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
    trainer.train()

    final = model.state_dict()
    embeddings = [k for k in initial if k.startswith("bert.embeddings.")]
    assert embeddings and all(torch.equal(final[k], initial[k]) for k in embeddings)
    layer0 = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(probe.layer0_at_epoch[1], initial[layer0]), "frozen through epoch 0"
    assert not torch.equal(final[layer0], initial[layer0]), "trained once unfrozen at epoch 1"
    assert all(p.requires_grad for p in lw.select(model, "bert.encoder.layer.0").params())
    assert trainer.lr_scheduler.get_last_lr()[0] < 1e-2, "the LR schedule ran on"
    assert sorted({r["step"] for r in ours.monitor.history}) == [0, 2, 4]
    assert probe.during_eval and all(probe.during_eval)
    assert probe.restored and all(probe.restored)
    assert torch.equal(model.classifier.weight, probe.trained), "training weights back after the last evaluation"


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
