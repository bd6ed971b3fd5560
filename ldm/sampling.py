"""Generating images from a latent diffusion model, and writing them in the evaluators' formats.

Used during training (preview grids, the final 10x100 class-conditional set) and by ``ldm-sample``.
On disk: ``samples.npz`` with ``arr_0`` uint8 NHWC (the ADM/DiT evaluator convention) plus ``labels``
and/or ``prompts``, a PNG grid, and ``manifest.json`` with the settings and the seed.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm import distributed
from ldm.diffusion import samplers as sampler_lib
from ldm.diffusion.guidance import ClassifierFreeGuidance
from ldm.io.export import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


def _batch_size_of(conditions: dict[str, Any]) -> int:
    for value in conditions.values():
        if value is not None:
            return len(value)
    raise ValueError("conditions are empty: give labels, prompts or n")


def _slice(conditions: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    return {k: (v[start:stop] if v is not None else None) for k, v in conditions.items()}


@dataclass
class LatentEdit:
    """Image editing in latent space, for any sampler.

    SDEdit (Meng et al. 2022): noise the given latents ``z0`` to t = strength * (T - 1) and denoise from
    there. Inpainting: wherever ``keep`` is 1 the denoiser's x0 estimate is replaced by the known latents
    at every step (RePaint-style masking in latent space, Lugmayr et al. 2022), so the sampler's trajectory
    is pulled onto the known content there and generates the rest consistently with it.
    """

    z0: torch.Tensor  # (N, C, h, w) scaled latents of the init images
    strength: float = 1.0
    keep: torch.Tensor | None = None  # (N, 1, h, w) in [0, 1]; 1 = keep the init content

    def __post_init__(self) -> None:
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")

    def slice(self, start: int, stop: int, device: torch.device) -> LatentEdit:
        keep = None if self.keep is None else self.keep[start:stop].to(device)
        return LatentEdit(self.z0[start:stop].to(device), self.strength, keep)

    def keep_known(self, denoise: Callable) -> Callable:
        if self.keep is None:
            return denoise

        def masked(x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            return self.keep * self.z0 + (1 - self.keep) * denoise(x_t, t, cond)

        return masked

    def start(self, noise: torch.Tensor, schedule: Any, kwargs: dict[str, Any]):
        """(x at the first timestep, sampler kwargs) for a run that starts at strength * (T - 1)."""
        if self.strength >= 1.0:
            return noise, kwargs
        last = schedule.num_train_timesteps - 1
        t_start = max(1, round(self.strength * last))
        steps = max(1, round(int(kwargs.pop("steps", 50)) * self.strength))
        kwargs.pop("timestep_spacing", None)
        if kwargs.pop("karras", False):
            # Karras sigmas run from the schedule's sigma_max; an edit starts part-way, at t_start.
            log.info("img2img starts at the discrete timestep %d: this edit samples on the schedule's timesteps, "
                     "not Karras sigmas (set sampler.karras=false to say so)", t_start)
        timesteps = torch.linspace(t_start, 0, steps + 1)[:-1].round().long().unique_consecutive().tolist()
        t = torch.full((noise.shape[0],), t_start, device=noise.device)
        return schedule.q_sample(self.z0, t, noise), {**kwargs, "timesteps": timesteps}


@dataclass
class LatentSampler:
    """The parts sampling needs, nothing more: no Lightning, no optimizer."""

    unet: nn.Module
    conditioner: nn.Module
    first_stage: nn.Module
    objective: Any

    @staticmethod
    def model_fn(unet: nn.Module) -> Callable:
        """The raw network as a function of (x_t, t, cond); concat conditioning joins the input here."""

        def fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            concat = cond.get("concat")
            x = x_t if concat is None else torch.cat([x_t, concat.to(x_t.dtype)], dim=1)
            return unet(x, t, context=cond.get("context"), y=cond.get("y"))

        return fn

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def preview_conditions(self, per_class: int, prompts: list[str]) -> tuple[dict[str, Any], int]:
        """A fixed set to look at: ``per_class`` samples of each class (rows), or of each prompt."""
        num_classes = getattr(self.conditioner, "num_classes", None)
        if prompts:
            return {"caption": [p for p in prompts for _ in range(per_class)]}, per_class
        if num_classes:
            labels = torch.arange(num_classes).repeat_interleave(per_class)
            return {"label": labels}, per_class
        return {"n": [None] * (per_class * per_class)}, per_class

    @torch.no_grad()
    def sample(
        self,
        conditions: dict[str, Any],
        image_size: int,
        sampler: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        progress: Callable[[int, int], None] | None = None,
        edit: LatentEdit | None = None,
        guidance_rescale: float = 0.0,
    ) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1]; same generator seed -> same images.

        ``edit`` starts from given latents (SDEdit) and/or keeps a masked region of them (inpainting).
        ``guidance_rescale`` is phi of Lin et al. 2023 (eq. 15-17; 0 = off, they use 0.7).
        Guidance is skipped when the model has no guided condition (unconditional, or concat only): both
        branches would be the same network call.
        """
        sampler = dict(sampler or {"name": "ddim", "steps": 50})
        name = sampler.pop("name")
        n = _batch_size_of(conditions)
        f = self.first_stage.downsample_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the first stage's factor {f}")
        shape = (self.first_stage.latent_channels, image_size // f, image_size // f)
        given = any(key != "n" for key in conditions)  # {"n": ...} alone: no inputs, already unconditional
        guide = guidance_scale != 1.0 and self.conditioner.guided and given
        if guidance_scale != 1.0 and not guide:
            log.info("guidance_scale=%g skipped: no guided condition is given, so the unconditional prediction "
                     "is the conditional one (one network call per step)", guidance_scale)
        was_training = self.conditioner.training
        self.conditioner.eval()
        out = []
        for start in range(0, n, batch_size):
            chunk = _slice(conditions, start, min(n, start + batch_size))
            m = _batch_size_of(chunk)
            chunk = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in chunk.items() if k != "n"}
            cond = (
                self.conditioner(chunk)
                if chunk
                else self.conditioner.unconditional(m, device=self.device, spatial_size=shape[1:])
            )
            denoise = self.objective.denoiser(self.model_fn(self.unet))
            if guide:
                uncond = self.conditioner(chunk, force_unconditional=True)
                denoise = ClassifierFreeGuidance(
                    denoise, uncond, guidance_scale, rescale=guidance_rescale, schedule=self.objective.schedule
                )
            noise = torch.randn((m, *shape), generator=generator, device=self.device)
            kwargs = dict(sampler)
            if edit is not None:
                part = edit.slice(start, start + m, self.device)
                denoise = part.keep_known(denoise)
                noise, kwargs = part.start(noise, self.objective.schedule, kwargs)
            z0 = sampler_lib.sample(
                name, denoise, noise, self.objective.schedule, cond=cond, generator=generator, **kwargs
            )
            out.append(self.first_stage.decode(z0).clamp(-1, 1).float().cpu())
            if progress is not None:
                progress(min(n, start + batch_size), n)
        self.conditioner.train(was_training)
        return torch.cat(out)


