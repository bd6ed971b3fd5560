"""Image grids for training logs: PNG files under the run folder, and wandb where it is configured."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ldm.io.images import save_png, to_uint8_grid


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
