"""Time per stage-2 epoch: encoding every batch with the frozen first stage on the fly vs training from
the latent cache (ldm.data.latent_cache.LatentCacheDataModule), on the embedded default recipe
(conf/train.yaml: MNIST-5k, kl_f4 export, unet_small, cond=class).

    python benchmarks/stage2_epoch.py                      # trains a 4-step stage-1 export first
    python benchmarks/stage2_epoch.py --export outputs/<run>/export --batches 20

Timing is of the training epoch only (Lightning's fit loop, forward, backward, AdamW, EMA); the one-off
cache build is reported on its own line. Weights do not change the cost, so an untrained export serves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ldm.config import instantiate_checked
from ldm.train import CONF_DIR, train


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def ensure_export(export: str | None, workdir: Path) -> Path:
    """The given stage-1 export, or a fresh one from a 4-step stage-1 run (cost is weight-independent)."""
    if export:
        return Path(export)
    out = workdir / "vae"
    train(compose_train(["stage=vae", "debug=fast", "logger=csv", f"paths.output_dir={out}",
                         f"paths.cache_dir={workdir / 'cache'}"]))
    return out / "export"


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start
        self.batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed


def time_epoch(cfg: DictConfig, cached: bool, batches: int | None, cache_dir: Path) -> dict[str, float]:
    pl.seed_everything(0)
    datamodule = instantiate_checked(cfg.data, "data")
    module = instantiate_checked(cfg.stage.module, "stage.module")
    if cached:
        from ldm.data.latent_cache import LatentCacheDataModule

        datamodule = LatentCacheDataModule(datamodule, module.first_stage, cache_dir)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=batches, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    total = time.perf_counter() - start
    return {"epoch_s": timer.seconds, "batches": timer.batches, "setup_s": total - timer.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default=None, help="stage-1 export folder (default: train a 4-step one)")
    parser.add_argument("--batches", type=int, default=None, help="limit the epoch to this many batches")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra ldm-train overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        export = ensure_export(args.export, workdir)
        cfg = compose_train(["stage=ldm", f"first_stage.path={export}", "stage.module.preview.every_n_steps=0",
                             f"paths.output_dir={workdir / 'ldm'}", *args.overrides])
        rows = {}
        # The cache is built during the first cached run's setup; the second cached run reads it back.
        rows["on the fly"] = time_epoch(cfg, cached=False, batches=args.batches, cache_dir=workdir / "latents")
        rows["cache (build)"] = time_epoch(cfg, cached=True, batches=args.batches, cache_dir=workdir / "latents")
        rows["cache (hit)"] = time_epoch(cfg, cached=True, batches=args.batches, cache_dir=workdir / "latents")

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, data {cfg.data._target_}, "
          f"batch {cfg.data.batch_size}, UNet {cfg.model.ldm.backbone.model_channels}ch x {list(cfg.model.ldm.backbone.channel_mult)}")
    header = f"{'variant':<14} {'batches':>7} {'epoch s':>9} {'s/batch':>8} {'setup s':>8}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(f"{name:<14} {r['batches']:7d} {r['epoch_s']:9.2f} {r['epoch_s'] / r['batches']:8.3f} {r['setup_s']:8.2f}")
    speedup = rows["on the fly"]["epoch_s"] / rows["cache (hit)"]["epoch_s"]
    print(f"epoch speed-up from the latent cache: {speedup:.2f}x")


if __name__ == "__main__":
    main()
