"""Scale-out and precision: DDP over 2 CPU processes keeps EMA weights identical on every rank,
gradient accumulation equals one big batch, bf16-mixed trains on CPU, chunked VAE coding is exact,
and the speed switches keep the key layout (FSDP with EMA runs for real in test_distributed.py)."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule
from ldm.lit.ema import EMAConfig
from ldm.lit.latent_diffusion import LatentDiffusionModule, SpeedConfig
from ldm.model import FirstStage, LatentDiffusion
from ldm.nets.autoencoder import AutoencoderKL
from ldm.nets.conditioners import ClassEmbedder, Conditioner
from ldm.nets.unet import TransformerSpec, UNetModel

REPO = Path(__file__).resolve().parents[1]
FAST = ["debug=fast", "logger=csv"]


# ---------------------------------------------------------------------------------------------
# DDP over two CPU processes (trainer=ddp_sim), through the real `ldm-train` entry point


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankStateWriter(pl.Callback):
    """Test-only: each rank writes what it trained on and the weights it ended with."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.first_batch: str | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = hashlib.sha256(batch["image"].cpu().numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "ema_updates": int(pl_module.ema.num_updates),
            "ema": state_hash(pl_module.ema.model),
            "unet": state_hash(pl_module.model.backbone),
            "first_batch": self.first_batch,
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_ldm_train(overrides: list[str], timeout: float) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{REPO}")
    cmd = [sys.executable, "-m", "ldm.train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"ldm-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run_ldm_train(["stage=vae", *FAST, "data.batch_size=16", f"hydra.run.dir={out}"], timeout=300)
    return out / "export"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_sim_keeps_ema_identical_on_both_ranks(stage1_export, tmp_path):
    run_ldm_train(
        ["stage=ldm", "trainer=ddp_sim", "model/ldm=unet_tiny", f"first_stage.path={stage1_export}", *FAST,
         "data.batch_size=8", "trainer.accumulate_grad_batches=2", "stage.final_samples.enabled=false",
         "stage.module.ema.decay=0.9", "stage.module.ema.warmup_steps=1", f"hydra.run.dir={tmp_path}",
         "+callbacks.rank_state._target_=test_scale.RankStateWriter", f"+callbacks.rank_state.folder={tmp_path}"],
        timeout=600,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [4, 4] and [r["ema_updates"] for r in ranks] == [4, 4]
    # The ranks saw different data (distributed sampler) ...
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    # ... yet hold identical live weights (all-reduced gradients) and hence identical EMA weights.
    assert ranks[0]["unet"] == ranks[1]["unet"]
    assert ranks[0]["ema"] == ranks[1]["ema"]
    assert ranks[0]["ema"] != ranks[0]["unet"]  # the average lags the live weights: it was really averaged
    # The global batch is spelled out: 8 per device x 2 processes x 2 accumulated.
    hparams = (tmp_path / "csv" / "hparams.yaml").read_text()
    assert "global: 32" in hparams and "accumulate_grad_batches: 2" in hparams and "world_size: 2" in hparams


# ---------------------------------------------------------------------------------------------
# one process: a tiny module built directly


class PerSampleObjective(DiffusionObjective):
    """Timesteps and noise are functions of each sample alone, so a sample adds the same loss term
    whichever batch it is in: accumulation and one big batch must then give the same gradient."""

    def sample_timesteps(self, batch_size, like, generator=None):
        return (like.flatten(1).sum(1).abs() * 997).long() % self.schedule.num_train_timesteps

    def sample_noise(self, x0, generator=None):
        return torch.sin(13.0 * x0 + 1.0)


def tiny_module(optimizer, ema: EMAConfig | None = None, **kwargs) -> LatentDiffusionModule:
    torch.manual_seed(0)
    unet = UNetModel(3, 3, 32, (1, 2), 1, TransformerSpec(attention_resolutions=(2,), num_heads=2, context_dim=16))
    with torch.no_grad():  # zero-initialised output layers would leave most parameters without gradient
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ddconfig = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=3, attn_resolutions=[], in_channels=1,
                    out_ch=1, resolution=32, dropout=0.0, double_z=True, use_mid_attn=False, norm_num_groups=8)
    first_stage = FirstStage(AutoencoderKL(ddconfig, embed_dim=3), scale_factor=1.0, sample_posterior=False)
    conditioner = Conditioner([ClassEmbedder(10, embed_dim=16, drop_rate=0.0)])
    objective = PerSampleObjective(NoiseSchedule(kind="linear", num_train_timesteps=1000))
    model = LatentDiffusion(unet, conditioner, first_stage, objective)
    return LatentDiffusionModule(model, optimizer, lr=0.5, ema=ema, **kwargs)


def latent_batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    return [
        {"latent_mean": torch.randn(3, 4, 4, generator=gen), "latent_std": torch.zeros(3, 4, 4), "label": i % 10}
        for i in range(n)
    ]


def fit(module, data, batch_size: int, steps: int, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=batch_size, shuffle=False))
    return trainer


