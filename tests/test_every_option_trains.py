"""Options that tests/test_config.py only composes, built and trained for one optimizer step.

Composition catches a misspelt key; it does not catch a module that cannot run (a wrong channel count, a
tokenizer that needs a download, a scheduler that divides by zero). Each option here is built from its yaml
through Hydra and takes one step on a tiny batch in-process (no data set-up, no export), except the loggers
and callbacks, which only exist inside ``ldm-train`` and so go through ``train()`` for one step.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.config import ConfigError, instantiate_checked
from ldm.train import check_config, train

# One step, one validation batch, no final samples: the cheapest complete ldm-train run.
ONE_STEP = ["stage.max_steps=1", "stage.val_check_interval=1", "+trainer.limit_val_batches=1", "data.batch_size=4",
            "trainer.log_every_n_steps=1"]
STAGE2 = ["stage=ldm", "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0"]


def images(channels: int = 1, size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def fit_one_step(cfg, batch: dict) -> pl.LightningModule:
    """Build ``stage.module`` from ``cfg`` and take one optimizer step on ``batch``; the trainable weights
    must move and the loss must be finite."""
    check_config(cfg)
    module = instantiate_checked(cfg.stage.module, "stage.module")
    before = {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         default_root_dir=cfg.paths.output_dir,  # image grids go there, not into the repository
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.global_step >= 1
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    moved = [k for k, p in module.named_parameters() if k in before and not torch.equal(p.detach(), before[k])]
    assert moved, "the optimizer step changed no weight"
    return module


# --- stage 1 ---------------------------------------------------------------------------------------------
def test_kl_f16_trains_a_step(compose_cfg, tmp_path):
    module = fit_one_step(compose_cfg(["stage=vae", "model/vae=kl_f16"], tmp_path), {"image": images()})
    assert module.autoencoder.downsample_factor == 16


def test_kl_f8_256_without_lpips_weights_fails_at_start_up_naming_the_fix(compose_cfg, tmp_path):
    cfg = compose_cfg(["stage=vae", "model/vae=kl_f8_256", "data.image_size=256"], tmp_path)
    with pytest.raises(ConfigError, match="vgg_weights_path.*perceptual_weight=0"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_kl_f8_256_trains_a_step_with_lpips_and_the_discriminator(compose_cfg, tmp_path):
    """Stable Diffusion's first stage with its full loss: LPIPS (random VGG, since the weights cannot be had
    offline) and the PatchGAN from step 0. The convolutions do not depend on the resolution, so 32 px
    images exercise every weight at 1/64 of the cost of 256 px."""
    cfg = compose_cfg(["stage=vae", "model/vae=kl_f8_256", "model.vae.loss.disc_start=0",
                       "+model.vae.loss.perceptual.allow_random_weights_for_tests=true"], tmp_path)
    module = fit_one_step(cfg, {"image": images(channels=3, n=1)})
    assert module.autoencoder.downsample_factor == 8


# --- stage 2: backbone, first stage, optimizer, text encoders ---------------------------------------------
@pytest.fixture(scope="module")
def vq_export(tmp_path_factory, compose_cfg) -> Path:
    """A vq_f4 stage-1 export written by ldm-train itself (one step): the first stage of the tests below."""
    out = tmp_path_factory.mktemp("vq")
    train(compose_cfg(["stage=vae", "model/vae=vq_f4", "logger=csv", *ONE_STEP], out))
    return out / "export"


def stage2_batch(n: int = 2) -> dict:
    return {"image": images(n=n), "label": torch.arange(n) % 10, "caption": ["a 3", "a handwritten seven"][:n]}


@pytest.mark.parametrize("overrides", [["model/ldm=unet_small"], ["model/ldm=unet_tiny", "optim=adamw_cosine"]],
                         ids=["unet_small", "adamw_cosine"])
def test_stage2_options_train_a_step_on_a_vq_f4_first_stage(vq_export, compose_cfg, tmp_path, overrides):
    cfg = compose_cfg([*STAGE2, *overrides, f"first_stage.path={vq_export}"], tmp_path)
    module = fit_one_step(cfg, stage2_batch())
    assert type(module.model.first_stage.autoencoder).__name__ == "VQModel" and module.model.first_stage.latent_channels == 3


def test_adamw_cosine_decays_to_zero_over_the_run(vq_export, compose_cfg, tmp_path):
    cfg = compose_cfg([*STAGE2, "model/ldm=unet_tiny", "optim=adamw_cosine", "optim.scheduler.warmup_steps=2",
                       "stage.max_steps=10", f"first_stage.path={vq_export}"], tmp_path)
    module = instantiate_checked(cfg.stage.module, "stage.module")
    optimizer = cfg.optim.optimizer
    schedule = instantiate_checked(cfg.optim.scheduler, "optim.scheduler")(
        instantiate_checked(optimizer, "optim.optimizer")(module.model.backbone.parameters(), lr=1.0))
    lrs = []
    for _ in range(11):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs[0] < lrs[1] == lrs[2] == pytest.approx(1.0)  # warm-up, then the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[10] == pytest.approx(0.0, abs=1e-6)


def tiny_text_encoder(kind: str, folder: Path) -> str:
    """A random 2-layer CLIP text model or T5 encoder (width 16) with a real tokenizer of its own kind
    (CLIP byte-level BPE, T5 unigram) over letters and digits, saved as a from_pretrained folder."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    chars = list(string.ascii_lowercase + string.digits)
    torch.manual_seed(0)
    if kind == "clip":
        vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]])}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1))
    else:
        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("▁" + c, -1.0) for c in chars],
                  *[(c, -2.0) for c in chars], ("▁", -3.0)]
        tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
        model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                        decoder_start_token_id=0))
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoder_options_tokenize_and_train_a_step(vq_export, compose_cfg, tmp_path, kind):
    folder = tiny_text_encoder(kind, tmp_path / kind)
    cfg = compose_cfg([*STAGE2, "model/ldm=unet_tiny", f"cond={kind}", f"first_stage.path={vq_export}",
                       f"cond.conditioner.embedders.0.pretrained={folder}"], tmp_path)
    module = fit_one_step(cfg, stage2_batch())
    (encoder,) = module.model.conditioner.embedders
    ids = encoder.tokenizer("a handwritten 7")["input_ids"]
    assert encoder.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "ahandwritten7"
    context = module.model.conditioner.eval()({"caption": ["a 3", "a 7"]})["context"]  # eval: no condition dropout
    assert context.shape == (2, 77, 16) and not torch.equal(context[0], context[1])
    assert not any(p.requires_grad for p in encoder.transformer.parameters())  # frozen, as configured


