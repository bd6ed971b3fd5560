"""DreamBooth-style folders (Ruiz et al. 2023): a fixed instance prompt, and prior-preservation images from a
second folder mixed in at prior_weight per instance image, every image of both seen each epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import ImageFolderDataModule


def _images(root: Path, n: int, value: int, captions: str | None = None) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(root / f"{i}.png")
        if captions:
            (root / f"{i}.txt").write_text(f"{captions} {i}")
    return root


def _module(tmp_path, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(str(_images(tmp_path / "inst", 3, 200, captions="instance")), image_size=8, batch_size=2,
                               num_workers=0, val_fraction=0.0, random_flip=False, **kwargs)
    dm.setup("fit")
    return dm


def _captions(dm) -> Counter:
    return Counter(dm.train_dataset[(i, 0)]["caption"] for i in range(len(dm.train_dataset)))


def test_instance_prompt_replaces_every_caption(tmp_path):
    dm = _module(tmp_path, instance_prompt="a sks dog")
    assert _captions(dm) == Counter({"a sks dog": 3})


@pytest.mark.parametrize("weight, counts", [(1.0, (10, 10)), (2.0, (5, 10)), (0.5, (20, 10))])
def test_prior_images_are_mixed_in_at_the_weight_and_all_seen(tmp_path, weight, counts):
    _images(tmp_path / "prior", 10, 30)
    dm = _module(tmp_path, instance_prompt="a sks dog", prior_root=str(tmp_path / "prior"), prior_prompt="a dog",
                 prior_weight=weight)
    seen = _captions(dm)
    assert (seen["a sks dog"], seen["a dog"]) == counts
    pixels = Counter(int(dm.train_dataset[(i, 0)]["image"].mean().round(decimals=2) * 100)
                     for i in range(len(dm.train_dataset)))
    assert len(pixels) == 2  # instance (200) and prior (30) images, both present
    assert dm.val_dataset is None  # validation never sees prior images (val_fraction=0 here)


def test_prior_without_prompt_keeps_its_own_captions_and_labels_are_refused(tmp_path):
    _images(tmp_path / "prior", 2, 30, captions="prior")
    dm = _module(tmp_path, prior_root=str(tmp_path / "prior"))
    # 3 instance draws (each image once) and 3 prior draws (the 2 prior images cycled)
    assert _captions(dm) == Counter({"instance 0": 1, "instance 1": 1, "instance 2": 1, "prior 0": 2, "prior 1": 1})
    with pytest.raises(ValueError, match="labels_from_subfolders=false"):
        ImageFolderDataModule(str(tmp_path / "inst"), prior_root=str(tmp_path / "prior"), labels_from_subfolders=True)
