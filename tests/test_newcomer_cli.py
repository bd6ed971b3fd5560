"""The newcomer's path through the entry points themselves (issue 27): misspelt keys and options get one line
with the nearest valid spelling and exit status 2, a short --help, one default guidance scale, first-stage
path slips, ldm-evaluate's pointers, ldm-experiment's listing. Each call runs the CLI's ``main`` as the console
script does (sys.argv in, exit status and printed lines out); one runs as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from ldm import evaluate as evaluate_cli
from ldm import sample as sample_cli
from ldm import train as train_cli

ROOT = Path(__file__).resolve().parents[1]


def run_main(module, monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``<prog> argv...`` in this process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    try:
        module.main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("argv", "line"), [
    (["trainer.max_step=3"], "trainer.max_step=3: trainer has no key 'max_step'. Did you mean trainer.max_steps=3?"),
    (["model/ldm=unet_tny"], "model/ldm=unet_tny: no option 'unet_tny' in model/ldm. Did you mean model/ldm=unet_tiny?"),
    (["ldm.sampler=ddim"], "ldm.sampler=ddim: there is no 'ldm' in the config. Did you mean the config group sampler=ddim?"),
    (["stage=ldm", "first_stage.pth=x"], "first_stage.pth=x: first_stage has no key 'pth'. Did you mean first_stage.path=x?"),
    (["-m", "seed=0,1", "sampler=ddim,ddm"], "sampler=ddm: no option 'ddm' in sampler. Did you mean sampler=ddpm?"),
    (["modle/ldm=unet_tiny"], "modle/ldm=unet_tiny: there is no config group modle/ldm. Did you mean model/ldm=unet_tiny?"),
    (["foo=1"], "foo=1: the config has no top-level key 'foo' (to add a new key on purpose, write +foo=1)"),
    (["seed=0,1"], "seed=0,1 gives several values: that is a sweep, run it with -m"),
])
def test_a_misspelt_key_or_option_is_one_line_with_the_nearest_name_and_status_2(monkeypatch, capsys, tmp_path, argv, line):
    code, out, err = run_main(train_cli, monkeypatch, capsys, *argv, f"paths.root_dir={tmp_path}")
    assert code == 2
    assert err.startswith(f"ldm-train: error: {line}") and err.count("\n") == 1
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder


def test_ldm_sample_typo_through_the_console_script_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "ldm.sample", "model_path=x", "guidance_scal=2",
                             f"paths.root_dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("ldm-sample: error: guidance_scal=2: the config has no top-level key "
                                     "'guidance_scal'. Did you mean guidance_scale=2?")


def test_help_is_short_lists_the_launcher_and_only_this_apps_groups(monkeypatch, capsys):
    code, out, _ = run_main(train_cli, monkeypatch, capsys, "--help")
    assert code == 0 and len(out.splitlines()) < 45
    groups = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and "," in line}
    assert {"stage", "model/ldm", "sampler", "trainer", "hydra/launcher"} <= groups
    assert "source" not in groups and "hydra" not in groups  # ldm-prepare's group; Hydra's plumbing
    assert "joblib" in out and "slurm" in out and "unet_small*" in out


def test_one_default_guidance_scale_for_training_sampling_and_evaluation():
    stage = OmegaConf.load(ROOT / "conf" / "stage" / "ldm.yaml")
    trained = stage.final_samples.guidance_scale
    # The default samples with guidance in a band (conf/guidance/interval.yaml) at 3.5; a model that records
    # neither method nor scale (an export from before the record) is sampled with plain CFG at its best scale.
    assert trained == 3.5 and trained in stage.module.preview.guidance_scales
    assert "guidance: interval" in (ROOT / "conf" / "train.yaml").read_text()
    assert sample_cli.DEFAULT_GUIDANCE_SCALE == 1.75
    for app in ("sample", "evaluate"):  # null: the export's own scale
        assert OmegaConf.load(ROOT / "conf" / f"{app}.yaml").guidance_scale is None
    assert sample_cli.guidance_scales(None, {"config": {"guidance_scale": 2.5}}) == [2.5]  # an export records it
    run_config = {"stage": {"final_samples": {"guidance_scale": 1.25}}}  # a .ckpt's run config
    assert sample_cli.guidance_scales(None, {"config": run_config}) == [1.25]
    assert sample_cli.guidance_scales(None, {"config": {}}) == [1.75]  # an export from before the record
    assert sample_cli.guidance_scales([1, 3], {"config": {}}) == [1.0, 3.0]


def test_first_stage_path_missing_is_one_line_and_the_run_folder_is_marked_failed(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(train_cli, monkeypatch, capsys, "stage=ldm", f"first_stage.path={tmp_path / 'nope'}",
                            "run_name=r", f"paths.root_dir={tmp_path}", "logger=csv")
    assert code == 2
    assert err.splitlines()[0] == (f"ldm-train: error: first_stage.path={tmp_path / 'nope'} does not exist: give the "
                                   "export/ folder of a stage-1 run (ldm-train stage=vae prints it at the end, e.g. "
                                   "outputs/vae/<run>/export)")
    assert "Error in call to target" not in err and "full_key" not in err
    failed = tmp_path / "outputs" / "ldm" / "r" / "FAILED"
    assert failed.read_text().startswith("ConfigError: first_stage.path=")


def test_first_stage_path_of_a_folder_without_an_export_names_export(monkeypatch, capsys, tmp_path):
    (tmp_path / "vae_run").mkdir()
    code, _, err = run_main(train_cli, monkeypatch, capsys, "stage=ldm", f"first_stage.path={tmp_path / 'vae_run'}",
                            f"paths.root_dir={tmp_path}", "logger=csv")
    assert code == 2 and f"nor in {tmp_path / 'vae_run' / 'export'}): give <stage-1 run>/export" in err


def test_evaluate_lists_the_samples_that_exist_beside_a_missing_one(monkeypatch, capsys, tmp_path):
    for scale in ("1", "3"):
        (tmp_path / f"guidance_scale={scale}").mkdir()
        np.savez(tmp_path / f"guidance_scale={scale}" / "samples.npz", np.zeros((2, 32, 32, 1), np.uint8))
    code, _, err = run_main(evaluate_cli, monkeypatch, capsys, f"samples={tmp_path / 'samples.npz'}",
                            f"paths.root_dir={tmp_path}")
    assert code == 2
    assert (f"samples={tmp_path / 'samples.npz'} does not exist; samples.npz files under {tmp_path}: "
            f"{tmp_path / 'guidance_scale=1' / 'samples.npz'}, {tmp_path / 'guidance_scale=3' / 'samples.npz'}") in err


def test_small_sample_fid_warns_and_a_large_one_does_not():
    from ldm.run_notes import small_sample_warning

    line = small_sample_warning(8, ["fid", "accuracy"], 1000)
    assert line.startswith("warning: FID/KID from n=8 samples (< kid.subset_size=1000)")
    assert small_sample_warning(1000, ["fid"], 1000) is None and small_sample_warning(8, ["accuracy"], 1000) is None


def test_ldm_experiment_lists_without_arguments_and_dry_runs(capsys, tmp_path):
    from ldm.experiment import available_studies, main

    main([])
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in available_studies())
    main(["--list"])
    assert capsys.readouterr().out == listed
    main(["guidance", "--dry-run", "--smoke", "--out", str(tmp_path / "g")])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 3 and "-m ldm.evaluate -m --config-dir" in commands[-1]
    assert not (tmp_path / "g").exists()  # nothing ran
