"""Every study of experiments/ runs end to end in smoke mode and writes its table; the runner's errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm import experiment
from ldm.experiment import StudyError, available_studies, load_study, run_study

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ["f_factor", "prediction", "min_snr", "guidance", "samplers", "cache", "recipe", "backbone", "guidance_methods"]


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory) -> dict:
    """A smoke base (a few steps of both stages) shared by the studies, and a shared cache folder. The
    variables the studies need are handed to each test (``smoke_env``), never set in this process."""
    root = tmp_path_factory.mktemp("studies")
    variables = {
        "LDM_CACHE": str(root / "cache"),  # the judge and reference statistics, computed once
        "WANDB_MODE": "disabled",  # wandb's own run files are checked in a test of their own
    }
    base = root / "base"
    experiment.ensure_base(base, smoke=True, env={**os.environ, **variables}, log_path=root / "base.log")
    return {"root": root, "base": base, "variables": variables}


@pytest.fixture
def smoke_env(smoke_base, monkeypatch) -> dict:
    """The smoke base, with its variables set for this test only (run_study passes os.environ on)."""
    for key, value in smoke_base["variables"].items():
        monkeypatch.setenv(key, value)
    return smoke_base


def smoke_values(phase: dict, key: str, values) -> list[str]:
    """The values of one swept axis in smoke mode: the phase's smoke override, else at most two."""
    given = next((o.split("=", 1)[1] for o in phase.get("smoke", []) if o.startswith(f"{key}=")), None)
    if given is not None:
        return given.split(",")
    listed = str(values).split(",")
    return [listed[0], listed[-1]] if len(listed) > 2 else listed


def test_every_study_folder_is_shipped_and_documented():
    assert available_studies() == sorted(STUDIES)
    for name in STUDIES:
        folder = ROOT / "experiments" / name
        readme = (folder / "README.md").read_text()
        for heading in ("Question", "Paper", "How to run"):
            assert f"## {heading}" in readme, f"{name}/README.md lacks ## {heading}"
        study = load_study(name)
        for phase in study["phases"]:
            sweep = OmegaConf.load(folder / f"{phase['config']}.yaml")
            assert OmegaConf.select(sweep, "hydra.sweeper.params"), f"{name}/{phase['config']}.yaml sweeps nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_in_smoke_mode_and_writes_its_report(smoke_env, name):
    out = smoke_env["root"] / name
    result = run_study(name, smoke=True, base=smoke_env["base"], out=out, report_dir=out / "report")
    study = load_study(name)
    specs = study["report"] if isinstance(study["report"], list) else [study["report"]]
    for phase in study["phases"]:
        sweep = OmegaConf.load(ROOT / "experiments" / name / f"{phase['config']}.yaml")
        params = OmegaConf.to_container(sweep.hydra.sweeper.params)
        expected_jobs = math.prod(len(smoke_values(phase, key, values)) for key, values in params.items())
        assert expected_jobs <= 2 ** len(params)  # a smoke run is never the full grid
        jobs = sorted((out / phase["name"]).rglob("results.json"))
        assert len(jobs) == expected_jobs, f"{name}/{phase['name']}: {len(jobs)} jobs wrote results, expected {expected_jobs}"
        spec = next((s for s in specs if s.get("phase", study["phases"][-1]["name"]) == phase["name"]), None)
        if spec is None:
            continue
        for job in jobs:
            if phase["app"] == "train":  # smoke means a few steps, whatever the sweep config sets
                assert OmegaConf.load(job.parent / "config.yaml").stage.max_steps <= 10, job
            numbers = json.loads(job.read_text())
            missing = [m for m in spec["metrics"] if m not in numbers]
            assert not missing, f"{job} lacks {missing}: {sorted(numbers)}"
            broken = {m: numbers[m] for m in spec["metrics"] if not math.isfinite(float(numbers[m]))}
            assert not broken, f"{job} reports non-finite metrics {broken}"
    table = (out / "report" / "results.md").read_text()
    assert study["title"] in table
    assert "|" in table and "How this table was made" in table
    for spec in specs:  # a named table (every one after the first) goes into report/<name>/
        target = out / "report" / spec.get("name", "")
        assert (target / "results.md").is_file() and (target / "results.png").stat().st_size > 1000
        if spec.get("frontier"):  # the accuracy-vs-FID frontiers of guidance_methods
            assert (target / "results_frontier.png").stat().st_size > 1000
    assert result["timings"]
    if len(study["phases"]) > 1:  # rerun reusing every finished phase: no job runs, the same table
        again = run_study(name, smoke=True, base=smoke_env["base"], out=out, report_dir=out / "again",
                          skip=[p["name"] for p in study["phases"]])
        assert not any(k.startswith("phase") for k in again["timings"])
        table_rows = [ln for ln in table.splitlines() if ln.startswith("|")]
        assert [ln for ln in (out / "again" / "results.md").read_text().splitlines() if ln.startswith("|")] == table_rows