def test_gradient_accumulation_of_k_batches_equals_one_batch_of_k_times_b():
    k, b, steps = 2, 2, 2
    data = latent_batches(k * b * steps)
    # Plain SGD: its step is linear in the gradient, so a wrongly scaled accumulation would show.
    sgd = functools.partial(torch.optim.SGD, momentum=0.0)
    reference = tiny_module(sgd, ema=EMAConfig(decay=0.9, warmup_steps=1))
    accumulated, big = copy.deepcopy(reference), copy.deepcopy(reference)
    fit(accumulated, data, batch_size=b, steps=steps, accumulate_grad_batches=k)
    fit(big, data, batch_size=k * b, steps=steps)
    moved = max((p - q).abs().max().item() for p, q in zip(big.model.backbone.parameters(), reference.model.backbone.parameters()))
    assert moved > 1e-3
    for (name, p), q in zip(accumulated.model.backbone.named_parameters(), big.model.backbone.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-4, msg=name)
    # The EMA averages once per optimizer step, not once per micro-batch.
    assert int(accumulated.ema.num_updates) == int(big.ema.num_updates) == steps
    for p, q in zip(accumulated.ema.model.parameters(), big.ema.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-4)


def test_bf16_mixed_trains_on_cpu_with_an_fp32_loss():
    module = tiny_module(functools.partial(torch.optim.AdamW), ema=EMAConfig(decay=0.9, warmup_steps=1))
    module.lr = 1e-3
    seen = {}

    def record_unet_dtype(module, inputs, output) -> None:
        seen.setdefault("unet", output.dtype)

    module.model.backbone.out.register_forward_hook(record_unet_dtype)

    class LossDtype(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.setdefault("loss", outputs["loss"].dtype)

    trainer = fit(module, latent_batches(6), batch_size=2, steps=3, precision="bf16-mixed", callbacks=[LossDtype()])
    assert seen == {"unet": torch.bfloat16, "loss": torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(p).all() for p in module.ema.model.parameters())
    assert all(p.dtype == torch.float32 for p in module.model.backbone.parameters())  # master weights stay fp32


def test_chunked_first_stage_coding_equals_whole_batch():
    module = tiny_module(functools.partial(torch.optim.SGD))
    first_stage = module.model.first_stage
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    whole_z, whole_x = first_stage.encode(images), first_stage.decode(first_stage.encode(images))
    first_stage.chunk_size = 2  # 2 + 2 + 1
    torch.testing.assert_close(first_stage.encode(images), whole_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first_stage.decode(whole_z), whole_x, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        FirstStage(first_stage.autoencoder, 1.0, chunk_size=0)


def test_speed_options_compile_only_the_training_unet_and_keep_the_key_layout():
    plain = tiny_module(functools.partial(torch.optim.SGD), ema=EMAConfig())
    fast = tiny_module(functools.partial(torch.optim.SGD), ema=EMAConfig(),
                       speed=SpeedConfig(compile_unet=True, channels_last=True, vae_chunk_size=4))
    # Compiled when Lightning configures the model (per FSDP unit under FSDP, before sharding; whole otherwise).
    assert fast.model.backbone._compiled_call_impl is None
    fast.configure_model()
    # nn.Module.compile is lazy and in place: nothing compiles here, and no `_orig_mod.` key prefix appears.
    assert fast.model.backbone._compiled_call_impl is not None and fast.ema.model._compiled_call_impl is None
    assert list(fast.state_dict()) == list(plain.state_dict())
    conv = fast.model.backbone.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.model.first_stage.chunk_size == 4
