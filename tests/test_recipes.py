"""The papers' recipes (issue 23): each experiment= config composes with the paper's hyperparameters and, with tiny
substitutes for its data, autoencoder and network width, trains two steps on the CPU through ldm-train."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from ldm.train import train

sys.path.insert(0, str(Path(__file__).parent / "finetune"))
import tiny_sd  # noqa: E402

# Two steps of everything on the CPU, nothing sampled after training.
SMOKE = ["debug=fast", "trainer=cpu", "trainer.precision=32-true", "logger=csv", "stage.max_steps=2",
         "stage.val_check_interval=2", "data.num_workers=0", "stage.final_samples.enabled=false",
         "stage.module.preview.every_n_steps=0"]


@pytest.fixture(scope="module")
def image_classes(tmp_path_factory) -> Path:
    """Two subfolders (classes) of 32 px grayscale images: the recipes' data=folder in miniature."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def tiny_folder(root: Path) -> list[str]:
    return [f"data.root={root}", "data.image_size=32", "data.mode=L", "data.val_fraction=0.25", "data.batch_size=4"]


def trained_two_steps(results: dict) -> None:
    assert results["train/steps"] == 2 and math.isfinite(results["train/loss"])


def test_ldm4_celebahq_recipe(tiny_vae_export, image_classes, compose_cfg, tmp_path):
    recipe = compose_cfg(["experiment=ldm4_celebahq256", "data.root=/data/celebahq", "first_stage.path=/vq_f4"])
    backbone = recipe.model.ldm.backbone
    assert (backbone.model_channels, list(backbone.channel_mult), backbone.num_res_blocks) == (224, [1, 2, 3, 4], 2)
    assert list(backbone.transformer.attention_resolutions) == [8, 4, 2] and backbone.transformer.num_head_channels == 32
    assert (recipe.model.ldm.lr, recipe.data.batch_size, recipe.optim.optimizer.weight_decay) == (9.6e-5, 48, 0.01)
    assert (recipe.schedule.kind, recipe.schedule.beta_start, recipe.schedule.beta_end) == ("scaled_linear", 0.0015, 0.0195)
    assert recipe.stage.module.ema.decay == 0.9999 and recipe.data.image_size == 256
    # tiny: 32 px images through the test autoencoder, a 32-channel UNet of the recipe's shape
    trained_two_steps(train(compose_cfg(["experiment=ldm4_celebahq256", *tiny_folder(image_classes),
                                         f"first_stage.path={tiny_vae_export}", "model.ldm.backbone.model_channels=32",
                                         *SMOKE], tmp_path)))


def test_dit_b2_imagenet_recipe(tiny_vae_export, image_classes, compose_cfg, tmp_path):
    recipe = compose_cfg(["experiment=dit_b2_imagenet256", "data.root=/data/imagenet", "first_stage.path=/sd-vae-ft-ema"])
    dit = recipe.model.ldm.backbone
    assert (dit.depth, dit.hidden_size, dit.num_heads, dit.patch_size) == (12, 768, 12, 2)
    assert (recipe.model.ldm.lr, recipe.optim.optimizer.weight_decay, recipe.optim.scheduler.warmup_steps) == (1e-4, 0.0, 0)
    assert recipe.stage.module.ema.decay == 0.9999 and recipe.stage.module.ema.warmup_steps == 1
    assert (recipe.cond.num_classes, recipe.cond.drop_rate, recipe.schedule.kind) == (1000, 0.1, "linear")
    assert recipe.data.batch_size * 8 == 256 and recipe.optim.optimizer._target_ == "torch.optim.AdamW"
    trained_two_steps(train(compose_cfg(["experiment=dit_b2_imagenet256", *tiny_folder(image_classes), "first_stage=export",
                                         f"first_stage.path={tiny_vae_export}", "cond.num_classes=2",
                                         "model.ldm.backbone.depth=1", "model.ldm.backbone.hidden_size=64",
                                         "model.ldm.backbone.num_heads=2", *SMOKE], tmp_path)))


def test_sd15_finetune_recipe(compose_cfg, tmp_path):
    tiny = tmp_path / "tiny"
    tiny_sd.build(tiny)
    tiny_sd.image_folder(tiny / "images")
    recipe = compose_cfg(["experiment=sd15_finetune512", "init.path=/models/sd15", "data.root=/data/images"])
    optimizer = recipe.optim.optimizer
    assert (recipe.model.ldm.lr, list(optimizer.betas), optimizer.weight_decay, optimizer.eps) == (1e-4, [0.9, 0.999], 0.01, 1e-8)
    assert recipe.optim.scheduler.kind == "constant" and recipe.optim.scheduler.warmup_steps == 0
    assert (recipe.trainer.gradient_clip_val, recipe.data.batch_size, recipe.data.image_size) == (1.0, 16, 512)
    assert recipe.data.random_crop and not recipe.data.random_flip
    trained_two_steps(train(compose_cfg(["experiment=sd15_finetune512", f"init.path={tiny / 'diffusers'}",
                                         f"data.root={tiny / 'images'}", "data.image_size=32", "data.batch_size=2",
                                         "data.val_fraction=0.25", *SMOKE], tmp_path / "run")))
