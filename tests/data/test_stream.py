"""data=stream: ldm-prepare shards through litdata into training, on 1 and 2 gloo processes, with exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from ldm.data.image_files import UnreadableImageWarning
from ldm.data.shards import INDEX, ShardError, write_index, write_shard
from ldm.data.stream import StreamDataModule
from ldm.prepare import prepare

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{HERE}{os.pathsep}{REPO}")


class BatchRecorder(pl.Callback):
    """Test-only: each rank writes the sample ids and losses of its training batches to rank<r>.json."""

    def __init__(self, folder: str) -> None:
        self.folder, self.ids, self.losses = Path(folder), [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ids.append(batch["id"].tolist())
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"ids": self.ids, "losses": self.losses, "global_step": trainer.global_step,
                  "world_size": trainer.world_size}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def write_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36 + i % 3, 40), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"digit {i % 2}")


def prepare_shards(root: Path, out: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"source.root={root}", f"output={out}", "source.labels_from_subfolders=true",
                                            "source.samples_per_shard=6", "chunk_bytes=6000", *extra])
    return prepare(cfg)


def run(args: list[str], timeout: float = 400) -> None:
    proc = subprocess.run([sys.executable, "-m", "ldm.train", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run(["stage=vae", "debug=fast", "logger=csv", "data.batch_size=16", f"hydra.run.dir={out}"])
    return out / "export"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 labelled, captioned 40x36 images in 4 shards of several chunks each."""
    root = tmp_path_factory.mktemp("stream")
    write_images(root / "img", 24)
    prepare_shards(root / "img", root / "shards")
    return root / "shards"


def ldm_args(export: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={export}", "debug=fast", "logger=csv", "data=stream",
            f"data.path={shards}", f"data.val_path={shards}", "data.mode=L", "data.image_size=32", "data.batch_size=4",
            "data.num_workers=0", "cond.num_classes=2", "stage.final_samples.enabled=false",
            f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}",
            "+callbacks.recorder._target_=test_stream.BatchRecorder", f"+callbacks.recorder.folder={out}", *extra]


def recorded(folder: Path, world: int = 1) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


def test_folder_shards_train_through_ldm_train(export, shards, tmp_path):
    run(ldm_args(export, shards, tmp_path, "stage.max_steps=2", "data.random_crop=true"))
    (rank,) = recorded(tmp_path)
    assert rank["global_step"] == 2 and all(len(ids) == 4 for ids in rank["ids"])
    assert all(np.isfinite(rank["losses"]))


def datamodule(path: Path, **kwargs) -> StreamDataModule:
    dm = StreamDataModule(str(path), **{"image_size": 32, "mode": "L", "batch_size": 4, "num_workers": 0, **kwargs})
    dm.setup("fit")
    return dm


def epochs(loader, n: int) -> list[list[dict]]:
    return [list(loader) for _ in range(n)]


def test_order_crops_and_flips_follow_seed_epoch_and_sample_id(shards, tmp_path):
    a, b = (datamodule(shards, random_crop=True, cache_dir=str(tmp_path / "cache")) for _ in range(2))
    assert a.train_dataset.cache_dir.path == str(tmp_path / "cache")
    first, second = epochs(a.train_dataloader(), 2), epochs(b.train_dataloader(), 2)
    for x, y in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(x["id"], y["id"]) and torch.equal(x["image"], y["image"])
    ids = [torch.cat([batch["id"] for batch in epoch]).tolist() for epoch in first]
    assert sorted(ids[0]) == sorted(ids[1]) and ids[0] != ids[1] and len(set(ids[0])) == 24  # reshuffled, all seen
    other = datamodule(shards, random_crop=True, seed=1)
    assert torch.cat([batch["id"] for batch in other.train_dataloader()]).tolist() != ids[0]
    batch = first[0][0]
    assert batch["image"].shape == (4, 1, 32, 32) and set(batch["label"].tolist()) <= {0, 1}
    assert batch["caption"] == [f"digit {label}" for label in batch["label"].tolist()]


