"""Image grids for training logs: PNG files under the run folder, and wandb where it is configured; the previews' capped
condition sets, drawn across the ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.io.images import save_png, to_uint8_grid
from ldm.io.samples import open_images, sample_to_npz
from ldm.model.sharded import batch_size_of, capped_groups, slice_conditions


def log_image_grid(trainer, key: str, images: Tensor, nrow: int, caption: str | None = None) -> Path | None:
    """Save ``<default_root_dir>/images/<key>_step<global_step>.png`` and send it to any WandbLogger.

    Only rank 0 writes; other ranks return None. ``key`` may contain '/' (e.g. ``val/reconstructions``),
    which becomes a sub-folder.
    """
    if not trainer.is_global_zero:
        return None
    grid = to_uint8_grid(images, nrow)
    path = save_png(
        grid, Path(trainer.default_root_dir) / "images" / f"{key}_step{trainer.global_step:07d}.png"
    )
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            # WandbLogger takes every extra kwarg as a per-image list, so None must not be passed.
            extra = {} if caption is None else {"caption": [caption]}
            logger.log_image(key=key, images=[grid], step=trainer.global_step, **extra)
    return path


def preview_conditions(model: Any, preview: Any) -> tuple[dict[str, Any], int]:
    """(conditions, images per row) of a preview grid of at most ``max_images``: every class (or prompt) with
    ``per_class`` images each when they fit; every class with fewer each when only that fits (MNIST's 10 x 6);
    else ``per_class`` images of each of a fixed, seeded subset of the classes (ImageNet's 1,000: 8 x 8), the
    same subset at every preview, so grids stay comparable and small."""
    cap, per = int(preview.max_images), max(1, int(preview.per_class))
    prompts = list(preview.prompts or [])
    groups = len(prompts) or model.conditioner.num_classes
    if not groups:  # unconditional, or the conditioner's own example inputs (a text model's default prompts)
        conditions = model.example_conditions(min(per, cap))
        return slice_conditions(conditions, 0, min(batch_size_of(conditions), cap)), min(per, cap)
    if groups * per > cap and groups <= cap:
        per = cap // groups
    chosen = capped_groups(groups, max(1, cap // per), preview.seed)
    if prompts:
        return model.example_conditions(per, prompts=[prompts[i] for i in chosen]), per
    return model.example_conditions(per, labels=chosen), per


def draw_preview(trainer: Any, model: Any, conditions: dict[str, Any], image_size: int, key: str, nrow: int,
                 seed: int, batch_size: int, **sample_kwargs: Any) -> Path | None:
    """Every rank draws its share of a preview into a part of a temporary npz (under FSDP each forward is a
    collective); rank 0 makes the grid from it. No image crosses between the ranks."""
    folder = Path(trainer.default_root_dir) / "images" / ".preview"
    npz = sample_to_npz(model, conditions, image_size, seed, folder / f"{key}.npz", batch_size=batch_size,
                        **sample_kwargs)
    if not trainer.is_global_zero:
        return None
    images = torch.from_numpy(np.array(open_images(npz))).permute(0, 3, 1, 2).float() / 127.5 - 1
    npz.unlink()
    return log_image_grid(trainer, key, images, nrow=nrow)
