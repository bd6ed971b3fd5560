"""Sampling at ImageNet's size, simulated on the CPU: a 1,000-class model (the tiny UNet on 8x8 latents) on 2 gloo
processes draws its previews, in-training metrics and final samples (2,000 images) as streams. A probe
(tests/probe/sitecustomize.py) records every collective's payload and the sample images alive at once in each
process: no collective carries an image, no rank holds more than a few batches, and ``torchrun ldm-evaluate``
on 2 processes draws exactly the images one process draws."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ldm.lit.images import preview_conditions
from ldm.lit.latent_diffusion import PreviewConfig
from ldm.nets.conditioners import ClassEmbedder, Conditioner

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "probe"
BATCH = 100
JUDGE_DIM = 128  # the digit judge's features: what the metrics gather instead of the images
SCALE = ["cond.num_classes=1000", "sampler=ddim", "sampler.steps=2",
         "stage.module.preview.every_n_steps=2", "stage.module.preview.guidance_scales=[1.5]",
         "callbacks=sample_metrics", "callbacks.sample_metrics.every_n_steps=2", "callbacks.sample_metrics.per_class=1",
         "callbacks.sample_metrics.metrics=[accuracy,fid]", f"callbacks.sample_metrics.batch_size={BATCH}",
         "stage.final_samples.per_class=2", f"stage.final_samples.batch_size={BATCH}", "stage.final_samples.metrics=[fid]"]


def env(probe: Path | None = None) -> dict[str, str]:
    extra = {"LDM_PROBE_DIR": str(probe), "PYTHONPATH": f"{PROBE}{os.pathsep}{REPO}"} if probe else {"PYTHONPATH": str(REPO)}
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def run(cmd: list[str], environment: dict[str, str], timeout: float) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def probes(folder: Path) -> list[dict]:
    """The records of the processes that sampled (a launcher process samples nothing)."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return sorted((r for r in records if r["sampled_images"]), key=lambda r: r["rank"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_images_crossed(record: dict, largest_share: int) -> None:
    """No collective payload is an image batch (3-D or more) or a large pickled object, and none is larger than the
    features of one rank's largest share (its samples, or on a reference-cache miss its half of MNIST-5k's 4,500
    reference images): 512 bytes an image, where the image itself is 1,024 bytes as uint8 and 4,096 as float32."""
    items = [item for c in record["collectives"] for item in c["payload"]]
    assert items, "the probe saw no collective"
    assert not [i for i in items if i["shape"] is not None and len(i["shape"]) >= 3], "a collective carried images"
    objects = [i["bytes"] for i in items if i["shape"] is None]  # a rank that only receives sends no object
    assert max(objects, default=0) < 64 << 10, "a large object was pickled across"
    assert max(i["bytes"] for i in items) <= max(largest_share, 4500 // 2) * JUDGE_DIM * 4


def sampler(conditioner: Conditioner) -> SimpleNamespace:
    """What preview_conditions reads of a LatentDiffusion."""
    return SimpleNamespace(conditioner=conditioner, example_conditions=conditioner.example_conditions)


def test_preview_grid_is_a_fixed_capped_subset_of_a_thousand_classes():
    model = sampler(Conditioner([ClassEmbedder(num_classes=1000, embed_dim=4)]))
    first, nrow = preview_conditions(model, PreviewConfig())
    again, _ = preview_conditions(model, PreviewConfig())
    other, _ = preview_conditions(model, PreviewConfig(seed=7))
    assert len(first["label"]) == 64 and nrow == 8 and len(set(first["label"].tolist())) == 8
    assert first["label"].tolist() == again["label"].tolist() != other["label"].tolist()
    mnist = sampler(Conditioner([ClassEmbedder(num_classes=10, embed_dim=4)]))
    ten, nrow = preview_conditions(mnist, PreviewConfig())  # every digit, fewer of each: 10 x 6 <= 64
    assert sorted(set(ten["label"].tolist())) == list(range(10)) and nrow == 6 and len(ten["label"]) == 60


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run([sys.executable, "-m", "ldm.train", "stage=vae", "debug=fast", "data.batch_size=16", f"hydra.run.dir={out}"],
        env(), timeout=400)
    return out / "export"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_thousand_classes_on_two_processes_stream_without_gathering_images(stage1_export, tmp_path):
    run_dir, probe = tmp_path / "run", tmp_path / "probe_train"
    probe.mkdir()
    run([sys.executable, "-m", "ldm.train", "stage=ldm", f"first_stage.path={stage1_export}", "debug=fast",
         "model/ldm=unet_tiny", "trainer=ddp_sim", *SCALE, f"hydra.run.dir={run_dir}"], env(probe), timeout=900)

    # Previews: 8 of the 1,000 classes x 8, at steps 2 and 4 (a 1,000-class grid would be 8,000 images).
    for step in (2, 4):
        with Image.open(run_dir / "images" / f"samples_cfg1.5_step{step:07d}.png") as grid:
            assert grid.size == (8 * 34 + 2, 8 * 34 + 2)
    assert not list((run_dir / "images" / ".preview").glob("*.npz"))
    # Final samples: 2 per class, joined from the ranks' parts in class order.
    with np.load(run_dir / "samples" / "samples.npz") as final:
        assert final["arr_0"].shape == (2000, 32, 32, 1)
        assert final["labels"].tolist() == np.repeat(np.arange(1000), 2).tolist()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["accuracy_n"] == 2000 and results["fid_n"] == 2000 and results["fid"] > 0
    assert not list((run_dir / "samples").glob(".*parts*"))

    ranks = probes(probe)
    assert [r["rank"] for r in ranks] == [0, 1]
    for record in ranks:
        # Each rank drew half of every set: 2 previews x 64, 2 measurements x 1,000 (one at train end), 2,000.
        assert record["sampled_images"] == (2 * 64 + 2 * 1000 + 2000) // 2
        assert record["peak_live_images"] <= 3 * BATCH  # a few batches, never a rank's share (1,000)
        assert_no_images_crossed(record, largest_share=1000)

    # ldm-evaluate on the trained model: 2 processes under torchrun draw exactly what one process draws.
    args = ["-m", "ldm.evaluate", f"model_path={run_dir / 'export'}", "n=2", "sampler=ddim", "sampler.steps=2",
            "guidance_scale=1.5", "metrics=[fid]", f"batch_size={BATCH}"]
    single, multi, probe = tmp_path / "single", tmp_path / "multi", tmp_path / "probe_eval"
    probe.mkdir()
    run([sys.executable, *args, f"out_dir={single}"], env(), timeout=600)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args,
         f"out_dir={multi}"], env(probe), timeout=600)
    with np.load(single / "samples.npz") as a, np.load(multi / "samples.npz") as b:
        assert a["arr_0"].shape == (2000, 32, 32, 1)
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the same batches, seeds and code: bit for bit
        np.testing.assert_array_equal(a["labels"], b["labels"])
    one, two = (json.loads((d / "metrics.json").read_text())["metrics"]["fid"] for d in (single, multi))
    assert one["n"] == two["n"] == 2000 and one["value"] == pytest.approx(two["value"], rel=1e-6)
    for record in probes(probe):
        assert record["peak_live_images"] <= 3 * BATCH
        assert_no_images_crossed(record, largest_share=1000)


