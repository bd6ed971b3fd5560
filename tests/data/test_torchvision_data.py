"""TorchvisionDataModule against tiny fake datasets written in torchvision's on-disk layouts."""

import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.captions import CIFAR10_CLASS_NAMES, CLASS_NAMES
from ldm.data.torchvision_data import TorchvisionDataModule

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def _write_idx(path, array):
    """MNIST idx format: big-endian magic (0x08 = uint8, then ndim), big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, count in (("train", 20), ("t10k", 8)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count) % 10
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = images, labels
    return tmp_path, data


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    # The real files are checked against published MD5 sums; ours cannot match, so skip that check.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6 * 4, 3, 32, 32), dtype=np.uint8)  # 5 train batches + 1 test batch
    labels = np.arange(24) % 10
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        part = slice(4 * i, 4 * i + 4)
        record = {"data": images[part].reshape(4, -1), "labels": labels[part].tolist()}
        (folder / name).write_bytes(pickle.dumps(record))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASS_NAMES)}))
    return tmp_path, images, labels


@pytest.fixture
def fake_celeba(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CelebA._check_integrity", lambda self: True)
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 8)]
    partitions = [0, 0, 0, 1, 1, 2, 2]  # torchvision needs >= 2 files per split (it squeezes indices)
    for i, name in enumerate(names):
        face = np.zeros((218, 178, 3), dtype=np.uint8)
        face[39:179, 19:159] = (30 * i, 100, 200)  # the central 140x140 crop is a solid colour
        Image.fromarray(face).save(base / "img_align_celeba" / name, quality=95)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} 1\n" for n in names))
    tables = {
        "list_bbox_celeba.txt": "x_1 y_1 width height",
        "list_landmarks_align_celeba.txt": "lefteye_x lefteye_y",
        "list_attr_celeba.txt": "Smiling Young",
    }
    for filename, header in tables.items():
        width = len(header.split())
        rows = "".join(f"{n} " + " ".join(["1"] * width) + "\n" for n in names)
        (base / filename).write_text(f"{len(names)}\n{header}\n{rows}")
    return tmp_path, names, partitions


def test_mnist_batches_match_the_idx_files(fake_mnist):
    root, data = fake_mnist
    dm = TorchvisionDataModule("mnist", str(root), batch_size=4, seed=0)
    dm.setup("fit")
    assert len(dm.train_dataset) == 20 and len(dm.val_dataset) == 8
    assert dm.channels == 1 and dm.num_classes == 10 and dm.class_names == list(CLASS_NAMES)
    example = dm.val_dataset[5]
    expected = torch.from_numpy(data["t10k"][0][5]).float() / 127.5 - 1
    assert example["image"].shape == (1, 32, 32)
    assert torch.equal(example["image"][0, 2:30, 2:30], expected)  # padded 28 -> 32, exact
    assert example["label"] == data["t10k"][1][5]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "caption"} and batch["image"].shape == (4, 1, 32, 32)
    for caption, label in zip(batch["caption"], batch["label"].tolist()):
        words = set(re.findall(r"[a-z0-9]+", caption))
        assert words & {str(label), CLASS_NAMES[label]}, caption


def test_cifar_keeps_channel_order_and_captions(fake_cifar):
    root, images, labels = fake_cifar
    dm = TorchvisionDataModule("cifar10", str(root), batch_size=4, image_size=32, resize_mode="resize")
    dm.setup()
    assert len(dm.train_dataset) == 20 and len(dm.val_dataset) == 4 and dm.channels == 3
    example = dm.train_dataset[6]
    assert torch.equal(example["image"], torch.from_numpy(images[6]).float() / 127.5 - 1)
    assert example["label"] == labels[6]
    assert CIFAR10_CLASS_NAMES[labels[6]] in example["caption"]
    assert dm.val_dataset[0]["label"] == labels[20]
    smaller = TorchvisionDataModule("cifar10", str(root), image_size=16, resize_mode="resize")
    smaller.setup()
    assert smaller.train_dataset[0]["image"].shape == (3, 16, 16)


def test_celeba_crops_resizes_and_splits(fake_celeba):
    root, names, partitions = fake_celeba
    dm = TorchvisionDataModule("celeba", str(root), image_size=16, batch_size=2, random_flip=True)
    dm.setup()
    assert len(dm.train_dataset) == partitions.count(0) and len(dm.val_dataset) == partitions.count(1)
    assert dm.num_classes is None and not dm.has_captions and dm.channels == 3
    image = dm.train_dataset[1]["image"]
    assert image.shape == (3, 16, 16)
    expected = torch.tensor([30.0, 100.0, 200.0]).div(127.5).sub(1)
    assert torch.allclose(image.mean((1, 2)), expected, atol=0.03)  # JPEG, so only approximately
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image"} and batch["image"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "celeba"])
def test_missing_dataset_says_how_to_download(tmp_path, name):
    dm = TorchvisionDataModule(name, str(tmp_path / "absent"), batch_size=2)
    with pytest.raises(ValueError, match=rf"{name} was not found.*absent.*data\.download=true"):
        dm.setup()


def test_bad_arguments_fail_early(tmp_path):
    with pytest.raises(ValueError, match="name must be one of"):
        TorchvisionDataModule("imagenet", str(tmp_path))
    with pytest.raises(ValueError, match="resize_mode"):
        TorchvisionDataModule("mnist", str(tmp_path), resize_mode="crop")
    with pytest.raises(ValueError, match="celeba_crop"):
        TorchvisionDataModule("celeba", str(tmp_path), celeba_crop=300)


@pytest.mark.parametrize("config", ["mnist", "cifar10", "celeba"])
def test_configs_map_onto_the_constructor(tmp_path, config):
    cfg = OmegaConf.merge(
        {"paths": {"data_dir": str(tmp_path)}}, {"data": OmegaConf.load(CONF / f"{config}.yaml")}
    )
    dm = instantiate(cfg.data)
    assert isinstance(dm, TorchvisionDataModule) and dm.name == config and dm.root == tmp_path
    assert set(OmegaConf.to_container(cfg.data)) - {"_target_"} == set(dm.hparams)


def test_mnist_config_loads_the_fake_dataset(fake_mnist):
    root, _ = fake_mnist
    cfg = OmegaConf.merge({"paths": {"data_dir": str(root)}}, {"data": OmegaConf.load(CONF / "mnist.yaml")})
    dm = instantiate(cfg.data, batch_size=4, num_workers=0)
    dm.setup()
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 1, 32, 32)
