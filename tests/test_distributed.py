"""Multi-process stage-2 training for real: 2 gloo processes on the CPU through ``python -m ldm.train``, with
previews, in-training sample metrics and final samples on. Each rank writes what it drew and what it ended
with, so the tests can compare ranks and runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAST = ["debug=fast", "logger=csv", "model/ldm=unet_tiny", "data.batch_size=8"]
# Previews, in-training metrics (20 images) and final samples (30 images) on, at a few sampler steps.
SAMPLING = [
    "callbacks=sample_metrics", "callbacks.sample_metrics.every_n_steps=2", "callbacks.sample_metrics.per_class=2",
    "callbacks.sample_metrics.metrics=[accuracy,fid]", "stage.module.preview.every_n_steps=2",
    "stage.module.preview.per_class=1", "stage.final_samples.per_class=3", "stage.final_samples.metrics=[fid]",
    "sampler=ddim", "sampler.steps=4",
    "stage.keep_guide_at_step=2",  # an autoguidance guide export (the EMA of step 2), gathered under FSDP
]


def state_hash(module: torch.nn.Module) -> str:
    """Of this rank's tensors: its shards under FSDP."""
    from ldm.lit.sharding import local

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(local(tensor.detach()).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class RankRecorder(pl.Callback):
    """Test-only: each rank records the timesteps of its training steps, its final weights and the metrics
    it holds, in ``rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.timesteps: list[list[int]] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        objective, draw = pl_module.model.objective, pl_module.model.objective.sample_timesteps

        def recording(batch_size, like, generator=None):
            t = draw(batch_size, like, generator)
            if pl_module.training:
                self.timesteps.append(t.tolist())
            return t

        objective.sample_timesteps = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        record = {
            "losses": self.losses,
            "cache": {"hits": getattr(datamodule, "hits", None), "misses": getattr(datamodule, "misses", None)},
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "unet": state_hash(pl_module.model.backbone),
            "ema": state_hash(pl_module.ema.model) if pl_module.ema is not None else None,
            "timesteps": self.timesteps,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        }
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_train(overrides: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m ldm.train`` with one thread per process (two 2-thread processes on 2 cores crawl)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", **(env or {}))
    cmd = [sys.executable, "-m", "ldm.train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"ldm-train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def recorded(folder: Path, world: int = 2) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run_train(["stage=vae", "debug=fast", "logger=csv", "data.batch_size=16", f"hydra.run.dir={out}"], timeout=300)
    return out / "export"


def ldm_overrides(stage1_export: Path, out: Path, *extra: str) -> list[str]:
    return ["stage=ldm", f"first_stage.path={stage1_export}", *FAST, f"hydra.run.dir={out}",
            "+callbacks.recorder._target_=test_distributed.RankRecorder", f"+callbacks.recorder.folder={out}", *extra]


@pytest.fixture(scope="module")
def ddp_runs(stage1_export, tmp_path_factory) -> list[Path]:
    """Two identical DDP runs (2 gloo processes, same seed)."""
    runs = [tmp_path_factory.mktemp("ddp_a"), tmp_path_factory.mktemp("ddp_b")]
    for out in runs:
        run_train(ldm_overrides(stage1_export, out, "trainer=ddp_sim", *SAMPLING), timeout=400)
    return runs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_two_processes_with_metrics_and_final_samples(ddp_runs):
    """The default-run multi-process test: DDP over 2 gloo processes finishes (no hang in the metrics'
    or final samples' collectives), keeps the ranks' weights identical, draws different timesteps on each
    rank, gives every rank the same metric values, and repeats itself bit for bit."""
    runs = ddp_runs
    first, second = recorded(runs[0]), recorded(runs[1])
    for ranks in (first, second):
        assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [4, 4]
        assert ranks[0]["unet"] == ranks[1]["unet"] and ranks[0]["ema"] == ranks[1]["ema"]
        # Rank-aware noise: each rank drew its own timesteps at every step.
        assert len(ranks[0]["timesteps"]) == 4
        for t0, t1 in zip(ranks[0]["timesteps"], ranks[1]["timesteps"]):
            assert t0 != t1
        # The in-training metrics were measured once and broadcast: identical on both ranks.
        assert {"val/accuracy", "val/fid", "val/loss"} <= set(ranks[0]["metrics"])
        assert ranks[0]["metrics"] == ranks[1]["metrics"]
    # Same seed, same world size: the same run, bit for bit.
    assert [r["timesteps"] for r in first] == [r["timesteps"] for r in second]
    assert first[0]["ema"] == second[0]["ema"]
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["accuracy_n"] == 30 and 0.0 <= results["accuracy"] <= 1.0 and results["fid"] > 0
    manifest = json.loads((runs[0] / "samples" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    import numpy as np

    with np.load(runs[0] / "samples" / "samples.npz") as samples:
        assert samples["arr_0"].shape == (30, 32, 32, 1) and samples["labels"].tolist() == sorted(samples["labels"].tolist())
    assert any((runs[0] / "csv").rglob("metrics.csv"))


def export_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_two_processes_match_ddp_with_ema_previews_and_final_samples(stage1_export, ddp_runs, tmp_path):
    """FSDP2 (trainer=fsdp_sim: ModelParallelStrategy + fully_shard on 2 gloo processes) with EMA,
    previews, metrics and final samples on: it finishes, and its export (EMA gathered from the shards)
    equals the DDP export after the same steps within float tolerance."""
    ddp, fsdp = ddp_runs[0], tmp_path / "fsdp"
    run_train(ldm_overrides(stage1_export, fsdp, "trainer=fsdp_sim", *SAMPLING), timeout=400)
    ranks = recorded(fsdp)
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and "val/accuracy" in ranks[0]["metrics"]
    # Each rank hashed its own shards: they differ (the model really is sharded) ...
    assert ranks[0]["unet"] != ranks[1]["unet"]
    ddp_tensors, fsdp_tensors = export_tensors(ddp), export_tensors(fsdp)
    assert ddp_tensors.keys() == fsdp_tensors.keys()
    for key, value in ddp_tensors.items():
        torch.testing.assert_close(fsdp_tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The guide (the EMA of step 2, gathered into rank 0 then and kept there) too; it is not the final EMA.
    from safetensors.torch import load_file

    ddp_guide, fsdp_guide = (load_file(str(run / "export" / "guide" / "model.safetensors")) for run in (ddp, fsdp))
    assert ddp_guide.keys() == fsdp_guide.keys() == ddp_tensors.keys()
    for key, value in ddp_guide.items():
        torch.testing.assert_close(fsdp_guide[key], value, rtol=1e-4, atol=1e-5, msg=key)
    backbone = [k for k in ddp_guide if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(fsdp_guide[k], fsdp_tensors[k]) for k in backbone)
    # ... yet the EMA was averaged, not copied from the live weights.
    assert json.loads((fsdp / "results.json").read_text())["accuracy_n"] == 30


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_simulated_nodes_train_exactly_as_one_node_with_two_processes(stage1_export, ddp_runs, tmp_path):
    """2 nodes x 1 process on localhost (Lightning's num_nodes with NODE_RANK / MASTER_ADDR / MASTER_PORT, one
    launch per node as on a cluster without SLURM): the same global ranks as 1 node x 2 processes, so the
    same data, noise and gradients, hence the same export, bit for bit."""
    overrides = ldm_overrides(stage1_export, tmp_path, "trainer=ddp_sim", "trainer.devices=1", "trainer.num_nodes=2",
                              *SAMPLING)
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    nodes = [subprocess.Popen([sys.executable, "-m", "ldm.train", *overrides], cwd=REPO, env={**base, "NODE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [node.communicate(timeout=500)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-4000:] for o in outputs)
    ranks = recorded(tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["timesteps"] for r in ranks] == [r["timesteps"] for r in recorded(ddp_runs[0])]
    one_node, two_nodes = export_tensors(ddp_runs[0]), export_tensors(tmp_path)
    assert one_node.keys() == two_nodes.keys()
    assert all(torch.equal(one_node[k], two_nodes[k]) for k in one_node)
    assert json.loads((tmp_path / "results.json").read_text())["accuracy_n"] == 30


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights (UNet, EMA, class embeddings) and optimizer moments of a checkpoint, flattened."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, state in ckpt["optimizer_states"][0]["state"].items():
        flat.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    return flat


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_run_killed_mid_epoch_resumes_bit_for_bit(stage1_export, tmp_path):
    """SIGKILL both processes of a 2-process DDP run after its first checkpoint, resume with ckpt_path=last:
    the weights, EMA and optimizer state at the end equal the straight run's bit for bit (the data position
    of each rank and the per-rank noise both continue exactly; MNIST-5k's epoch is ~280 steps long here)."""
    import signal
    import time

    common = ["trainer=ddp_sim", "stage.max_steps=8", "stage.val_check_interval=2", "stage.final_samples.enabled=false",
              "stage.module.preview.every_n_steps=0", "stage.module.ema.warmup_steps=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(ldm_overrides(stage1_export, straight, *common), timeout=400)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{TESTS}{os.pathsep}{REPO}")
    cmd = [sys.executable, "-m", "ldm.train", *ldm_overrides(stage1_export, killed, *common)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it spawned
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    step_at_kill = checkpoint["global_step"]
    assert 0 < step_at_kill < 8
    # The frozen first stage is not stored: it is reloaded from first_stage.path, checked by its fingerprint.
    assert not any(k.startswith(("model.first_stage.", "first_stage.")) for k in checkpoint["state_dict"])
    assert any(k.startswith("model.first_stage.") for k in checkpoint["frozen_state_omitted"])

    run_train(ldm_overrides(stage1_export, killed, *common, "ckpt_path=last"), timeout=400)
    a, b = checkpoint_state(straight / "checkpoints" / "last.ckpt"), checkpoint_state(last)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after the resume at step {step_at_kill}, e.g. {different[:5]}"
    assert recorded(killed)[0]["global_step"] == 8


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_slurm_requeue_signal_checkpoints_every_rank_requeues_and_the_requeued_job_resumes(stage1_export, tmp_path):
    """Two processes started as srun would start them (SLURM_PROCID etc.; only `scontrol` is a stub). The
    SIGUSR2 that submitit asks SLURM to send before the time limit makes both ranks stop at the same step
    boundary with last.ckpt written and exit 143; rank 0 requeues the job once. Without run_name, both ranks
    and the requeued job use one folder named after the job id, where ckpt_path=last resumes."""
    import signal
    import time

    stub = tmp_path / "bin"
    stub.mkdir()
    calls = tmp_path / "scontrol.log"
    (stub / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (stub / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ldm-test", "SLURM_NODELIST": "localhost",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LDM_ROOT": str(tmp_path),
             "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}
    overrides = ["stage=ldm", f"first_stage.path={stage1_export}", *FAST, "trainer=ddp_sim", "stage.max_steps=100000",
                 "stage.val_check_interval=2", "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0"]

    def launch(*extra: str) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, "-m", "ldm.train", *overrides, *extra], cwd=REPO, text=True,
                                 env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]

    def finish(ranks: list[subprocess.Popen]) -> list[str]:
        try:
            return [p.communicate(timeout=400)[0] for p in ranks]
        finally:
            for p in ranks:
                p.kill()

    run = tmp_path / "outputs" / "ldm" / "slurm-4242"
    last = run / "checkpoints" / "last.ckpt"
    ranks = launch()
    deadline = time.monotonic() + 300
    while not last.exists() and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in ranks:
        p.send_signal(signal.SIGUSR2)
    outputs = finish(ranks)
    assert [p.returncode for p in ranks] == [143, 143], "\n".join(o[-3000:] for o in outputs)
    assert "Requeued SLURM job 4242" in outputs[0]
    assert calls.read_text().splitlines() == ["requeue 4242"]
    assert [d.name for d in (tmp_path / "outputs" / "ldm").iterdir()] == ["slurm-4242"]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert step >= 2

    # The requeued job: same job id, same folder, continues from last.ckpt.
    slurm["MASTER_PORT"] = str(free_port())
    resumed = launch("ckpt_path=last", f"trainer.max_steps={step + 2}")
    outputs = finish(resumed)
    assert [p.returncode for p in resumed] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == step + 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_latent_cache_is_built_once_across_ranks_and_trains_as_without_it(stage1_export, ddp_runs, tmp_path):
    """Under DDP each rank encodes its share of the data set into a part file, rank 0 joins them into one cache
    file per split, and a second run reads it; training from the cache gives the same losses as encoding
    on the fly (the same per-rank noise draws the same posterior samples from the same moments)."""
    cache = tmp_path / "cache"
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        run_train(ldm_overrides(stage1_export, out, "trainer=ddp_sim", "stage.latent_cache=true",
                                f"paths.cache_dir={cache}", "stage.final_samples.enabled=false"), timeout=400)
    first, second = recorded(runs[0]), recorded(runs[1])
    assert [r["cache"] for r in first] == [{"hits": 0, "misses": 2}] * 2  # train and val built, by both ranks
    assert [r["cache"] for r in second] == [{"hits": 2, "misses": 0}] * 2
    files = sorted(p.name for p in (cache / "latents").iterdir())
    assert not [f for f in files if ".part" in f or f.endswith(".tmp")]  # the parts were joined and removed
    assert [f.split("-")[1] for f in files if f.endswith(".safetensors")] == ["train", "val"]
    assert first[0]["losses"] == second[0]["losses"]
    on_the_fly = recorded(ddp_runs[0])
    for cached, encoded in zip(first, on_the_fly):
        torch.testing.assert_close(torch.tensor(cached["losses"]), torch.tensor(encoded["losses"]), rtol=1e-4, atol=1e-6)


@pytest.mark.timeout(600)
def test_ldm_evaluate_under_torchrun_splits_the_samples_and_measures_them_once(ddp_runs, tmp_path):
    """`torchrun --nproc_per_node=2 -m ldm.evaluate model_path=...`: each rank draws half the batches (each batch
    seeded by (seed, batch index) wherever it is drawn) and measures its half; the set is exactly the one a single
    process draws."""
    import numpy as np

    args = [f"model_path={ddp_runs[0] / 'export'}", "n=3", "sampler=ddim", "sampler.steps=4", "guidance_scale=2",
            "metrics=[accuracy,fid]", "batch_size=8"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    single, multi = tmp_path / "single", tmp_path / "multi"
    for out, launcher in ((single, []), (multi, ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                                   f"--master_port={free_port()}"])):
        cmd = [sys.executable, *launcher, "-m", "ldm.evaluate", *args, f"out_dir={out}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with np.load(single / "samples.npz") as a, np.load(multi / "samples.npz") as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (30, 32, 32, 1)
        assert a["labels"].tolist() == b["labels"].tolist()
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the same batches and seeds: the same computation
    report = json.loads((multi / "metrics.json").read_text())
    assert report["metrics"]["accuracy"]["n"] == 30 and report["metrics"]["fid"]["n"] == 30
    assert json.loads((multi / "manifest.json").read_text())["world_size"] == 2
