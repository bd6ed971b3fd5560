"""The end of a class-structured training run: K classes x N samples with the EMA weights, a grid, the npz, and
the conditional accuracy (plus FID & co.) judged by a classifier trained on real data, when the data has one
(``data.judge``; MNIST-5k's digit judge today). Lightning-free: it takes the model and the run's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ldm import distributed
from ldm.io.samples import save_samples_npz, write_manifest
from ldm.model.sharded import sample_sharded


def final_sample_metrics(images: torch.Tensor, labels: torch.Tensor, names: list[str], cfg: Any) -> dict[str, float]:
    """FID, KID, precision/recall of the final set against MNIST-5k train on the judge's features: the
    same measurement (and reference cache) as ``ldm-evaluate``, so a training sweep's table needs no
    second pass over its samples."""
    from ldm.metrics import to_uint8_nhwc
    from ldm.metrics.suite import SampleMetrics, SampleSet, evaluation_config, flat_metrics

    names = [n for n in names if n != "accuracy"]  # measured above, with the judge itself
    if not names:
        return {}
    samples = SampleSet(to_uint8_nhwc(images), labels.numpy(), None, "final samples")
    measure = SampleMetrics(evaluation_config(str(cfg.paths.cache_dir)), samples.images.shape[1], samples.images.shape[-1])
    results, _ = measure.run(samples, names)
    return flat_metrics(results, prefix="")


def write_final_samples(module: Any, datamodule: Any, out_dir: str | Path, cfg: Any) -> dict[str, Any]:
    """The embedded default's end: K classes x N samples with the EMA weights, a grid, the npz, and
    the conditional accuracy judged by a digit classifier trained on real data (when the data has one).

    Every rank of a distributed run calls it: the samples are drawn in shares across the ranks, rank 0
    writes and judges them, and every rank returns rank 0's results."""
    from ldm.data.captions import held_out_prompt

    settings = cfg.stage.final_samples
    sampler = module.sampler()  # the EMA weights; sampling runs in eval mode (LatentDiffusion.sample owns it)
    num_classes = int(getattr(datamodule, "num_classes", 0) or 0)
    conditioner = sampler.conditioner
    if not num_classes or not len(conditioner.embedders):
        return {}
    # Class-major: labels for class embedders, the data's held-out phrasing of each class for text encoders.
    conditions = conditioner.example_conditions(int(settings.per_class), labels=range(num_classes),
                                                caption_for=held_out_prompt)
    if any(e.input_key not in conditions for e in conditioner.embedders):
        return {}  # a condition no class can stand for (an inpainting mask): nothing class-wise to judge
    sampler_cfg = dict(cfg.sampler)
    from ldm.io.guide import resolve_guidance

    guidance = resolve_guidance(cfg.get("guidance"), sampler, "of this run")
    if distributed.rank() == 0:
        print(f"sampling {len(conditions['label'])} images ({sampler_cfg}, cfg scale {settings.guidance_scale}) "
              f"on {distributed.world_size()} process(es)", flush=True)
    images = sample_sharded(
        sampler, conditions, int(datamodule.image_size), int(cfg.seed), sampler=sampler_cfg,
        guidance_scale=float(settings.guidance_scale), batch_size=int(settings.batch_size),
        guidance_rescale=float(settings.get("guidance_rescale", 0.0)), guidance=guidance,
    )
    return distributed.on_rank_zero(
        lambda: _save_and_judge(images, conditions, num_classes, Path(out_dir), cfg, ema=module.ema is not None),
        "writing and judging the final samples",
    )


def _guidance_record(cfg: Any) -> dict[str, Any]:
    from ldm.io.guide import guidance_config

    return guidance_config(cfg.get("guidance")).describe()


def _save_and_judge(images: torch.Tensor, conditions: dict[str, Any], num_classes: int, out_dir: Path, cfg: Any,
                    ema: bool) -> dict[str, Any]:
    from ldm.io.images import save_png, to_uint8_grid
    from ldm.metrics.classifier import conditional_accuracy, load_or_train_judge

    settings = cfg.stage.final_samples
    labels = conditions["label"]
    npz = save_samples_npz(out_dir / "samples.npz", images, labels=labels, prompts=conditions.get("caption"))
    # Grid: one row per class, the first 10 samples of each.
    per_class = int(settings.per_class)
    cols = min(10, per_class)
    grid_idx = torch.cat([torch.arange(c * per_class, c * per_class + cols) for c in range(num_classes)])
    grid_path = out_dir / "grid.png"
    save_png(to_uint8_grid(images[grid_idx], nrow=cols), grid_path)
    results: dict[str, Any] = {"samples": str(npz), "grid": str(grid_path)}
    if settings.judge == "mnist5k":
        judge = load_or_train_judge(cfg.paths.cache_dir)
        accuracy = conditional_accuracy(judge, images, labels)
        results.update({"accuracy": float(accuracy), "accuracy_n": int(len(labels))})
        results.update(final_sample_metrics(images, labels, [str(m) for m in settings.get("metrics") or []], cfg))
    write_manifest(
        out_dir / "manifest.json",
        {
            "sampler": dict(cfg.sampler),
            "guidance_scale": float(settings.guidance_scale),
            "seed": int(cfg.seed),
            # Rank r of a distributed run drew its contiguous share of the set with seed + r.
            "world_size": distributed.world_size(),
            "guidance_rescale": float(settings.get("guidance_rescale", 0.0)),
            "guidance": _guidance_record(cfg),
            "per_class": per_class,
            "num_classes": num_classes,
            "prompts": sorted(set(conditions.get("caption") or [])),
            "ema": ema,
            "results": results,
        },
    )
    return results
