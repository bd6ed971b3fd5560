"""ldm-prepare: folders, webdataset tars and torchvision data into litdata shards; atomic re-runs; clear errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.data.base import sample_seed
from ldm.data.captions import caption_for
from ldm.data.image_files import UnreadableImageWarning
from ldm.data.shards import INDEX, ShardError, read_index
from ldm.prepare import prepare

REPO = Path(__file__).resolve().parents[1]


def compose_prepare(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("prepare", overrides=overrides)


def write_folder(root: Path, n: int, classes=("a", "b"), captions: bool = True) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i % 5, 28, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"picture {i} of {classes[i % len(classes)]}")


def jpeg(seed: int, size=(24, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_tar(path: Path, first: int, count: int, caption: bool = True) -> None:
    """img2dataset's layout: <key>.jpg + <key>.txt + <key>.json per sample (the json has the original size)."""
    members = {}
    for i in range(first, first + count):
        key = f"{i:09d}"
        members[f"{key}.jpg"] = jpeg(i)
        if caption or i != first + 1:
            members[f"{key}.txt"] = f"a photo number {i}".encode()
        members[f"{key}.json"] = json.dumps({"key": key, "original_width": 640 + i, "original_height": 480}).encode()
    write_tar(path, members)


def raw_samples(folder: Path) -> list[dict]:
    from litdata import StreamingDataset

    dataset = StreamingDataset(str(folder))
    return [dataset[i] for i in range(len(dataset))]


