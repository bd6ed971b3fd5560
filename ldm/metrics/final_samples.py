"""The end of a class-structured training run: K classes x N samples with the EMA weights, a grid, the npz, and
the conditional accuracy (plus FID & co.) judged by a classifier trained on real data, when the data has one
(``data.judge``; MNIST-5k's digit judge today). Lightning-free: it takes the model and the run's config.

The set streams: every rank draws its share batch by batch into a part of ``samples.npz`` and takes the judge's
predictions and features of each batch as it goes; only those are gathered, never the images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm import distributed
from ldm.io.samples import open_images, sample_to_npz, write_manifest
from ldm.model.latent_diffusion import sampling_autocast
from ldm.model.sharded import capped_groups

# Rows (classes) of the grid: a fixed, seeded subset when there are more classes than this.
GRID_CLASSES = 64


def per_class_count(settings: Any, num_classes: int) -> int:
    """``final_samples.per_class``, or with null enough per class for ``final_samples.images`` in all (100 per
    class for 10 classes, 1 for ImageNet's 1,000 at the default 1,000)."""
    per_class = settings.get("per_class")
    if per_class is not None:
        return int(per_class)
    return max(1, math.ceil(int(settings.get("images", 1000)) / num_classes))


def image_channels(model: Any) -> int:
    """The channels of the images the model's first stage decodes (3 when its config does not say)."""
    autoencoder = getattr(getattr(model, "first_stage", None), "autoencoder", None)
    return int(getattr(getattr(autoencoder, "config", None), "in_channels", 3))


def write_final_samples(module: Any, datamodule: Any, out_dir: str | Path, cfg: Any) -> dict[str, Any]:
    """The embedded default's end: K classes x N samples with the EMA weights, a grid, the npz, and
    the conditional accuracy judged by a digit classifier trained on real data (when the data has one).

    Every rank of a distributed run calls it: each draws its share of the set into a part of the npz and
    measures it batch by batch; rank 0 joins the parts and the measurements, and every rank returns its results."""
    from ldm.data.captions import held_out_prompt
    from ldm.metrics.suite import SampleMetrics, evaluation_config, flat_metrics

    settings = cfg.stage.final_samples
    sampler = module.sampler()  # the EMA weights; sampling runs in eval mode (LatentDiffusion.sample owns it)
    conditioner = sampler.conditioner
    num_classes = int(conditioner.num_classes or getattr(datamodule, "num_classes", 0) or 0)
    if not num_classes or not len(conditioner.embedders):
        return {}
    per_class = per_class_count(settings, num_classes)
    # Class-major: labels for class embedders, the data's held-out phrasing of each class for text encoders.
    conditions = conditioner.example_conditions(per_class, labels=range(num_classes), caption_for=held_out_prompt)
    if any(e.input_key not in conditions for e in conditioner.embedders):
        return {}  # a condition no class can stand for (an inpainting mask): nothing class-wise to judge
    sampler_cfg = dict(cfg.sampler)
    from ldm.io.guide import resolve_guidance

    guidance = resolve_guidance(cfg.get("guidance"), sampler, "of this run")
    image_size = int(datamodule.image_size)
    if distributed.rank() == 0:
        print(f"sampling {len(conditions['label'])} images ({sampler_cfg}, cfg scale {settings.guidance_scale}) "
              f"on {distributed.world_size()} process(es)", flush=True)
    judged = settings.judge == "mnist5k"
    names = ["accuracy", *[str(m) for m in settings.get("metrics") or [] if str(m) != "accuracy"]] if judged else []
    measure = SampleMetrics(evaluation_config(str(cfg.paths.cache_dir)), image_size, image_channels(sampler))
    seen = measure.observations(names, labels=True, prompts=False)
    out_dir = Path(out_dir)
    npz = sample_to_npz(
        sampler, conditions, image_size, int(cfg.seed), out_dir / "samples.npz", batch_size=int(settings.batch_size),
        on_batch=lambda b: seen.update(b.images, b.conditions["label"]), sampler=sampler_cfg,
        guidance_scale=float(settings.guidance_scale), guidance_rescale=float(settings.get("guidance_rescale", 0.0)),
        guidance=guidance,
        autocast_dtype=sampling_autocast(sampler.device, OmegaConf.select(cfg, "trainer.precision")),
    )
    metrics, _ = measure.finish(seen)
    results: dict[str, Any] = {"samples": str(npz), **{k: v for k, v in flat_metrics(metrics, prefix="").items()
                                                         if k != "accuracy_judge_val_acc"}}
    prompts = sorted(set(conditions.get("caption") or []))
    return distributed.on_rank_zero(
        lambda: _grid_and_manifest(npz, results, per_class, num_classes, out_dir, cfg, ema=module.ema is not None,
                                   prompts=prompts),
        "writing the final samples' grid and manifest",
    )


def _guidance_record(cfg: Any) -> dict[str, Any]:
    from ldm.io.guide import guidance_config

    return guidance_config(cfg.get("guidance")).describe()


def _grid_and_manifest(npz: Path, results: dict[str, Any], per_class: int, num_classes: int, out_dir: Path, cfg: Any,
                       ema: bool, prompts: list[str]) -> dict[str, Any]:
    from ldm.io.images import save_png, to_uint8_grid

    settings = cfg.stage.final_samples
    # Grid: one row per class (a fixed subset of GRID_CLASSES when there are more), its first 10 samples.
    cols = min(10, per_class)
    rows = capped_groups(num_classes, GRID_CLASSES, int(cfg.seed))
    index = torch.cat([torch.arange(c * per_class, c * per_class + cols) for c in rows]).numpy()
    images = torch.from_numpy(open_images(npz)[index]).permute(0, 3, 1, 2).float() / 127.5 - 1
    grid_path = save_png(to_uint8_grid(images, nrow=cols), out_dir / "grid.png")
    results = {**results, "grid": str(grid_path)}
    write_manifest(
        out_dir / "manifest.json",
        {
            "sampler": dict(cfg.sampler),
            "guidance_scale": float(settings.guidance_scale),
            "seed": int(cfg.seed),
            # Global batch b of the set is drawn with a seed of (seed, b) on whichever rank: any world size
            # gives the same images.
            "world_size": distributed.world_size(),
            "batch_size": int(settings.batch_size),
            "guidance_rescale": float(settings.get("guidance_rescale", 0.0)),
            "guidance": _guidance_record(cfg),
            "per_class": per_class,
            "num_classes": num_classes,
            "grid_classes": [int(c) for c in rows],
            "prompts": prompts,
            "ema": ema,
            "results": results,
        },
    )
    return results