def sample_sharded(
    model: LatentSampler, conditions: dict[str, Any], image_size: int, seed: int, **kwargs: Any
) -> torch.Tensor:
    """``model.sample`` over all ``conditions``, split across the ranks of a distributed run.

    Each rank draws its contiguous share with the seed ``seed + rank`` and every rank gets the whole set
    back (N, C, H, W) in the order of ``conditions``; a single process draws everything with ``seed``,
    exactly as a plain ``sample`` call would. Every rank must call it (it all-gathers).
    """
    n, world = _batch_size_of(conditions), distributed.world_size()
    # Equal shares, the last padded with repeats of the last condition: under FSDP every rank must run the
    # network as many times as the others (each forward gathers the shards collectively).
    share = -(-n // world)
    start = min(distributed.rank() * share, n - 1)
    mine = _slice(conditions, start, start + share)
    pad = share - _batch_size_of(mine)
    if pad:
        mine = {k: (v if v is None else _concat(v, v[-1:] * pad if isinstance(v, list) else v[-1:].repeat_interleave(pad, 0)))
                for k, v in mine.items()}
    generator = torch.Generator(device=model.device).manual_seed(int(seed) + distributed.rank())
    images = model.sample(mine, image_size, generator=generator, **kwargs)
    return torch.cat(distributed.all_gather_objects(images))[:n]


def _concat(a: Any, b: Any) -> Any:
    return a + b if isinstance(a, list) else torch.cat([a, b])


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding as the ADM evaluator expects."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def save_samples_npz(path: str | Path, images: torch.Tensor, **extra: Any) -> Path:
    """``arr_0`` uint8 NHWC plus e.g. ``labels`` (int64) or ``prompts`` (unicode), atomically."""
    arrays = {"arr_0": to_uint8_nhwc(images)}
    for key, value in extra.items():
        if value is None:
            continue
        arrays[key] = np.asarray(value.cpu() if torch.is_tensor(value) else value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def write_manifest(path: str | Path, settings: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True, default=str))


def class_conditions(num_classes: int, per_class: int, prompt_for: Callable[[int], str] | None = None):
    """Labels 0..K-1, ``per_class`` each (class-major), and a prompt per label for text models."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    conditions: dict[str, Any] = {"label": labels}
    if prompt_for is not None:
        conditions["caption"] = [prompt_for(int(y)) for y in labels]
    return conditions


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
    sampler = module.sampler()
    num_classes = int(getattr(datamodule, "num_classes", 0) or 0)
    keys = set(module.conditioner.input_keys)
    # Class-major sets need a model conditioned on labels or on text (prompted per class).
    if not num_classes or not keys & {"label", "caption"} or keys - {"label", "caption"}:
        return {}
    uses_text = "caption" in keys
    conditions = class_conditions(num_classes, int(settings.per_class), held_out_prompt if uses_text else None)
    sampler_cfg = dict(cfg.sampler)
    if distributed.rank() == 0:
        print(f"sampling {len(conditions['label'])} images ({sampler_cfg}, cfg scale {settings.guidance_scale}) "
              f"on {distributed.world_size()} process(es)", flush=True)
    was_training = sampler.unet.training
    sampler.unet.eval()
    try:
        images = sample_sharded(
            sampler, conditions, int(datamodule.image_size), int(cfg.seed), sampler=sampler_cfg,
            guidance_scale=float(settings.guidance_scale), batch_size=int(settings.batch_size),
            guidance_rescale=float(settings.get("guidance_rescale", 0.0)),
        )
    finally:
        sampler.unet.train(was_training)
    return distributed.on_rank_zero(
        lambda: _save_and_judge(images, conditions, num_classes, Path(out_dir), cfg, ema=module.ema is not None),
        "writing and judging the final samples",
    )


def _save_and_judge(images: torch.Tensor, conditions: dict[str, Any], num_classes: int, out_dir: Path, cfg: Any,
                    ema: bool) -> dict[str, Any]:
    from ldm.lit.images import save_png, to_uint8_grid
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
            "per_class": per_class,
            "num_classes": num_classes,
            "prompts": sorted(set(conditions.get("caption") or [])),
            "ema": ema,
            "results": results,
        },
    )
    return results