def test_folder_to_shards_keeps_bytes_captions_labels_and_sizes_and_skips_a_corrupt_file(tmp_path):
    write_folder(tmp_path / "img", 10)
    (tmp_path / "img" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.warns(UnreadableImageWarning, match="broken.png"):
        result = prepare(compose_prepare([f"source.root={tmp_path / 'img'}", f"output={tmp_path / 'out'}",
                                          "source.labels_from_subfolders=true", "source.samples_per_shard=4",
                                          "chunk_bytes=3000"]))
    assert result["num_samples"] == 10 and result["num_shards"] == 3 and result["skipped_unreadable"] == 1
    meta = read_index(tmp_path / "out")
    assert meta["class_names"] == ["a", "b"] and meta["num_classes"] == 2 and meta["has_captions"]
    samples = raw_samples(tmp_path / "out")
    assert len({s["id"] for s in samples}) == 10
    for sample in samples:
        path = tmp_path / "img" / sample["key"]
        assert bytes(sample["image"]) == path.read_bytes()  # the original encoding, untouched
        assert sample["caption"] == path.with_suffix(".txt").read_text()
        assert sample["label"] == ["a", "b"].index(path.parent.name)
        with Image.open(path) as image:
            assert (sample["width"], sample["height"]) == image.size
        assert sample["aspect"] == pytest.approx(sample["width"] / sample["height"])
    # More than the tolerated share unreadable: refused, naming the files.
    for i in range(12):
        (tmp_path / "img" / "b" / f"bad{i}.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="are unreadable, more than max_corrupt_fraction=0.5"):
        prepare(compose_prepare([f"source.root={tmp_path / 'img'}", f"output={tmp_path / 'out2'}"]))


@pytest.mark.timeout(300)
def test_webdataset_tars_in_img2dataset_layout_become_shards_in_two_worker_processes(tmp_path):
    img2dataset_tar(tmp_path / "000000.tar", 0, 5)
    img2dataset_tar(tmp_path / "000001.tar", 5, 4)
    result = prepare(compose_prepare(["source=webdataset", f"source.urls='{tmp_path}/{{000000..000001}}.tar'",
                                      f"output={tmp_path / 'out'}", "num_workers=2"]))
    assert result["num_samples"] == 9 and result["num_shards"] == 2 and result["num_classes"] is None
    samples = {s["key"]: s for s in raw_samples(tmp_path / "out")}
    assert sorted(samples) == [f"{tar:06d}/{i:09d}" for tar, i in [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4),
                                                                  (1, 5), (1, 6), (1, 7), (1, 8)]]
    sample = samples["000001/000000007"]
    assert sample["caption"] == "a photo number 7" and bytes(sample["image"]) == jpeg(7)
    # The original size from img2dataset's json, not the stored (resized) image's.
    assert (sample["width"], sample["height"]) == (647, 480) and sample["label"] == -1
    assert sample["id"] == 1 * 2**32 + 2  # shard 1, third sample


def test_a_webdataset_sample_without_its_caption_is_named_or_gets_the_empty_prompt(tmp_path):
    img2dataset_tar(tmp_path / "000000.tar", 0, 3, caption=False)
    base = ["source=webdataset", f"source.urls=[{tmp_path / '000000.tar'}]"]
    with pytest.raises(ValueError, match=r"sample 000000/000000001 .* has no 'txt' member.*require_captions=false"):
        prepare(compose_prepare([*base, f"output={tmp_path / 'a'}"]))
    prepare(compose_prepare([*base, f"output={tmp_path / 'b'}", "source.require_captions=false",
                             "source.image_keys=[png,jpg]"]))
    assert sorted(s["caption"] for s in raw_samples(tmp_path / "b")) == ["", "a photo number 0", "a photo number 2"]
    prepare(compose_prepare([*base, f"output={tmp_path / 'c'}", "source.captions=false", "source.caption_key=cap"]))
    assert read_index(tmp_path / "c")["has_captions"] is False
    write_tar(tmp_path / "broken.tar", {"x.jpg": b"1"})
    (tmp_path / "broken.tar").write_bytes((tmp_path / "broken.tar").read_bytes()[:700])
    with pytest.raises(ValueError, match="cannot read webdataset tar .*broken.tar"):
        prepare(compose_prepare(["source=webdataset", f"source.urls={tmp_path}/broken*.tar", f"output={tmp_path / 'd'}"]))


def test_a_rerun_skips_finished_shards_and_rewrites_only_the_unfinished_one(tmp_path):
    write_folder(tmp_path / "img", 9)
    overrides = [f"source.root={tmp_path / 'img'}", f"output={tmp_path / 'out'}", "source.samples_per_shard=3"]
    first = prepare(compose_prepare(overrides))
    assert (first["shards_written"], first["shards_reused"]) == (3, 0)
    chunks = sorted((tmp_path / "out").glob("shard-*.bin"))
    before = {c.name: c.stat().st_mtime_ns for c in chunks}
    # An interrupted run: shard 1 never got its manifest, the index was never written.
    (tmp_path / "out" / ".manifests" / "shard-000001.json").unlink()
    (tmp_path / "out" / INDEX).unlink()
    with pytest.raises(ShardError, match="unfinished shards.*run the same ldm-prepare command again"):
        read_index(tmp_path / "out")
    second = prepare(compose_prepare(overrides))
    assert (second["shards_written"], second["shards_reused"]) == (1, 2) and second["num_samples"] == 9
    after = {c.name: c.stat().st_mtime_ns for c in sorted((tmp_path / "out").glob("shard-*.bin"))}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == [n for n in after if n.startswith("shard-000001-")]
    assert not list((tmp_path / "out").glob(".tmp-*"))
    # The source changed under a finished shard: refused rather than mixing old and new samples.
    Image.new("RGB", (50, 50)).save(tmp_path / "img" / "a" / "000.png")
    with pytest.raises(ShardError, match="written from another source slice.*Write to a new output folder"):
        prepare(compose_prepare(overrides))


def _write_idx(path: Path, array: np.ndarray) -> None:
    import struct

    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_a_torchvision_dataset_becomes_png_shards_with_labels_and_class_captions(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(6) % 10)
    result = prepare(compose_prepare(["source=torchvision", "source.name=mnist", f"source.root={tmp_path}",
                                      "source.split=test", "source.samples_per_shard=4", "source.download=false",
                                      f"output={tmp_path / 'out'}"]))
    assert result["num_samples"] == 6 and result["num_classes"] == 10 and result["has_captions"]
    for sample in raw_samples(tmp_path / "out"):
        index = int(sample["key"].rsplit("/", 1)[1])
        assert sample["key"].startswith("mnist/test/")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(bytes(sample["image"])))), images[index])
        assert sample["label"] == index  # labels were arange(6)
        assert sample["caption"] == caption_for(index, np.random.default_rng(sample_seed(0, 0, index)))
    no_captions = prepare(compose_prepare(["source=torchvision", "source.name=mnist", f"source.root={tmp_path}",
                                           "source.captions=false", f"output={tmp_path / 'out2'}"]))
    assert no_captions["has_captions"] is False


def test_ldm_prepare_help_lists_the_sources_and_bad_input_is_one_line(tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    help_text = subprocess.run([sys.executable, "-m", "ldm.prepare", "--help"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120).stdout
    assert "ldm-prepare" in help_text and "source: folder, torchvision, webdataset" in help_text
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ldm.prepare", f"source.root={empty}", f"output={tmp_path / 'o'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ldm-prepare: error:")
    assert "no image files found under" in proc.stderr and "Traceback" not in proc.stderr
