"""A plain 2-job sweep and a debug run through the real ``ldm-train`` (issue 27): the jobs share a wandb group
and carry their overrides as tags, the same run_name with ckpt_path=last resumes both, the sweep ends with its
folder and the ldm-report command; a ``debug=fast`` stage 2 on the stage-1 *run folder* draws one preview and
a small final set, prints its summary and next step without third-party noise, and train.log holds the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# A tiny stage 1: 2 steps, validation on 2 batches.
TINY = ["stage=vae", "debug=fast", "stage.max_steps=2", "stage.val_check_interval=2", "data.batch_size=4"]


def ldm_train(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "LDM_CACHE": str(root / "cache")}
    result = subprocess.run([sys.executable, "-m", "ldm.train", *args, f"paths.root_dir={root}"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("newcomer")
    result = ldm_train(root, "-m", *TINY, "logger=default", "seed=0,1", "run_name=s1")
    return root, root / "multirun" / "vae" / "s1", result


@pytest.mark.slow
def test_a_sweep_groups_its_jobs_tags_their_overrides_and_points_at_ldm_report(sweep):
    _, folder, result = sweep
    for job, seed in ((folder / "0", 0), (folder / "1", 1)):
        config = yaml.safe_load((job / "config.yaml").read_text())
        # the wandb logger is built from this node: both runs in group s1, tagged by their own override
        assert config["group"] == config["logger"]["wandb"]["group"] == "s1"
        assert f"seed={seed}" in config["tags"] and f"seed={seed}" in config["logger"]["wandb"]["tags"]
        assert list((job / "wandb").glob("offline-run-*")), "no wandb run written"
    assert f"sweep: 2 jobs in {folder} (2 finished)" in result.stdout
    assert f"next: ldm-report {folder}" in result.stdout
    assert "next: ldm-train" not in result.stdout  # per-job hints give way to the sweep's


@pytest.mark.slow
def test_the_same_sweep_with_ckpt_path_last_resumes_every_job(sweep):
    root, folder, _ = sweep
    result = ldm_train(root, "-m", *TINY, "stage.max_steps=4", "logger=csv", "seed=0,1", "run_name=s1", "ckpt_path=last")
    for job in ("0", "1"):
        assert f"resuming from {folder / job / 'checkpoints' / 'last.ckpt'}" in result.stdout
        assert json.loads((folder / job / "results.json").read_text())["train/steps"] == 4
    from ldm.report import main as report

    assert report([str(folder), "--out", str(root / "report")]) == 0
    md = (root / "report" / "results.md").read_text()
    table = md.split("\n\n")[2]  # a row averaging the 2 seeds; batch/world_size is 1 in both: not a column
    assert table.startswith("| seeds |") and "batch/world_size" not in table and "Same in every row:" in md


@pytest.mark.slow
def test_debug_fast_stage_2_on_the_stage_1_run_folder(sweep):
    root, folder, _ = sweep
    result = ldm_train(root, "stage=ldm", "debug=fast", "model/ldm=unet_tiny", f"first_stage.path={folder / '0'}",
                       "run_name=d", "stage.final_samples.judge=null")
    run = root / "outputs" / "ldm" / "d"
    out = result.stdout + result.stderr
    assert f"first_stage.path={folder / '0'} is a run folder: using its export {folder / '0' / 'export'}" in out
    assert out.startswith(f"first_stage.path={folder / '0'} is a run folder")  # then the summary, first of all
    assert "ldm-train: stage=ldm  model/ldm=unet_tiny  cond=class" in out
    assert f"next: ldm-sample model_path={run / 'export'} n=8 labels=[3,7]" in out
    for noise in ("💡", "module(s) in eval mode", "Epoch 0/-2", "is deprecated"):
        assert noise not in out, noise
    assert "Epoch 0 · step limit 4" in out
    log = (run / "train.log").read_text()
    assert "ldm-train finished:" in log and "next: ldm-sample" in log and "`Trainer.fit` stopped" in log
    # one preview per guidance scale, at the last step; 2 final samples per class
    assert sorted(p.name for p in (run / "images").glob("*.png")) == ["samples_cfg1_step0000004.png",
                                                                      "samples_cfg3.5_step0000004.png"]
    assert np.load(run / "samples" / "samples.npz")["arr_0"].shape == (20, 32, 32, 1)
    recorded = yaml.safe_load((run / "export" / "config.yaml").read_text())
    assert recorded["guidance_scale"] == 3.5 and recorded["guidance"]["interval"]["high"] == 400.0
    assert not (run / "FAILED").exists()
