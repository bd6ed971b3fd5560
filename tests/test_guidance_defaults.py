"""Issue 25: a model is sampled by default as its own final samples were (its export records the guidance method,
band and guide), and the early-EMA guide (stage.keep_guide_at_step) survives preemption and loads as a .ckpt.
One tiny deterministic stage-2 run (guidance=interval, guide kept at step 2) serves every test here."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ldm import evaluate as evaluate_cli
from ldm import sample as sample_cli
from tests.test_guidance_methods import BAND
from tests.test_newcomer_cli import run_main
from tests.test_reliability import DET, SignalAtStep, load, with_extra_callback

BAND_RECORD = {"low": 0.0, "high": 450.0, "unit": "t"}
# ddim with 4 steps visits three timesteps above t = 450 and one below: three unguided calls (n), then a guided one (2n).
SAMPLE = ["labels=[1]", "n=2", "save_pngs=false", "sampler=ddim", "sampler.steps=4"]


def run_overrides(vae_export: Path) -> list[str]:
    return ["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_export}", "stage.final_samples.enabled=false",
            *DET, "stage.keep_guide_at_step=2", *BAND, "callbacks.model_checkpoint.save_top_k=-1"]


@pytest.fixture(scope="module")
def run(tiny_vae_export, tmp_path_factory, compose_cfg) -> Path:
    """Four steps straight through, every validation's checkpoint kept (steps 2 and 4)."""
    from ldm.train import train

    out = tmp_path_factory.mktemp("interval_run")
    train(compose_cfg(run_overrides(tiny_vae_export), out))
    return out


@pytest.fixture
def backbone_calls(monkeypatch) -> list[tuple[str, int]]:
    """(which network, batch) of every backbone call of the models the CLIs load (the model, and a guide)."""
    import ldm.io.load

    calls: list[tuple[str, int]] = []
    real = ldm.io.load.load_ldm

    def counting(path, *args, **kwargs):
        model, info = real(path, *args, **kwargs)
        name = Path(str(path)).name
        model.backbone.register_forward_hook(lambda module, inputs, output: calls.append((name, inputs[0].shape[0])))
        return model, info

    monkeypatch.setattr(ldm.io.load, "load_ldm", counting)
    return calls


