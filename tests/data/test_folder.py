"""ImageFolderDataModule: scanning, geometry, captions, labels, corrupt files, errors."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from ldm.data.folder import FolderScanOptions, ImageFolderDataModule, MissingCaptionWarning, scan_image_files
from ldm.data.image_files import FileImageDataset, ImageTransform, UnreadableImageWarning

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"
RED, GREEN, BLUE = (200, 10, 30), (20, 180, 40), (0, 0, 250)


def _solid(path, color, size=(24, 20), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _truncated_png(path):
    buffer = path.parent / "full.tmp"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    path.write_bytes(buffer.read_bytes()[:300])
    buffer.unlink()
    return path


def _module(root, **kwargs):
    kwargs.setdefault("image_size", 16)
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("val_fraction", 0.0)
    dm = ImageFolderDataModule(str(root), **kwargs)
    dm.setup("fit")
    return dm


def _signed(value):
    return value / 127.5 - 1


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "labelled"
    for i in range(3):
        _solid(root / "cat" / f"c{i}.png", RED)
        _solid(root / "dog" / "sub" / f"d{i}.jpg", GREEN)
    return root


def test_scan_is_recursive_sorted_and_skips_hidden_and_non_images(tmp_path):
    _solid(tmp_path / "b" / "x.PNG", RED)
    _solid(tmp_path / "a.webp", RED)
    _solid(tmp_path / ".cache" / "y.png", RED)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "notes.md").write_text("hi")
    files, _ = scan_image_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.webp", "b/x.PNG"]


def test_batches_have_shared_format_and_exact_colours(labelled):
    dm = _module(labelled, labels_from_subfolders=True, random_flip=False)
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2 and dm.channels == 3
    assert not dm.has_captions
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    for image, label in zip(batch["image"], batch["label"].tolist()):
        if label == 0:  # PNG is lossless and resizing a constant image keeps it constant
            assert torch.allclose(image, torch.tensor(RED).float().div(127.5).sub(1).view(3, 1, 1))
        else:  # JPEG: lossy but close
            assert torch.allclose(
                image.mean((1, 2)), torch.tensor(GREEN).float().div(127.5).sub(1), atol=0.05
            )
    labels = [dm.train_dataset[i]["label"] for i in range(len(dm.train_dataset))]
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_labels_need_subfolders(tmp_path):
    _solid(tmp_path / "loose.png", RED)
    _solid(tmp_path / "cls" / "ok.png", RED)
    with pytest.raises(ValueError, match="loose.png.*labels_from_subfolders=false"):
        _module(tmp_path, labels_from_subfolders=True)


def test_centre_crop_of_wide_image_and_upscaling(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, :20] = RED
    wide[:, 20:] = BLUE
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = _module(tmp_path, image_size=20, random_flip=False).train_dataset[0]["image"]
    assert image.shape == (3, 20, 20)  # shorter side already 20: the middle 20 columns are kept
    assert torch.equal(
        image[:, :, :10], torch.tensor(RED).float().div(127.5).sub(1).view(3, 1, 1).expand(3, 20, 10)
    )
    assert torch.equal(
        image[:, :, 10:], torch.tensor(BLUE).float().div(127.5).sub(1).view(3, 1, 1).expand(3, 20, 10)
    )
    small = tmp_path / "small"
    _solid(small / "tiny.png", GREEN, size=(6, 6))
    assert _module(small, image_size=32).train_dataset[0]["image"].shape == (3, 32, 32)


def test_grayscale_mode_and_transparency(tmp_path):
    _solid(tmp_path / "c.png", RED)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 0  # transparent black must become white, not black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    dm = _module(tmp_path, image_size=8, mode="L", random_flip=False)
    assert dm.channels == 1
    by_name = {Path(p).name: i for i, p in enumerate(dm.train_dataset.paths)}
    grey = dm.train_dataset[by_name["c.png"]]["image"]
    expected = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0))
    assert grey.shape == (1, 8, 8) and torch.allclose(grey, torch.full_like(grey, _signed(expected)))
    assert torch.all(dm.train_dataset[by_name["t.png"]]["image"] == 1.0)


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = _module(tmp_path, image_size=8, mode="L").train_dataset[0]["image"]
    assert torch.allclose(image, torch.full((1, 8, 8), _signed(round(40000 / 257))))


def test_random_flip_and_crop_are_seeded_per_sample(tmp_path):
    pattern = np.zeros((16, 24, 3), dtype=np.uint8)
    pattern[:, :4] = 255  # bright left edge: reveals flips and crop offsets
    Image.fromarray(pattern).save(tmp_path / "p.png")
    dm = _module(tmp_path, image_size=16, random_crop=True, random_flip=True)
    dataset = dm.train_dataset
    results = [dataset[(0, epoch)]["image"] for epoch in range(24)]
    assert all(torch.equal(results[e], dataset[(0, e)]["image"]) for e in range(24))
    distinct = {tuple(r[0, 0].tolist()) for r in results}
    assert len(distinct) > 3  # several offsets and both flip states
    flipped = sum(bool(r[0, 0, -1] == 1.0) for r in results)
    assert 0 < flipped < 24
    val = ImageFolderDataModule(str(tmp_path), image_size=16, val_fraction=0.0).val_transform
    assert not val.random_crop and not val.random_flip


def test_sidecar_and_jsonl_captions(tmp_path):
    _solid(tmp_path / "a.png", RED)
    (tmp_path / "a.txt").write_text("  a red square\n")
    _solid(tmp_path / "sub" / "b.png", GREEN)
    (tmp_path / "sub" / "b.txt").write_text("sidecar loses")
    _solid(tmp_path / "c.png", BLUE)
    lines = [{"file": "sub/b.png", "caption": "a green square"}, {"file": "gone.png", "caption": "x"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    with pytest.warns(MissingCaptionWarning) as caught:
        dm = _module(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "1 of 3 images" in messages and "gone.png" in messages
    captions = {Path(p).name: dm.train_dataset[i]["caption"] for i, p in enumerate(dm.train_dataset.paths)}
    assert captions == {"a.png": "a red square", "b.png": "a green square", "c.png": ""}
    assert dm.has_captions
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["caption"]) == 2
    assert "caption" not in _module(tmp_path, captions=False).train_dataset[0]


def test_malformed_jsonl_names_the_line(tmp_path):
    _solid(tmp_path / "a.png", RED)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="captions.jsonl:2"):
        _module(tmp_path)


def _corrupt_tree(root, good, bad):
    for i in range(good):
        _solid(root / f"good{i}.png", RED if i % 2 else BLUE)
    paths = []
    for i in range(bad):
        if i % 2:
            path = root / f"bad{i}.jpg"
            path.write_bytes(b"this is not a jpeg at all")
            paths.append(path)
        else:
            paths.append(_truncated_png(root / f"bad{i}.png"))
    return paths


def test_corrupt_files_are_skipped_lazily_and_counted(tmp_path):
    _corrupt_tree(tmp_path, good=6, bad=2)
    dm = _module(tmp_path, scan={"probe_size": 0})  # no probe: corruption only surfaces in __getitem__
    dataset = dm.train_dataset
    assert len(dataset) == 8
    names = [Path(p).name for p in dataset.paths]
    assert names[:2] == ["bad0.png", "bad1.jpg"]  # sorted: two unreadable files in a row
    with pytest.warns(UnreadableImageWarning) as caught:
        replaced = dataset[0]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "skipped 1 unreadable" in messages[0]
    assert "skipped 2 unreadable" in messages[1] and "bad0.png" in messages[1] and "bad1.jpg" in messages[1]
    # Replacement: the next readable file in cyclic order (good0.png), reproducibly.
    assert torch.equal(replaced["image"], dataset[2]["image"])
    assert torch.equal(replaced["image"], dataset[1]["image"])
    for key in range(8):
        assert dataset[key]["image"].shape == (3, 16, 16)
    assert dataset.num_skipped == 2
    assert sum(len(b["image"]) for b in dm.train_dataloader()) == 8  # no crash through the loader
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[0]  # known-bad files are skipped silently afterwards


def test_verify_drops_corrupt_files_at_setup(tmp_path):
    _corrupt_tree(tmp_path, good=5, bad=2)
    with pytest.warns(UnreadableImageWarning, match="skipped 2 unreadable"):
        dm = _module(tmp_path, scan={"verify": True, "probe_size": 0})
    assert len(dm.train_dataset) == 5 and all("good" in p for p in dm.train_dataset.paths)


def test_mostly_corrupt_folder_fails_clearly(tmp_path):
    _corrupt_tree(tmp_path, good=3, bad=7)
    with pytest.raises(ValueError, match="7 of 10 .*max_corrupt_fraction=0.5"):
        _module(tmp_path)  # the setup probe decodes all 10 (probe_size=32)
    with pytest.warns(UnreadableImageWarning):
        dm = _module(tmp_path, scan={"probe_size": 0})
        with pytest.raises(ValueError, match="max_corrupt_fraction"):
            for key in range(10):
                dm.train_dataset[key]
    with pytest.warns(UnreadableImageWarning, match="skipped 7 unreadable"):
        tolerant = _module(tmp_path, scan=FolderScanOptions(max_corrupt_fraction=0.8))
    assert len(tolerant.train_dataset) == 3


def test_empty_and_missing_roots_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'}.*does not exist"):
        _module(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=f"no image files .* under {empty}"):
        _module(empty)
    _solid(tmp_path / "file.png", RED)
    with pytest.raises(ValueError, match="not a directory"):
        _module(tmp_path / "file.png")


def test_split_stratifies_by_class(labelled):
    dm = _module(labelled, labels_from_subfolders=True, val_fraction=0.34)
    val_labels = sorted(dm.val_dataset[i]["label"] for i in range(len(dm.val_dataset)))
    assert val_labels == [0, 1]
    assert not set(dm.train_dataset.paths) & set(dm.val_dataset.paths)
    assert len(next(iter(dm.val_dataloader()))["image"]) == 2
    assert _module(labelled, val_fraction=0.0).val_dataloader() == []


def test_bad_options_fail_early(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        ImageFolderDataModule(str(tmp_path), mode="CMYK")
    with pytest.raises(ValueError, match="max_corrupt_fraction"):
        ImageFolderDataModule(str(tmp_path), scan={"max_corrupt_fraction": 1.5})
    with pytest.raises(ValueError, match="at least one image suffix"):
        FolderScanOptions(extensions=())
    with pytest.raises(ValueError, match="no image files to load under x"):
        FileImageDataset([], ImageTransform(8), where="x")


def test_config_requires_root_and_instantiates(tmp_path):
    cfg = OmegaConf.load(CONF / "folder.yaml")
    with pytest.raises(MissingMandatoryValue):
        instantiate(cfg)
    _solid(tmp_path / "a.png", RED)
    cfg.root = str(tmp_path)
    dm = instantiate(cfg, image_size=8, batch_size=1, num_workers=0, val_fraction=0.0)
    assert isinstance(dm, ImageFolderDataModule) and dm.scan.extensions[0] == ".jpg"
    dm.setup()
    assert dm.train_dataset[0]["image"].shape == (3, 8, 8)
