"""Aspect-ratio buckets: bucket sizes, assignment, resize-and-crop with its size record, one-bucket batches that
cover an epoch exactly once across ranks, mid-epoch resume, and the folder DataModule option."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import ResumableDataLoader, split_key
from ldm.data.buckets import (
    SIZE_KEYS,
    BucketBatches,
    BucketBatchSampler,
    BucketOptions,
    BucketTransform,
    assign_buckets,
    bucket_resolutions,
    collate_bucket_examples,
    stored_size,
)
from ldm.data.folder import ImageFolderDataModule
from ldm.data.image_files import UnreadableImageWarning

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"

# SDXL appendix (Podell et al. 2023), the buckets at 1024^2 with height <= width, as (height, width).
SDXL_BUCKETS = {
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
}


@pytest.mark.parametrize("base,step,max_aspect", [(256, 64, 2.0), (256, 32, 2.0), (1024, 64, 4.0), (64, 16, 3.0)])
def test_buckets_have_about_equal_area_and_valid_sides(base, step, max_aspect):
    resolutions = bucket_resolutions(BucketOptions(base, step, max_aspect))
    assert (base, base) in resolutions and len(set(resolutions)) == len(resolutions)
    for height, width in resolutions:
        assert height % step == 0 and width % step == 0
        assert max(height, width) <= max_aspect * min(height, width)
        # The largest multiple of step that fits: never above base^2, short of it by less than one row of steps.
        assert base**2 - step * max(height, width) < height * width <= base**2
        assert (width, height) in resolutions
    ratios = [w / h for h, w in resolutions]
    assert ratios == sorted(ratios)


def test_buckets_at_sdxl_scale_are_sdxls():
    ours = {tuple(sorted(hw)) for hw in bucket_resolutions(BucketOptions(1024, 64, 4.0))}
    assert ours <= SDXL_BUCKETS and len(ours) >= 17


def test_known_aspect_ratios_land_in_the_expected_bucket():
    resolutions = bucket_resolutions(BucketOptions(256, 64, 2.0))
    assert resolutions == [(320, 192), (256, 256), (192, 320)]
    sizes = [(100, 100), (480, 640), (640, 480), (300, 500), (100, 1000), (1000, 100), (256, 300)]
    expected = [(256, 256), (192, 320), (320, 192), (192, 320), (192, 320), (320, 192), (256, 256)]
    assert [resolutions[i] for i in assign_buckets(sizes, resolutions)] == expected
    # log-ratio distance: 1:1.25 is as far from 1:1 as 1.25:1, so the two land symmetrically.
    finer = bucket_resolutions(BucketOptions(256, 32, 2.0))
    wide, tall = assign_buckets([(400, 500), (500, 400)], finer)
    assert finer[wide] == finer[tall][::-1] == (224, 288)
    with pytest.raises(ValueError, match="positive"):
        assign_buckets([(0, 10)], resolutions)


def test_options_are_checked():
    with pytest.raises(ValueError, match="multiple of buckets.step"):
        BucketOptions(100, 64)
    with pytest.raises(ValueError, match="max_aspect"):
        BucketOptions(256, 64, 0.5)


def _gradient(height, width):
    """An image whose pixel values say where they came from: red = column, green = row."""
    cols = np.broadcast_to(np.linspace(0, 255, width), (height, width))
    rows = np.broadcast_to(np.linspace(0, 255, height)[:, None], (height, width))
    return Image.fromarray(np.stack([cols, rows, np.zeros((height, width))], -1).astype(np.uint8))


def test_resize_and_crop_records_the_original_size_and_crop():
    image = _gradient(90, 200)  # h, w
    tensor, sizes = BucketTransform()(image, (64, 96), np.random.default_rng(0))
    assert tensor.shape == (3, 64, 96) and tensor.dtype == torch.float32
    # cover: scale max(64/90, 96/200) = 0.711 -> 64 x 143, centre crop of 96 columns from 143
    assert sizes == {"original_size": (90, 200), "crop_coords": (0, 23), "target_size": (64, 96)}
    for seed in range(5):
        _, sizes = BucketTransform(random_crop=True)(image, (64, 96), np.random.default_rng(seed))
        assert sizes["crop_coords"][0] == 0 and 0 <= sizes["crop_coords"][1] <= 143 - 96


def test_a_flip_mirrors_the_recorded_crop():
    image = _gradient(64, 160)  # already the bucket's height: only cropped, never resized
    transform = BucketTransform(random_crop=True, random_flip=True)
    seen = set()
    for seed in range(12):
        tensor, sizes = transform(image, (64, 96), np.random.default_rng(seed))
        top, left = sizes["crop_coords"]
        flipped = torch.from_numpy(np.asarray(image)[:, ::-1].copy()).permute(2, 0, 1)  # the flipped original
        window = flipped[:, top : top + 64, left : left + 96].float() / 127.5 - 1
        unflipped = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[:, top : top + 64, left : left + 96]
        seen.add(torch.allclose(tensor, window, atol=1e-5))
        assert torch.allclose(tensor, window, atol=1e-5) or torch.allclose(tensor, unflipped.float() / 127.5 - 1)
    assert seen == {True, False}  # both flipped and unflipped samples were drawn and checked


def test_stored_size_applies_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 10)).save(path, exif=exif)
    assert stored_size(path) == (40, 10)
    assert BucketTransform().decode(path).size == (10, 40)  # PIL: (width, height)


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_batches_are_homogeneous_and_cover_an_epoch_once_across_ranks():
    bucket_ids = [0] * 12 + [1] * 8 + [2] * 4  # 3 + 2 + 1 = 6 batches of 4
    per_rank = [BucketBatchSampler(bucket_ids, 4, seed=7, num_replicas=2, rank=r) for r in range(2)]
    seen = []
    for sampler in per_rank:
        batches = _epoch(sampler, 3)
        assert len(batches) == len(sampler) == 3
        for batch in batches:
            assert {epoch for _, epoch in batch} == {3}
            assert len({bucket_ids[index] for index, _ in batch}) == 1
        seen += [index for batch in batches for index, _ in batch]
    assert sorted(seen) == list(range(24))
    # The order changes with the epoch and repeats for the same (seed, epoch).
    again = BucketBatchSampler(bucket_ids, 4, 7, num_replicas=2)
    assert _epoch(per_rank[0], 4) != _epoch(per_rank[0], 3) == _epoch(again, 3)


def test_partial_batches_and_rounds_are_dropped_but_never_mixed():
    bucket_ids = [0] * 7 + [1] * 5 + [2] * 3  # full batches of 3: 2 + 1 + 1 = 4
    sampler = BucketBatchSampler(bucket_ids, 3, seed=0, num_replicas=3, rank=0)
    assert sampler.num_batches_total == 4 and len(sampler) == 1  # one round of 3; the 4th batch waits
    ranks = [BucketBatchSampler(bucket_ids, 3, 0, num_replicas=3, rank=r) for r in range(3)]
    counts = Counter(i for sampler in ranks for b in _epoch(sampler, 0) for i, _ in b)
    assert max(counts.values()) == 1 and len(counts) == 9
    with pytest.raises(ValueError, match="lower data.batch_size"):
        BucketBatchSampler([0, 1, 2], 2, seed=0)


def test_validation_order_keeps_every_image_and_pads_ranks_equally():
    bucket_ids = [0] * 5 + [1] * 2  # batches of 2: [2, 2, 1] + [2] = 4 batches; 3 ranks -> 2 each, padded
    samplers = [BucketBatchSampler(bucket_ids, 2, 0, shuffle=False, drop_last=False, num_replicas=3, rank=r)
                for r in range(3)]
    per_rank = [_epoch(s, 0) for s in samplers]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert {i for batches in per_rank for b in batches for i, _ in b} == set(range(7))


class Keys(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, key):
        index, epoch = split_key(key)
        return {"image": torch.zeros(1, 2, 2), "original_size": (index, epoch), "crop_coords": (0, 0),
                "target_size": (2, 2)}


def _loader(num_workers=0):
    sampler = BucketBatchSampler([i % 3 for i in range(30)], 3, seed=5)
    return ResumableDataLoader(BucketBatches(Keys()), sampler=sampler, batch_size=None, num_workers=num_workers,
                               collate_fn=collate_bucket_examples, generator=torch.Generator().manual_seed(0))


def _keys(loader, epoch, limit=None):
    iterator = iter(loader)
    loader.sampler.set_epoch(epoch)  # as Lightning: after creating the iterator
    out = []
    for batch in iterator:
        out.append([tuple(row) for row in batch["original_size"].tolist()])
        if len(out) == limit:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_next_batch(num_workers):
    straight = _keys(_loader(), epoch=2)
    assert len(straight) == 9  # 3 buckets of 10: 3 full batches of 3 each
    first = _loader(num_workers)
    assert _keys(first, 2, limit=4) == straight[:4]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["samples_consumed"] == 4  # positions count batches
    resumed = _loader(num_workers)
    resumed.load_state_dict(state)
    assert _keys(resumed, 2) == straight[4:]
    assert _keys(resumed, 3) == _keys(_loader(), 3)


def _write_images(root, sizes, captions=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for number, (height, width) in enumerate(sizes):
        path = root / f"img{number:02d}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"picture {number}")
    return root


def test_folder_datamodule_serves_bucket_batches_from_its_config(tmp_path):
    # 10 wide, 10 tall, 10 square images; base 64, step 16, max_aspect 2: buckets 80x48, 64x64, 48x80
    sizes = [(30, 60)] * 10 + [(70, 35)] * 10 + [(40, 40)] * 10
    root = _write_images(tmp_path / "imgs", sizes)
    (root / "broken.png").write_bytes(b"not an image")
    cfg = OmegaConf.load(CONF / "folder.yaml")
    cfg.root, cfg.batch_size, cfg.num_workers, cfg.val_fraction = str(root), 4, 0, 0.1
    cfg.random_crop = True
    cfg.image_size, cfg.buckets = 64, {"step": 16, "max_aspect": 2.0}  # base_size: image_size
    dm = instantiate(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    assert any(issubclass(w.category, UnreadableImageWarning) for w in caught)
    assert dm.image_size == 64 and dm.bucket_resolutions == [(80, 48), (64, 64), (48, 80)]
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) >= 3
    targets = set()
    for batch in batches:
        height, width = batch["image"].shape[-2:]
        assert batch["image"].shape[:2] == (4, 3) and len(batch["caption"]) == 4
        for key in ("original_size", "crop_coords", "target_size"):
            assert batch[key].dtype == torch.long and batch[key].shape == (4, 2)
        assert (batch["target_size"] == torch.tensor([height, width])).all()
        original = batch["original_size"]
        # every image's aspect ratio is its bucket's nearest: wide images in wide buckets and so on
        assert ((original[:, 1] > original[:, 0]) == (width > height)).all()
        targets.add((int(height), int(width)))
        assert math.isclose(height * width, 64 * 64, rel_tol=0.07)
    assert targets == {(80, 48), (64, 64), (48, 80)}
    val = list(dm.val_dataloader())
    assert sum(len(b["caption"]) for b in val) == len(dm.val_dataset)
    assert all(b["image"].shape[-2:] == tuple(b["target_size"][0].tolist()) for b in val)


def test_folder_datamodule_without_buckets_is_unchanged(tmp_path):
    root = _write_images(tmp_path / "imgs", [(30, 60)] * 4, captions=False)
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=2, num_workers=0, val_fraction=0.0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and "original_size" not in batch


def test_too_few_images_for_one_bucket_batch_names_the_fix(tmp_path):
    root = _write_images(tmp_path / "imgs", [(30, 60), (60, 30), (40, 40)], captions=False)
    dm = ImageFolderDataModule(str(root), image_size=64, batch_size=2, num_workers=0, val_fraction=0.0,
                               buckets=BucketOptions(64, 16, 2.0))
    dm.setup("fit")
    with pytest.raises(ValueError, match="lower data.batch_size"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="set data.image_size instead"):
        ImageFolderDataModule(str(root), image_size=32, buckets={"base_size": 64, "step": 16})


def test_ldm_train_takes_steps_on_non_square_bucket_batches(tmp_path, compose_cfg):
    """Through the real entry point: bucket batches of 40x24, 32x32 and 24x40 px (10x6 .. 6x10 latents of an f4
    first stage) train and validate stage 2."""
    from ldm.io.export import save_export
    from ldm.train import train

    autoencoder_cfg = compose_cfg(["model/vae=kl_f4"]).model.vae.autoencoder
    autoencoder = instantiate(autoencoder_cfg)
    export = save_export(tmp_path / "vae", autoencoder.state_dict(),
                         {"autoencoder": OmegaConf.to_container(autoencoder_cfg, resolve=True)},
                         {"kind": "autoencoder", "latent_channels": 3, "downsample_factor": 4, "latent_std": 1.0})
    root = _write_images(tmp_path / "imgs", [(30, 60)] * 6 + [(70, 35)] * 6 + [(40, 40)] * 6, captions=False)
    cfg = compose_cfg(["stage=ldm", "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0",
                       "model/ldm=unet_tiny", "cond=sizes", "cond.conditioner.embedders.0.dim=8", "data=folder", f"data.root={root}", "data.mode=L",
                       "data.batch_size=2", "data.num_workers=0", "data.val_fraction=0.2",
                       "data.image_size=32", "data.buckets={step: 8, max_aspect: 2.0}", f"first_stage.path={export}",
                       "stage.max_steps=3", "stage.val_check_interval=3", "+trainer.limit_val_batches=2",
                       "logger=csv"], tmp_path / "run")
    train(cfg)
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    # cond=sizes wired the backbone's vector y from the conditioner (6 scalars x 8 features), and the sizes reach it
    from ldm.io.load import load_ldm

    model, _ = load_ldm(tmp_path / "run" / "export")
    assert model.backbone.adm_in_channels == 48 and model.conditioner.batch_keys == SIZE_KEYS
    model.conditioner.eval()
    wide = model.conditioner({"original_size": torch.tensor([[30, 60]]), "crop_coords": torch.tensor([[0, 4]]),
                              "target_size": torch.tensor([[24, 40]])})["y"]
    default = model.conditioner({"n": [None]}, allow_missing=True)["y"]
    assert wide.shape == default.shape == (1, 48) and not torch.equal(wide, default)