# --- loggers and callbacks: only ldm-train builds them ----------------------------------------------------
@pytest.mark.parametrize("logger", ["default", "none", "wandb"])
def test_logger_options_log_a_training_step(compose_cfg, tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    results = train(compose_cfg(["stage=vae", f"logger={logger}", *ONE_STEP], tmp_path))
    assert results["train/steps"] == 1
    wandb_runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == (logger in ("default", "wandb"))
    assert (tmp_path / "csv" / "metrics.csv").is_file() == (logger == "default")
    import wandb

    assert wandb.run is None  # finished, so the next job of a sweep does not log into it


@pytest.mark.slow
def test_sample_metrics_callback_logs_finite_metrics(vq_export, compose_cfg, tmp_path, request):
    store = getattr(request.config, "cache", None)  # the reference-feature cache shared with tests/test_evaluate.py
    cache = Path(store.mkdir("ldm-eval-cache")) if store is not None else tmp_path / "cache"
    results = train(compose_cfg([*STAGE2, "model/ldm=unet_tiny", "callbacks=sample_metrics", "logger=csv",
                                 f"first_stage.path={vq_export}", f"paths.cache_dir={cache}", *ONE_STEP,
                                 "callbacks.sample_metrics.per_class=2", "sampler=ddim", "sampler.steps=2"], tmp_path))
    for key in ("val/accuracy", "val/fid", "val/kid"):
        assert math.isfinite(results[key]), key
    assert results["val/accuracy_n"] == results["val/fid_n"] == 20
