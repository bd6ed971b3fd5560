"""Image grids reach the run folder and a real (offline) WandbLogger."""

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger

from ldm.lit.images import log_image_grid, to_uint8_grid


def test_grid_shape_and_range():
    grid = to_uint8_grid(torch.linspace(-1, 1, 4 * 32 * 32).reshape(4, 1, 32, 32), nrow=2)
    assert grid.dtype.name == "uint8" and grid.shape[-1] == 3
    assert grid.max() == 255 and grid.min() == 0


def test_log_image_grid_to_an_offline_wandb_run(tmp_path):
    logger = WandbLogger(project="ldm-test", save_dir=str(tmp_path), mode="offline")
    trainer = Trainer(default_root_dir=str(tmp_path), logger=logger, accelerator="cpu", max_steps=1,
                      enable_progress_bar=False, enable_checkpointing=False)
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    path = log_image_grid(trainer, "samples_cfg3", images, nrow=2)
    path2 = log_image_grid(trainer, "val/recon", images, nrow=2, caption="inputs | reconstructions")
    assert path.is_file() and path2.is_file() and path2.parent.name == "val"
    logger.experiment.finish()
