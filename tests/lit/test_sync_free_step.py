"""A training step without host-device syncs (issue 23): a dispatch-mode counter over real ldm-train steps of the
default UNet and of DiT finds none outside the logging steps; and the throughput telemetry's figures."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ldm.train as train_cli
from ldm.lit.syncs import StepSyncCounter, SyncCounter
from ldm.lit.telemetry import ThroughputTelemetry
from ldm.train import train

FAST = ["debug=fast", "logger=csv", "data.batch_size=8"]


def test_sync_counter_sees_value_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        x.sum().item()
        bool(x.max() > 2)
        x.tolist()
        x[x > 2]
        torch.nonzero(x)
    assert syncs.by_op == {"_local_scalar_dense": 2, "Tensor.tolist": 1, "index": 1, "nonzero": 1}
    with SyncCounter() as syncs:
        torch.where(x > 2, x, 0).mul(2).sum()
        torch.bincount((x % 4).long(), minlength=4)
    assert syncs.total == 0


@pytest.mark.parametrize("backbone", [
    ["model/ldm=unet_tiny"],
    # a latent grid other than the one DiT's positions are laid out for: the cached per-grid positions
    ["model/ldm=dit_tiny", "model.ldm.backbone.input_size=16"],
])
def test_training_steps_sync_only_at_logging_steps(tiny_vae_export, compose_cfg, tmp_path, monkeypatch, backbone):
    counter = StepSyncCounter()
    build = train_cli.build_callbacks
    monkeypatch.setattr(train_cli, "build_callbacks", lambda cfg, out: [*build(cfg, out), counter])
    results = train(compose_cfg(["stage=ldm", *backbone, f"first_stage.path={tiny_vae_export}", *FAST,
                                 "stage.final_samples.enabled=false", "stage.max_steps=6", "stage.val_check_interval=6",
                                 "trainer.log_every_n_steps=3", "callbacks.telemetry.peak_tflops=1.0"], tmp_path))
    assert sorted(counter.counts) == [1, 2, 3, 4, 5, 6]
    outside = {step: dict(counter.ops[step]) for step in (1, 2, 4, 5) if counter.counts[step]}
    assert outside == {}, f"host syncs in training steps outside the logging steps: {outside}"
    # The logging steps do read values (the progress bar, the NaN guard's counts): the counter sees them.
    assert counter.counts[3] > 0 and counter.counts[6] > 0
    # What those steps logged: loss per timestep quarter, and throughput figures that add up.
    assert all(math.isfinite(results[f"train/loss_t{b}"]) for b in range(4))
    assert results["perf/samples_per_s"] > 0 and 0 <= results["perf/data_wait"] < 1
    assert results["perf/mfu"] == pytest.approx(results["perf/tflops_per_s"] / 1.0)
    assert results["perf/peak_mem_gib"] > 0


def test_dit_builds_the_positions_of_another_grid_once():
    from ldm.nets.dit import DiT, sincos_pos_embed_2d

    dit = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2)
    first = dit.positions(2, 3)
    assert dit.positions(2, 3) is first and dit.positions(4, 4) is dit.pos_embed
    torch.testing.assert_close(first, sincos_pos_embed_2d(32, 2, 3, 4, 4), rtol=0, atol=0)


def test_text_encoder_drops_captions_on_the_device():
    from ldm.nets.conditioners.text import FrozenTextEncoder, embedded_minilm_path

    encoder = FrozenTextEncoder(embedded_minilm_path(), max_length=16)
    captions = ["a seven", "a one", "a zero"]
    drop = torch.tensor([False, True, False])
    with SyncCounter() as syncs:
        out = encoder.encode(captions, drop)
    assert syncs.by_op["Tensor.tolist"] == 0
    expected = encoder.encode(["a seven", "", "a zero"], torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- telemetry on a model whose FLOPs are known -------------------------------------------------------------
class SlowData(Dataset):
    """Each sample takes 20 ms to load: a data-bound loop."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.full((32,), float(i))


class OneLinear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 16, bias=False)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_telemetry_counts_the_step_flops_and_sees_a_data_bound_loop(tmp_path):
    telemetry = ThroughputTelemetry(peak_tflops=1.0)
    trainer = pl.Trainer(max_steps=9, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=4,
                         callbacks=[telemetry], default_root_dir=tmp_path)
    trainer.fit(OneLinear(), DataLoader(SlowData(), batch_size=4))
    # forward x @ W^T (2 * 32 * 16 per sample) and the weight's gradient (as many); the input needs no gradient
    assert telemetry.flops_per_sample == 2 * (2 * 32 * 16)
    figures = telemetry.last
    assert figures["perf/data_wait"] > 0.5  # 80 ms of loading per batch against microseconds of compute
    assert 4 / 0.08 * 0.3 < figures["perf/samples_per_s"] < 4 / 0.08 * 1.05  # at most 50 samples/s
    assert figures["perf/mfu"] == pytest.approx(figures["perf/samples_per_s"] * telemetry.flops_per_sample / 1e12)
