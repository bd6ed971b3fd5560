"""The judge of the final samples follows the data: a run on data it cannot judge must not train for
hours and then fail in the judge before results.json is written; asking for it anyway fails at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.config import ConfigError
from ldm.train import check_config, train

FAST = ["debug=fast", "logger=csv", "data.batch_size=4", "trainer.limit_val_batches=1"]
RGB_VAE = ["model.vae.autoencoder.ddconfig.in_channels=3", "model.vae.autoencoder.ddconfig.out_ch=3"]


def folder_data(root: Path) -> list[str]:
    """Eight 32x32 colour images in two class subfolders: the folder DataModule's labelled case."""
    rng = np.random.default_rng(0)
    for label in ("red", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return ["data=folder", f"data.root={root}", "data.image_size=32", "data.num_workers=0", "data.val_fraction=0.25",
            "data.labels_from_subfolders=true", "data.captions=false"]


@pytest.mark.parametrize(("data", "judge"), [("mnist5k", "mnist5k"), ("mnist", "mnist5k"), ("cifar10", None),
                                             ("celeba", None), ("folder", None)])
def test_the_judge_defaults_from_the_data(compose_cfg, tmp_path, data, judge):
    cfg = compose_cfg(["stage=ldm", f"data={data}", f"data.root={tmp_path}"] if data == "folder" else
                      ["stage=ldm", f"data={data}"], tmp_path)
    assert cfg.stage.final_samples.judge == judge


@pytest.mark.parametrize(("data", "name"), [("cifar10", "cifar10"), ("folder", "ldm.data.folder.ImageFolderDataModule")])
def test_the_mnist_judge_on_other_data_fails_at_start_up(compose_cfg, tmp_path, data, name):
    overrides = ["stage=ldm", f"data={data}", "stage.final_samples.judge=mnist5k"]
    cfg = compose_cfg([*overrides, f"data.root={tmp_path}"] if data == "folder" else overrides, tmp_path)
    with pytest.raises(ConfigError, match=f"judge=mnist5k cannot judge samples of this data \\({name}, whose data.judge is None\\): "
                                         "set stage.final_samples.judge=null"):
        check_config(cfg)


def test_unknown_judge_fails_at_start_up(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="stage.final_samples.judge='cifar' is not a judge"):
        check_config(compose_cfg(["stage=ldm", "stage.final_samples.judge=cifar"], tmp_path))


@pytest.mark.slow
def test_a_labelled_colour_folder_trains_both_stages_and_writes_results(compose_cfg, tmp_path):
    """Used to train and then fail in the MNIST judge (a 1-channel digit classifier) on RGB samples."""
    data = folder_data(tmp_path / "images")
    train(compose_cfg(["stage=vae", *data, *RGB_VAE, *FAST], tmp_path / "vae"))
    results = train(compose_cfg(["stage=ldm", *data, *FAST, "model/ldm=unet_tiny", "cond.num_classes=2",
                                 f"first_stage.path={tmp_path / 'vae' / 'export'}", "stage.final_samples.per_class=2",
                                 "sampler=ddim", "sampler.steps=2"], tmp_path / "ldm"))
    written = json.loads((tmp_path / "ldm" / "results.json").read_text())
    assert "accuracy" not in written and written["train/steps"] == 4
    with np.load(results["samples"]) as samples:
        assert samples["arr_0"].shape == (4, 32, 32, 3) and samples["labels"].tolist() == [0, 0, 1, 1]