def test_smoke_mode_sweeps_two_values_per_axis_unless_told_otherwise():
    study = load_study("guidance")
    (phase,) = study["phases"]

    def swept(smoke: bool, extra: list[str]) -> dict[str, str]:
        cmd = experiment.phase_command(study, phase, base=Path("b"), out=Path("o"), smoke=smoke, launcher=None,
                                       jobs=1, extra=extra)
        return dict(a.split("=", 1) for a in cmd if a.split("=", 1)[0] in ("guidance_scale", "seed"))

    assert swept(True, []) == {"guidance_scale": "1.0,9.0", "seed": "0,2"}  # the ends of 7 x 3 values
    assert swept(True, ["guidance_scale=3.0"]) == {"guidance_scale": "3.0", "seed": "0,2"}  # the user's axis wins
    assert swept(False, []) == {}  # the full grid of the sweep config


def test_unknown_study_names_the_available_ones():
    with pytest.raises(StudyError, match="choose one of.*guidance"):
        load_study("guidanse")


@pytest.mark.slow
def test_a_failed_phase_stops_the_study_naming_its_log(smoke_env):
    out = smoke_env["root"] / "failing"
    with pytest.raises(StudyError, match="command failed.*experiment.log"):
        run_study("guidance", smoke=True, base=smoke_env["base"], out=out, extra=["guidance_scale=oops"])


def test_skipping_phases_names_the_phases_and_needs_the_earlier_run(tmp_path):
    with pytest.raises(StudyError, match=r"cannot skip \['vea'\]: the phases of f_factor are \['vae', 'ldm'\]"):
        run_study("f_factor", smoke=True, out=tmp_path, skip=["vea"])
    with pytest.raises(StudyError, match="needs --out"):
        run_study("f_factor", smoke=True, skip=["vae"])
    with pytest.raises(StudyError, match="cannot skip phase 'vae'.*does not exist"):
        run_study("f_factor", smoke=True, base=tmp_path / "base", out=tmp_path, skip=["vae", "ldm"])


def test_cli_unknown_study_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "ldm.experiment", "nope"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ldm-experiment: error: no study 'nope'")


def test_sweep_jobs_tag_their_wandb_runs_with_their_overrides(tmp_path):
    """group = the study, job_type = the stage, tags = the job's overrides (what the wandb UI groups by)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ldm.train import build_loggers

    study = ROOT / "experiments" / "prediction"
    # As `ldm-train --config-dir experiments/prediction --config-name sweep` composes it.
    with initialize_config_dir(config_dir=str(study), version_base="1.3"):
        cfg = compose("sweep", overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", "objective=v", "seed=1",
                                          "logger=wandb", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        (logger,) = build_loggers(cfg)
    finally:
        HydraConfig.instance().cfg = None
    init = logger._wandb_init
    assert init["group"] == "prediction" and init["job_type"] == "ldm"
    assert {"objective=v", "seed=1"} <= set(init["tags"])


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_and_each_job_has_its_own_wandb_run(smoke_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ldm.evaluate", "-m", "--config-dir", str(ROOT / "experiments" / "guidance"),
         "--config-name", "sweep", f"model_path={smoke_env['base'] / 'ldm' / 'export'}", "n=1", "sampler=ddpm",
         "sampler.steps=2", "metrics=[fid]", "guidance_scale=1.0,3.0", "seed=0", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joblib" in proc.stdout + proc.stderr  # Hydra names the launcher it used
    for job, scale in (("0", "1.0"), ("1", "3.0")):
        assert "fid" in json.loads((sweep_dir / job / "results.json").read_text())
        (run_file,) = (sweep_dir / job / "wandb").glob("offline-run-*/run-*.wandb")
        data = run_file.read_bytes()
        assert b"guidance" in data and f"guidance_scale={scale}".encode() in data and b"evaluate" in data


def test_slurm_launcher_asks_for_one_task_per_gpu_and_requeues(tmp_path):
    """One SLURM task per device (Lightning reads the ranks from SLURM; nothing re-launches the sweep)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue on preemption/timeout
    # trainer=ddp means every visible GPU (devices=-1), which the submitting machine cannot count: refused.
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    with pytest.raises(Exception, match="trainer.devices=<GPUs per node>"):
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_run_folder_is_shared_by_every_rank_of_a_cluster_job(monkeypatch):
    """Each rank composes its own config: the folder name must not depend on when it did."""
    from ldm.config import run_name

    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert run_name("exp1") == "exp1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id
    assert run_name(None)[:2] == "20"  # the start time
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_name(None) == "torchrun-abc"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_name(None) == "slurm-77" and run_name("exp1") == "exp1"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_name(None) == "slurm-70_3"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_checks(compose_cfg, tmp_path, preset):
    """Each preset also runs for real in the smoke run of the study that uses it (see study.yaml files)."""
    from ldm.train import check_config

    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    OmegaConf.resolve(cfg)
    check_config(cfg)
    users = [p.parent.name for p in (ROOT / "experiments").glob("*/*.yaml") if f"experiment: {preset}" in p.read_text()]
    # The papers' recipes run two steps with tiny substitutes in tests/test_recipes.py instead of a study.
    recipe_smoke = f"experiment={preset}" in (ROOT / "tests" / "test_recipes.py").read_text()
    assert users or recipe_smoke, f"no study or recipe test uses experiment={preset}, so no smoke run covers it"