@pytest.mark.parametrize("num_samples", [24, 26, 29])
def test_ranks_get_disjoint_equal_shares_and_leave_out_less_than_one_round(tmp_path, monkeypatch, num_samples):
    """litdata reads the rank from the process group or WORLD_SIZE/GLOBAL_RANK; this test sets the variables to
    build each rank's loader in one process (the 2-process run below checks the same under Lightning DDP)."""
    write_images(tmp_path / "img", num_samples)
    prepare_shards(tmp_path / "img", tmp_path / "shards")
    shares = []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = datamodule(tmp_path / "shards").train_dataloader()
        shares.append(torch.cat([batch["id"] for batch in loader]).tolist())
    assert len(shares[0]) == len(shares[1]) and not set(shares[0]) & set(shares[1])
    seen = len(shares[0]) * 2
    assert len(set(shares[0]) | set(shares[1])) == seen and num_samples - 2 * 4 < seen <= num_samples


@pytest.mark.timeout(600)
def test_two_gloo_processes_see_every_sample_of_an_epoch_once(export, shards, tmp_path):
    """Lightning DDP (trainer=ddp_sim, 2 gloo processes): 24 samples, batch 4 per rank = 3 steps per epoch."""
    run(ldm_args(export, shards, tmp_path, "trainer=ddp_sim", "stage.max_steps=3", "stage.val_check_interval=3"))
    ranks = recorded(tmp_path, 2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    ids = [[i for batch in r["ids"] for i in batch] for r in ranks]
    assert len(ids[0]) == len(ids[1]) == 12 and not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == 24


def test_empty_unfinished_or_corrupt_shard_folders_fail_clearly(shards, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no shards in .*empty .*ldm-prepare source=... output="):
        datamodule(tmp_path / "empty")
    with pytest.raises(ShardError, match="does not exist"):
        datamodule(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in shards.iterdir():
        if file.is_file():
            (broken / file.name).write_bytes(file.read_bytes())
    chunk = sorted(broken.glob("shard-000002-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])  # a truncated copy
    with pytest.raises(ShardError, match=r"shard-000002-00000.bin has 100 bytes.*Delete .*shard-000002.json"):
        datamodule(broken)
    (broken / INDEX).write_text("{not json")
    with pytest.raises(ShardError, match="index.json is corrupt"):
        datamodule(broken)


def test_unreadable_samples_are_skipped_counted_and_batches_keep_their_size(tmp_path):
    """Bytes that stop decoding after ldm-prepare checked them (bit rot) are skipped at training time."""
    Image.new("L", (40, 40), 128).save(tmp_path / "ok.png")
    png = (tmp_path / "ok.png").read_bytes()
    samples = [{"id": i, "key": f"s{i}", "image": png if i != 3 else b"\x89PNG broken", "caption": "", "label": -1,
                "width": 40, "height": 40, "aspect": 1.0} for i in range(8)]
    manifest = write_shard(tmp_path / "out", 0, samples, "test", "test", 10_000)
    write_index(tmp_path / "out", [manifest], {"has_captions": False, "num_classes": None, "class_names": [],
                                               "encode": None})
    dm = datamodule(tmp_path / "out", max_corrupt_fraction=0.2)
    with pytest.warns(UnreadableImageWarning, match="skipped 1 unreadable image.*s3"):
        batches = list(dm.train_dataloader())
    assert [len(b["id"]) for b in batches] == [4, 4] and dm.num_skipped == 1
    assert 3 not in torch.cat([b["id"] for b in batches]).tolist()  # its slot holds another sample of the batch
    assert "label" not in batches[0] and "caption" not in batches[0]


def _shards_with_broken(out: Path, broken: set[int], n: int) -> Path:
    Image.new("L", (40, 40), 128).save(out.parent / "ok.png")
    png = (out.parent / "ok.png").read_bytes()
    samples = [{"id": i, "key": f"s{i}", "image": png if i not in broken else b"\x89PNG broken", "caption": "",
                "label": -1, "width": 40, "height": 40, "aspect": 1.0} for i in range(n)]
    manifest = write_shard(out, 0, samples, "test", "test", 2_000)  # several chunks: the workers share them
    write_index(out, [manifest], {"has_captions": False, "num_classes": None, "class_names": [], "encode": None})
    return out


def test_unreadable_samples_are_counted_over_all_loader_workers(tmp_path):
    """Each DataLoader worker decodes its own samples: the count and the tolerated fraction are the process's."""
    out = _shards_with_broken(tmp_path / "out", {3, 12}, 16)
    dm = datamodule(out, num_workers=2, max_corrupt_fraction=0.2)
    with pytest.warns(UnreadableImageWarning, match="skipped 2 unreadable images"):
        batches = list(dm.train_dataloader())
    assert len(batches) == 4 and dm.num_skipped == 2
    # 4 of 16 unreadable, 2 in each worker's half: 0.25 of the data, more than the 0.2 tolerated
    out = _shards_with_broken(tmp_path / "out4", {1, 5, 9, 13}, 16)
    with pytest.raises(ValueError, match="4 of 16 image files checked .* max_corrupt_fraction=0.2"):
        list(datamodule(out, num_workers=2, max_corrupt_fraction=0.2).train_dataloader())


def test_example_captions_are_distinct_seeded_captions_of_the_shards(shards):
    """What a text model's previews draw when no prompts are configured (read in the main process, before any
    loader worker exists)."""
    dm = datamodule(shards, val_path=str(shards))
    assert sorted(dm.example_captions(4, 0)) == ["digit 0", "digit 1"]  # the only two captions there are
    assert dm.example_captions(1, 0) == dm.example_captions(1, 0)


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        flat.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return flat


def kill_after_first_checkpoint(args: list[str], run_dir: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-m", "ldm.train", *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and any rank it spawned
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    return int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])


def assert_resume_is_exact(export: Path, shards: Path, tmp_path: Path, *extra: str) -> None:
    """SIGKILL after the first last.ckpt, ckpt_path=last: the end state equals a straight run's bit for bit. 8 steps
    of 4 samples cross an epoch boundary (24 samples, or 12 per rank on 2), so the resume lands mid-epoch and the
    next epoch's reshuffle must follow too."""
    common = ["stage.max_steps=8", "stage.val_check_interval=2", *extra]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(ldm_args(export, shards, straight, *common))
    step = kill_after_first_checkpoint(ldm_args(export, shards, killed, *common), killed)
    assert 0 < step < 8
    run(ldm_args(export, shards, killed, *common, "ckpt_path=last"))
    a, b = (checkpoint_state(run_dir / "checkpoints" / "last.ckpt") for run_dir in (straight, killed))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resuming at step {step}, e.g. {different[:4]}"
    world = 2 if "trainer=ddp_sim" in extra else 1
    for before, after in zip(recorded(straight, world), recorded(killed, world)):
        assert after["ids"] == before["ids"][step:]  # the resumed run saw exactly the straight run's remaining batches


@pytest.mark.timeout(600)
def test_sigkill_then_ckpt_path_last_resumes_bit_for_bit(export, shards, tmp_path):
    assert_resume_is_exact(export, shards, tmp_path, "trainer.deterministic=true", "data.random_crop=true")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_killed_mid_epoch_resume_bit_for_bit(export, shards, tmp_path):
    assert_resume_is_exact(export, shards, tmp_path, "trainer=ddp_sim")


def test_a_restored_position_applies_to_one_epoch_only(shards):
    """Lightning stops at an epoch's known length without exhausting the loader; the epoch after a resume must
    start fresh rather than replay the checkpoint's position (litdata alone would)."""
    loader = datamodule(shards).train_dataloader()
    batches = iter(loader)
    straight = [next(batches)["id"].tolist() for _ in range(2)]
    state = loader.state_dict()
    rest = [batch["id"].tolist() for batch in batches]
    following = [batch["id"].tolist() for batch in loader]
    resumed = datamodule(shards).train_dataloader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    assert next(batches)["id"].tolist() == rest[0] and straight[0] != rest[0]
    assert [batch["id"].tolist() for batch in resumed] == following