def sample(monkeypatch, capsys, tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "samples"
    code, _, err = run_main(sample_cli, monkeypatch, capsys, *argv, *SAMPLE, f"out_dir={out}",
                            f"paths.root_dir={tmp_path}")
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def batches(calls, name: str = "export") -> list[int]:
    return [batch for network, batch in calls if network == name]


# --- 1. sampled by default as the model's own final samples were --------------------------------------------
def test_the_export_records_the_runs_guidance(run):
    config = yaml.safe_load((run / "export" / "config.yaml").read_text())
    assert config["guidance"] == {"method": "cfg", "interval": BAND_RECORD, "guide": None, "guide_use_ema": True}


def test_ldm_sample_without_guidance_uses_the_runs_band_and_an_explicit_one_wins(run, backbone_calls, monkeypatch,
                                                                                 capsys, tmp_path):
    manifest = sample(monkeypatch, capsys, tmp_path, f"model_path={run / 'export'}")
    assert manifest["guidance"] == {"method": "cfg", "interval": BAND_RECORD, "guide": None, "source": "model"}
    assert batches(backbone_calls) == [2, 2, 2, 4]
    backbone_calls.clear()
    manifest = sample(monkeypatch, capsys, tmp_path, f"model_path={run / 'export'}", "guidance=cfg")
    assert manifest["guidance"] == {"method": "cfg", "interval": None, "guide": None, "source": "command line"}
    assert batches(backbone_calls) == [4] * 4


def test_a_checkpoint_is_sampled_with_its_runs_guidance(run, backbone_calls, monkeypatch, capsys, tmp_path):
    manifest = sample(monkeypatch, capsys, tmp_path, f"model_path={run / 'checkpoints' / 'last.ckpt'}")
    assert manifest["guidance"]["interval"] == BAND_RECORD and manifest["guidance"]["source"] == "model"
    assert batches(backbone_calls, "last.ckpt") == [2, 2, 2, 4]


def test_an_export_without_the_record_keeps_plain_cfg(run, backbone_calls, monkeypatch, capsys, tmp_path):
    old = tmp_path / "old_export"
    shutil.copytree(run / "export", old, ignore=shutil.ignore_patterns("guide"))
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["guidance"]  # as exports were written before the record
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    manifest = sample(monkeypatch, capsys, tmp_path, f"model_path={old}")
    assert manifest["guidance"]["interval"] is None and manifest["guidance"]["source"].startswith("default")
    assert batches(backbone_calls, "old_export") == [4] * 4


def test_a_moved_export_finds_its_own_guide(run, tmp_path):
    from ldm.io.guide import export_guidance_record, model_guidance

    record = export_guidance_record({"method": "autoguidance", "guide": str(run / "export" / "guide")}, run / "export")
    assert record["guide"] == "guide"
    elsewhere = export_guidance_record({"method": "autoguidance", "guide": "other/export"}, run / "export")
    assert elsewhere["guide"] == str(Path("other/export").resolve())
    moved = tmp_path / "moved" / "export"
    shutil.copytree(run / "export", moved)
    config = model_guidance({"config": {"guidance": record}}, moved)
    assert config.method == "autoguidance" and config.guide == str(moved / "guide")
    assert model_guidance({"config": {}}, moved) is None


def test_ldm_evaluate_without_guidance_uses_the_runs_band(run, backbone_calls, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(evaluate_cli, monkeypatch, capsys, f"model_path={run / 'export'}", "labels=[1]", "n=2",
                            "sampler=ddim", "sampler.steps=4", "metrics=[]", f"out_dir={tmp_path}",
                            f"paths.root_dir={tmp_path}")
    assert code == 0, err
    assert json.loads((tmp_path / "manifest.json").read_text())["guidance"]["interval"] == BAND_RECORD
    assert batches(backbone_calls) == [2, 2, 2, 4]


# --- 2. the early-EMA guide ----------------------------------------------------------------------------------
def guide_tensors(run: Path) -> dict[str, torch.Tensor]:
    from ldm.io.export import read_export

    tensors, _, meta = read_export(run / "export" / "guide", kind="ldm")
    assert meta["global_step"] == 2
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize("preempted_at", [1, 3])
def test_a_run_preempted_before_or_after_the_guide_step_keeps_the_straight_runs_guide(
        run, tiny_vae_export, compose_cfg, monkeypatch, tmp_path, preempted_at):
    from ldm.train import train

    overrides = run_overrides(tiny_vae_export)
    with monkeypatch.context() as patch:
        with_extra_callback(patch, SignalAtStep(preempted_at, signal.SIGTERM))
        with pytest.raises(SIGTERMException):
            train(compose_cfg(overrides, tmp_path))
    checkpoint = load(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == preempted_at
    kept = checkpoint["callbacks"]["GuideSnapshot"]["tensors"]
    assert (kept is not None) == (preempted_at > 2)  # after the guide step the checkpoint carries it
    train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path))
    straight, resumed = guide_tensors(run), guide_tensors(tmp_path)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # the same computation, repeated


def test_a_ckpt_guide_equals_the_same_guide_given_as_an_export(run, monkeypatch, capsys, tmp_path):
    from ldm.io.export import read_export, save_export

    step2 = run / "checkpoints" / "step0000002.ckpt"

    def samples(*guide: str) -> np.ndarray:
        sample(monkeypatch, capsys, tmp_path, f"model_path={run / 'export'}", "guidance=autoguidance", *guide)
        return np.load(tmp_path / "samples" / "samples.npz")["arr_0"].astype(np.int16)

    def assert_close(a: np.ndarray, b: np.ndarray) -> None:  # two loading paths: uint8 images within one level
        assert np.abs(a - b).max() <= 1

    ema = samples(f"guidance.guide={step2}")
    assert_close(ema, samples(f"guidance.guide={run / 'export' / 'guide'}"))
    # The raw (not averaged) weights of step 2 as an export: the guide export with the checkpoint's own weights.
    tensors, config, meta = read_export(run / "export" / "guide", kind="ldm")
    state = load(step2)["state_dict"]
    for key in tensors:
        for export_prefix, model_prefix in (("model.diffusion_model.", "model.backbone."),
                                            ("cond_stage_model.", "model.conditioner.")):
            if key.startswith(export_prefix):
                tensors[key] = state[model_prefix + key[len(export_prefix):]]
    save_export(tmp_path / "raw", tensors, config, meta)
    raw = samples(f"guidance.guide={step2}", "guidance.guide_use_ema=false")
    assert_close(raw, samples(f"guidance.guide={tmp_path / 'raw'}"))
    # The two guides differ (at step 2 the EMA is near the raw weights: their uint8 samples differ by one level).
    from ldm.io.load import load_ldm

    averaged, plain = (load_ldm(step2, "cpu", use_ema)[0].backbone.state_dict() for use_ema in (True, False))
    assert any(not torch.equal(averaged[k], plain[k]) for k in averaged)


@pytest.mark.parametrize("at_step", [4, 9])
def test_a_guide_step_not_before_the_last_step_fails_at_start_naming_both(tiny_vae_export, compose_cfg, tmp_path,
                                                                          at_step):
    from ldm.config import ConfigError
    from ldm.train import train

    overrides = [o for o in run_overrides(tiny_vae_export) if not o.startswith("stage.keep_guide_at_step")]
    with pytest.raises(ConfigError, match=rf"keep_guide_at_step={at_step} .*stage.max_steps=4"):
        train(compose_cfg([*overrides, f"stage.keep_guide_at_step={at_step}"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()