def test_the_first_stage_decodes_in_automatic_chunks_unless_told(monkeypatch):
    import torch

    import ldm.model.first_stage as first_stage_module
    from ldm.model import FirstStage

    class Recording(torch.nn.Module):
        embed_dim, downsample_factor = 3, 4

        def __init__(self):
            super().__init__()
            self.sizes: list[int] = []

        def decode(self, z):
            self.sizes.append(len(z))
            return z.repeat_interleave(4, -1).repeat_interleave(4, -2)

    autoencoder = Recording()
    stage = FirstStage(autoencoder, scale_factor=1.0)
    monkeypatch.setattr(first_stage_module, "AUTO_CHUNK_PIXELS", 3 * 32 * 32)  # three 32 px images a chunk
    stage.decode(torch.zeros(8, 3, 8, 8))
    assert autoencoder.sizes == [3, 3, 2]
    autoencoder.sizes, stage.chunk_size = [], 5
    stage.decode(torch.zeros(8, 3, 8, 8))
    assert autoencoder.sizes == [5, 3]


def test_the_backbone_samples_under_autocast_while_the_sampler_state_stays_fp32():
    import torch

    from ldm.model.latent_diffusion import autocast_backbone, sampling_autocast

    assert sampling_autocast("cpu", "bf16-mixed") is None  # not faster on the CPU at our sizes
    assert sampling_autocast("cuda", "bf16-mixed") is torch.bfloat16
    assert sampling_autocast("cuda", "16-mixed") is torch.float16
    assert sampling_autocast("cuda", "32-true") is None
    seen = []

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x, t, context=None, y=None):
            out = self.linear(x)
            seen.append(out.dtype)
            return out

    run = autocast_backbone(Backbone(), torch.bfloat16)
    out = run(torch.zeros(2, 4), torch.zeros(2), {"context": None, "y": None, "concat": None})
    assert seen == [torch.bfloat16] and out.dtype == torch.float32


def test_rank_parts_join_into_one_npz_that_is_read_memory_mapped(tmp_path):
    from ldm.io.samples import PartWriter, join_parts, open_images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    parts = []
    for rank, (start, stop) in enumerate([(0, 4), (4, 4), (4, 7)]):  # rank 1 drew nothing
        writer = PartWriter(tmp_path / f"rank{rank}.npy", stop - start)
        for row in range(start, stop, 2):
            writer.write(images[row : min(stop, row + 2)])
        parts.append(writer.close())
    path = join_parts(tmp_path / "samples.npz", parts, labels=np.arange(7), prompts=[f"p{i}" for i in range(7)])
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["arr_0"], images)
        assert stored["labels"].tolist() == list(range(7)) and stored["prompts"][3] == "p3"
    mapped = open_images(path)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped[2:5], images[2:5])
    with pytest.raises(ValueError, match="3 of 4 rows"):
        short = PartWriter(tmp_path / "short.npy", 4)
        short.write(images[:3])
        short.close()
