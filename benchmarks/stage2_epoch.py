"""Time per stage-2 epoch: encoding every batch with the frozen first stage on the fly vs training from
precomputed latents (the latent cache, ldm.data.latent_cache.LatentCacheDataModule: posterior mean/std, the
tensors latent shards hold too).

Two setups:
  default  the embedded recipe (conf/train.yaml: MNIST-5k, kl_f4 export, unet_small, cond=class);
  sd256    where a cache should matter: SD's kl-f8 first stage (model/vae=kl_f8_256, random weights), 256x256
           RGB JPEGs with a caption each (synthetic, written here), unet_small on the 4x32x32 latents,
           cond=text with the frozen MiniLM; data=folder, so on the fly also pays JPEG decoding. Also the
           shard path: `ldm-prepare encode=true` (latent moments + caption embeddings in litdata shards) read
           through data=stream, so neither the first stage nor the text encoder runs per step.

    python benchmarks/stage2_epoch.py                      # default; trains a 4-step stage-1 export first
    python benchmarks/stage2_epoch.py --export outputs/<run>/export --batches 20
    python benchmarks/stage2_epoch.py --setup sd256        # 64 images, batch 8: 8 batches per epoch
    python benchmarks/stage2_epoch.py --setup sd256 --quick  # smoke test: 64 px, 8 images, < 1 min

Timing is of the training epoch only (Lightning's fit loop, forward, backward, AdamW, EMA); the one-off
cache build (and the shard preparation, in the shards row's setup) is reported on its own. Weights do not change the cost, so untrained ones serve.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.config import instantiate_checked
from ldm.io.export import save_export
from ldm.train import CONF_DIR, train

SD_SCALE_FACTOR = 0.18215  # SD's kl-f8 latent scale; any value costs the same
COLOURS = ("red", "green", "blue", "yellow", "grey", "purple", "orange", "white")
THINGS = ("cat", "house", "tree", "car", "boat", "mountain", "flower", "bird")


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


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """``count`` smooth random size x size RGB JPEGs, each with a distinct sidecar caption (as web data: the
    text encoder's caption memo then saves nothing within an epoch)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        caption = f"a photo of a {COLOURS[i % 8]} {THINGS[i // 8 % 8]} seen from afar, number {i}"
        (folder / f"{i:05d}.txt").write_text(caption)
    return folder


def random_kl_f8_export(folder: Path) -> Path:
    """An autoencoder export with SD's kl-f8 architecture (conf/model/vae/kl_f8_256.yaml) and random weights."""
    autoencoder_cfg = compose_train(["model/vae=kl_f8_256"]).model.vae.autoencoder
    torch.manual_seed(0)
    autoencoder = instantiate(autoencoder_cfg)
    meta = {"kind": "autoencoder", "latent_channels": int(autoencoder.embed_dim),
            "downsample_factor": int(autoencoder.downsample_factor), "latent_std": 1.0 / SD_SCALE_FACTOR}
    return save_export(folder, autoencoder.state_dict(),
                       {"autoencoder": OmegaConf.to_container(autoencoder_cfg, resolve=True)}, meta)


def encoded_shards(cfg: DictConfig, workdir: Path) -> tuple[list[str], float]:
    """``ldm-prepare encode=true`` of the same images with the same first stage and text encoder: the data
    overrides that train from those shards (data=stream), and the seconds the preparation took."""
    from hydra import compose, initialize_config_dir

    from ldm.prepare import prepare

    out = workdir / "shards"
    overrides = [f"source.root={cfg.data.root}", f"output={out}", "encode=true",
                 f"first_stage.path={cfg.first_stage.path}", "cond=text", f"paths.output_dir={workdir / 'prepare'}",
                 f"encode_settings.image_size={cfg.data.image_size}", f"encode_settings.mode={cfg.data.mode}",
                 f"encode_settings.flips={str(bool(cfg.data.random_flip)).lower()}", "encode_batch_size=8"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        prepare_cfg = compose("prepare", overrides=overrides)
    start = time.perf_counter()
    prepare(prepare_cfg)
    seconds = time.perf_counter() - start
    return [f"data.path={out}", f"data.image_size={cfg.data.image_size}", f"data.mode={cfg.data.mode}",
            f"data.batch_size={cfg.data.batch_size}", "data.num_workers=0",
            f"data.random_flip={str(bool(cfg.data.random_flip)).lower()}"], seconds


def sd256_overrides(workdir: Path, quick: bool, images: int, batch_size: int) -> list[str]:
    size = 64 if quick else 256
    count = 8 if quick else images
    root = write_images(workdir / "images", count + 1, size)  # + 1 held out: the cache also encodes validation
    export = random_kl_f8_export(workdir / "kl_f8_256")
    return [f"first_stage.path={export}", f"first_stage.scale_factor={SD_SCALE_FACTOR}", "data=folder",
            f"data.root={root}", f"data.image_size={size}", f"data.batch_size={2 if quick else batch_size}",
            "data.num_workers=0", f"data.val_fraction={1 / (count + 1)}", "cond=text", "model/ldm=unet_small"]


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

        datamodule = LatentCacheDataModule(datamodule, module.model.first_stage, cache_dir,
                                           keys=module.model.conditioner.batch_keys)
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
    parser.add_argument("--setup", choices=("default", "sd256"), default="default", help="see above")
    parser.add_argument("--quick", action="store_true", help="sd256 at 64 px on 8 images: a smoke test")
    parser.add_argument("--images", type=int, default=64, help="sd256: training images")
    parser.add_argument("--batch-size", type=int, default=8, help="sd256: batch size")
    parser.add_argument("--export", default=None, help="default setup: stage-1 export (default: train a 4-step one)")
    parser.add_argument("--batches", type=int, default=None, help="limit the epoch to this many batches")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra ldm-train overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.setup == "sd256":
            setup = sd256_overrides(workdir, args.quick, args.images, args.batch_size)
        else:
            setup = [f"first_stage.path={ensure_export(args.export, workdir)}"]
        cfg = compose_train(["stage=ldm", *setup, "stage.module.preview.every_n_steps=0",
                             f"paths.output_dir={workdir / 'ldm'}", *args.overrides])
        rows = {}
        # The cache is built during the first cached run's setup; the second cached run reads it back.
        rows["on the fly"] = time_epoch(cfg, cached=False, batches=args.batches, cache_dir=workdir / "latents")
        rows["cache (build)"] = time_epoch(cfg, cached=True, batches=args.batches, cache_dir=workdir / "latents")
        rows["cache (hit)"] = time_epoch(cfg, cached=True, batches=args.batches, cache_dir=workdir / "latents")
        if args.setup == "sd256":
            # The same latents (and caption embeddings) as litdata shards, read through data=stream.
            data, prepare_s = encoded_shards(cfg, workdir)
            model_setup = [o for o in setup if not o.startswith("data")]
            stream_cfg = compose_train(["stage=ldm", *model_setup, "data=stream", *data, "stage.module.preview.every_n_steps=0",
                                        f"paths.output_dir={workdir / 'ldm'}", *args.overrides])
            rows["shards (read)"] = time_epoch(stream_cfg, cached=False, batches=args.batches,
                                               cache_dir=workdir / "latents")
            rows["shards (read)"]["setup_s"] += prepare_s  # ldm-prepare encode=true, once

    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"setup {args.setup}{' (quick)' if args.quick else ''}; torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, load {load}; data {cfg.data._target_} {cfg.data.image_size} px, batch "
          f"{cfg.data.batch_size}; UNet {cfg.model.ldm.backbone.model_channels}ch x {list(cfg.model.ldm.backbone.channel_mult)}; "
          f"cond {cfg.cond.conditioner.embedders[0]._target_.rsplit('.', 1)[-1]}")
    header = f"{'variant':<14} {'batches':>7} {'epoch s':>9} {'s/batch':>8} {'setup s':>8}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(f"{name:<14} {r['batches']:7d} {r['epoch_s']:9.2f} {r['epoch_s'] / r['batches']:8.3f} {r['setup_s']:8.2f}")
    per_batch = {name: r["epoch_s"] / r["batches"] for name, r in rows.items()}
    for name in ("cache (hit)", "shards (read)"):
        if name in per_batch:
            speedup = per_batch["on the fly"] / per_batch[name]
            verdict = "met" if speedup >= 2 else "not met"
            print(f"speed-up per batch, {name} vs on the fly: {speedup:.2f}x (target >= 2x: {verdict})")


if __name__ == "__main__":
    main()
