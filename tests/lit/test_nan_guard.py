"""NonFiniteGuard on tiny models: a bad step never reaches the weights or the optimizer state, under automatic
and manual optimisation; `skip` counts and goes on, `stop` (or too many skips in a row) raises with the step,
the loss terms and a checkpoint of the last good weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm.lit.nonfinite import NonFiniteGuard, NonFiniteLossError


def poison(loss: torch.Tensor, layer: nn.Linear, kind: str) -> torch.Tensor:
    if kind == "loss":
        return loss * float("nan")
    # Finite value (0), non-finite gradient: d/dw sqrt(|w - w|) = inf * 0 = nan.
    return loss + (layer.weight - layer.weight.detach()).abs().sqrt().sum()


class Tiny(pl.LightningModule):
    """AdamW with weight decay on a linear layer: any update, even from zero gradients, would move the weights."""

    def __init__(self, bad_steps=(), kind: str = "loss", fused: bool = False) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.bad_steps, self.kind, self.fused = set(bad_steps), kind, fused
        self.weights: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        if self.global_step in self.bad_steps:
            loss = poison(loss, self.layer, self.kind)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.weights[self.global_step] = self.layer.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1, fused=self.fused)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


class TinyManual(pl.LightningModule):
    """Two optimizers stepped by hand, as the stage-1 autoencoder + discriminator are."""

    def __init__(self, bad_steps=()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)
        self.bad_steps = set(bad_steps)
        self.batches = 0

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss_a = self.a(batch).pow(2).mean()
        if self.batches in self.bad_steps:
            loss_a = loss_a * float("inf")
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = self.b(batch).pow(2).mean()
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        opt_b.step()
        self.log_dict({"train/loss_a": loss_a, "train/loss_b": loss_b})
        self.batches += 1

    def configure_optimizers(self):
        return [torch.optim.Adam(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.1)]

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), batch_size=4)


def fit(module: pl.LightningModule, guard: NonFiniteGuard, tmp_path, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard, *callbacks], default_root_dir=tmp_path, **kwargs,
    )
    trainer.fit(module)
    return trainer


def adam_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    return [int(state["step"]) for state in optimizer.state.values()]


@pytest.mark.parametrize(("kind", "found"), [("loss", "loss and gradient"), ("grad", "gradient")])
def test_skip_leaves_weights_and_optimizer_alone_and_counts(tmp_path, caplog, kind, found):
    module = Tiny(bad_steps={1}, kind=kind)
    with caplog.at_level("WARNING", logger="ldm.reliability"):
        trainer = fit(module, NonFiniteGuard(policy="skip", dirpath=str(tmp_path)), tmp_path, max_steps=4)
    w = module.weights
    assert torch.equal(w[2], w[1])  # the bad second step (global_step 1 -> 2) moved nothing, not even weight decay
    assert not torch.equal(w[3], w[2]) and not torch.equal(w[4], w[3])  # the good ones did
    assert adam_steps(trainer.optimizers[0]) == [3, 3]  # weight and bias: 4 batches, 3 real steps
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert f"non-finite {found} at step 2 (train/loss=" in caplog.text
    assert torch.isfinite(module.layer.weight).all()


def test_stop_raises_with_step_and_loss_terms_and_checkpoints_the_last_good_weights(tmp_path):
    module = Tiny(bad_steps={2})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss and gradient at step 3 \(train/loss=nan\); stopped by .*policy=stop") as err:
        fit(module, NonFiniteGuard(policy="stop", dirpath=str(tmp_path)), tmp_path, max_steps=10)
    ckpt_path = tmp_path / "nonfinite-step0000003.ckpt"
    assert str(ckpt_path) in str(err.value)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["layer.weight"], module.weights[2])  # the weights before the bad step
    assert ckpt["callbacks"]["NonFiniteGuard"]["skipped"] == 1


def test_too_many_skips_in_a_row_stop_the_run(tmp_path):
    module = Tiny(bad_steps=set(range(100)))
    initial = module.layer.weight.detach().clone()
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .*max_consecutive_skips=2.*diverged"):
        fit(module, NonFiniteGuard(policy="skip", max_consecutive_skips=2, dirpath=str(tmp_path)), tmp_path, max_steps=10)
    assert (tmp_path / "nonfinite-step0000003.ckpt").is_file()
    assert torch.equal(module.layer.weight, initial)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_fused_adamw_skips_on_the_device_and_the_host_reads_counts_at_logging_steps(tmp_path, caplog, kind):
    from ldm.lit.syncs import StepSyncCounter

    module = Tiny(bad_steps={1}, kind=kind, fused=True)
    counter = StepSyncCounter()
    with caplog.at_level("WARNING", logger="ldm.reliability"):
        trainer = fit(module, NonFiniteGuard(policy="skip", dirpath=str(tmp_path)), tmp_path, max_steps=6,
                      callbacks=[counter], log_every_n_steps=3)
    w = module.weights
    assert torch.equal(w[2], w[1])  # the bad second step moved nothing, not even weight decay
    assert all(not torch.equal(w[s + 1], w[s]) for s in (2, 3, 4, 5))
    assert adam_steps(trainer.optimizers[0]) == [5, 5]  # fused AdamW took back its step count
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    found = "loss and gradient" if kind == "loss" else "gradient"
    assert f"non-finite {found} at step 2: 1 step(s) skipped since the last check (step 3)" in caplog.text
    assert {step: n for step, n in counter.counts.items() if n} == {3: 1, 6: 1}  # the guard read its counts there only


def test_device_side_skips_in_a_row_stop_the_run_at_the_next_check(tmp_path):
    module = Tiny(bad_steps=set(range(100)), fused=True)
    initial = module.layer.weight.detach().clone()
    guard = NonFiniteGuard(policy="skip", max_consecutive_skips=2, dirpath=str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="non-finite loss and gradient at step 1 .*4 steps in a row .*diverged"):
        fit(module, guard, tmp_path, max_steps=10, log_every_n_steps=4)
    assert (tmp_path / "nonfinite-step0000001.ckpt").is_file()
    assert torch.equal(module.layer.weight, initial)


def test_manual_optimisation_skips_only_the_bad_optimizer(tmp_path):
    module = TinyManual(bad_steps={1})
    trainer = fit(module, NonFiniteGuard(policy="skip"), tmp_path, max_steps=8)  # 4 batches x 2 optimizers
    opt_a, opt_b = trainer.optimizers
    assert adam_steps(opt_a) == [3, 3] and adam_steps(opt_b) == [4, 4]
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_skip_count_survives_a_checkpoint_round_trip():
    guard = NonFiniteGuard()
    guard.skipped, guard.consecutive = 5, 2
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped, other.consecutive) == (5, 2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        NonFiniteGuard(policy="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips must be >= 0"):
        NonFiniteGuard(max_consecutive_skips=-1)
