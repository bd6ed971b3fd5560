"""The guidance config group (cfg, interval, autoguidance) through the model layer and every path that samples:
LatentDiffusion.sample, ldm-sample, ldm-evaluate, previews, final samples and the sample_metrics callback."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from ldm.config import ConfigError
from ldm.diffusion.guidance import GuidanceInterval
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule
from ldm.model import FirstStage, LatentDiffusion
from ldm.model.guidance import Guidance, GuidanceConfig, as_guidance_config, check_guide
from ldm.nets.conditioners import ClassEmbedder, Conditioner

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SIZE, N = 8, 4


class ToyAutoencoder(nn.Module):
    """f = 1, decode = identity: the images are the latents."""

    downsample_factor = 1

    def __init__(self, channels: int):
        super().__init__()
        self.embed_dim = channels

    def decode(self, z):
        return z


class ToyBackbone(nn.Module):
    """x0-prediction that depends on the noisy latents, the time and the label; records every call's batch."""

    def __init__(self, in_channels, out_channels, context_dim=None, num_classes=None, adm_in_channels=None, gain=0.5):
        super().__init__()
        self.in_channels, self.out_channels, self.context_dim = in_channels, out_channels, context_dim
        self.num_classes, self.adm_in_channels = num_classes, adm_in_channels
        self.gain = nn.Parameter(torch.tensor(gain))
        self.label = nn.Embedding(num_classes, out_channels) if num_classes else None
        self.calls: list[int] = []

    def forward(self, x, timesteps, context=None, y=None):
        self.calls.append(x.shape[0])
        out = self.gain * x[:, : self.out_channels] + (timesteps / 1000).view(-1, 1, 1, 1)
        return out if y is None else out + self.label(y).view(-1, self.out_channels, 1, 1)


def toy_model(channels=2, num_classes=3, gain=0.5, seed=0) -> LatentDiffusion:
    torch.manual_seed(seed)
    conditioner = Conditioner([ClassEmbedder(num_classes=num_classes, output="vector")] if num_classes else [])
    return LatentDiffusion(lambda **kw: ToyBackbone(**kw, gain=gain), conditioner,
                           FirstStage(ToyAutoencoder(channels), 1.0), DiffusionObjective(NoiseSchedule("scaled_linear"),
                                                                                          prediction="x0"))


def _sample(model, scale=3.0, guidance=None, sampler=None):
    return model.sample({"label": torch.arange(N) % 3}, SIZE, sampler or {"name": "ddim", "steps": 6}, scale,
                        generator=torch.Generator().manual_seed(0), guidance=guidance)


# --- the model layer ------------------------------------------------------------------------------
def test_autoguidance_with_the_model_as_its_own_guide_is_no_guidance():
    model = toy_model()
    unguided = _sample(model, scale=1.0)
    model.backbone.calls.clear()
    auto = _sample(model, guidance=Guidance(guide=model))
    # The guided path runs the same network twice and mixes: another computation, so a tolerance.
    torch.testing.assert_close(auto, unguided, rtol=1e-5, atol=1e-5)
    assert model.backbone.calls == [N] * 12  # model and guide: two conditional calls per step
    assert not torch.allclose(_sample(model, guidance=Guidance(guide=toy_model(gain=0.2, seed=1))), unguided)


@pytest.mark.parametrize("sampler", [{"name": "dpmpp_2m", "steps": 8}, {"name": "heun", "steps": 5}])
def test_sample_guides_only_inside_the_band(sampler):
    model = toy_model()
    band = GuidanceInterval(0, 500, unit="t")
    _sample(model, guidance=Guidance(interval=band), sampler=sampler)
    guided = [b == 2 * N for b in model.backbone.calls]
    assert set(model.backbone.calls) == {N, 2 * N} and guided == sorted(guided)  # high noise first: unguided


def test_autoguidance_by_an_unconditional_model_pair_is_not_skipped():
    # CFG has nothing to drop without a condition; autoguidance still has its guide.
    model, guide = toy_model(num_classes=0), toy_model(num_classes=0, gain=0.2, seed=1)
    model.sample({"n": [None] * N}, SIZE, {"name": "ddim", "steps": 3}, 2.0, guidance=Guidance(guide=guide))
    assert model.backbone.calls == [N] * 3 and guide.backbone.calls == [N] * 3


@pytest.mark.parametrize("guide_kwargs, what", [
    ({"channels": 3}, "latent channels"),
    ({"num_classes": 5}, "condition spec"),
    ({"num_classes": 0}, "condition inputs"),
])
def test_an_incompatible_guide_is_one_line_naming_both(guide_kwargs, what):
    with pytest.raises(ConfigError, match=what) as err:
        check_guide(toy_model(), toy_model(**guide_kwargs), "runs/main/export", "runs/other/export")
    message = str(err.value)
    assert "\n" not in message and "runs/main/export" in message and "runs/other/export" in message


def test_a_smaller_or_less_trained_guide_of_the_same_family_fits():
    check_guide(toy_model(), toy_model(gain=0.1, seed=3), "main", "guide")


@pytest.mark.parametrize("fields, match", [
    ({"method": "cfgg"}, "choose one of"),
    ({"method": "autoguidance"}, "needs guidance.guide"),
    ({"method": "autoguidance", "guide": "???"}, "needs guidance.guide"),
    ({"method": "cfg", "guide": "x/export"}, "only used by guidance=autoguidance"),
    ({"interval": {"low": 3, "high": 1, "unit": "t"}}, "low <= high"),
    ({"colour": 1}, "unknown keys"),
])
def test_a_bad_guidance_config_names_the_fix(fields, match):
    with pytest.raises(ConfigError, match=match):
        as_guidance_config(fields)


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("option", ["cfg", "interval", "autoguidance"])
def test_every_guidance_option_composes_for_every_entry_point(option):
    extra = ["guidance.guide=runs/a/export/guide"] if option == "autoguidance" else []
    for app in ("train", "sample", "evaluate"):
        cfg = _compose(app, [f"guidance={option}", *extra] + (["stage=ldm"] if app == "train" else []))
        config = instantiate(cfg.guidance)
        assert isinstance(config, GuidanceConfig)
        assert config.method == ("autoguidance" if option == "autoguidance" else "cfg")
        assert (config.interval is not None) == (option == "interval")
    for app in ("sample", "evaluate"):  # no guidance= given: the model's own (tests/test_guidance_defaults.py)
        assert _compose(app, []).get("guidance") is None


# --- every path that samples passes the guidance through -------------------------------------------
class RecordingSampler:
    """Stands in for a loaded model: records the guidance of every sample() call and returns grey images."""

    def __init__(self):
        self.backbone = nn.Linear(1, 1)
        self.conditioner = Conditioner([ClassEmbedder(num_classes=3, embed_dim=4)])
        self.device = torch.device("cpu")
        self.guidances: list[Guidance] = []

    def sample(self, conditions, image_size, *args, guidance=None, uint8=False, **kwargs):
        self.guidances.append(guidance)
        n = len(next(iter(conditions.values())))
        if uint8:  # the streaming paths ask for uint8 NHWC
            return torch.zeros(n, image_size, image_size, 1, dtype=torch.uint8)
        return torch.zeros(n, 1, image_size, image_size)

    def example_conditions(self, per_group, **kwargs):
        return self.conditioner.example_conditions(per_group, **kwargs)


def _recorder():
    return RecordingSampler()


def _fake_load(monkeypatch, recorder):
    import ldm.io.load

    info = {"config": {"sampler": {"name": "ddim", "steps": 2}, "data": {"image_size": 8}}}
    monkeypatch.setattr(ldm.io.load, "load_ldm", lambda *a, **k: (recorder, info))


BAND = ["guidance=interval", "guidance.interval.high=450"]


def test_ldm_sample_passes_the_guidance_through(monkeypatch, tmp_path):
    from ldm.sample import run

    recorder = _recorder()
    _fake_load(monkeypatch, recorder)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    run(_compose("sample", [f"model_path={model}", f"out_dir={tmp_path / 'out'}", f"paths.output_dir={tmp_path}",
                            "labels=[1]", "n=2", "save_pngs=false", *BAND]))
    (guidance,) = recorder.guidances
    assert (guidance.interval.low, guidance.interval.high, guidance.interval.unit) == (0.0, 450.0, "t")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["guidance"] == {"method": "cfg", "interval": {"low": 0.0, "high": 450.0, "unit": "t"}, "guide": None,
                                    "source": "command line"}


def test_ldm_evaluate_passes_the_guidance_through(monkeypatch, tmp_path):
    from ldm.evaluate import generate

    recorder = _recorder()
    _fake_load(monkeypatch, recorder)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    generate(_compose("evaluate", [f"model_path={model}", f"paths.output_dir={tmp_path}", "labels=[0]", "n=2", *BAND]),
             tmp_path)
    (guidance,) = recorder.guidances
    assert guidance.interval.high == 450.0 and guidance.guide is None
    assert json.loads((tmp_path / "manifest.json").read_text())["guidance"]["interval"]["high"] == 450.0


def test_previews_final_samples_and_sample_metrics_pass_the_guidance_through(monkeypatch, tmp_path, compose_cfg):
    from ldm.lit import latent_diffusion
    from ldm.lit.sample_metrics import SampleMetricsCallback
    from ldm.metrics.final_samples import write_final_samples
    from ldm.metrics.suite import evaluation_config

    cfg = compose_cfg(["stage=ldm", "callbacks=sample_metrics", "stage.final_samples.judge=null", *BAND], tmp_path)
    recorder = _recorder()
    # previews: the module resolves its preview's guidance at setup
    preview = instantiate(cfg.stage.module.preview)
    assert preview.guidance.interval.high == 450.0
    module = SimpleNamespace(preview=preview, _guidance=None, model=recorder, _trainer=None)
    latent_diffusion.LatentDiffusionModule.setup(module, "fit")
    trainer = SimpleNamespace(is_global_zero=True, precision="32-true", default_root_dir=str(tmp_path), global_step=1,
                              loggers=[])
    vars(module).update(image_size=8, trainer=trainer, device=torch.device("cpu"), sampler=lambda: recorder,
                        preview_prompts=lambda: [], ema_precision=contextlib.nullcontext)
    latent_diffusion.LatentDiffusionModule.log_previews(module)
    # 3 classes x 8 in preview batches of 16: two sampling calls per guidance scale
    assert [g.interval.high for g in recorder.guidances] == [450.0] * 2 * len(preview.guidance_scales)
    # final samples
    recorder.guidances.clear()
    cfg.stage.final_samples.per_class = 1
    write_final_samples(SimpleNamespace(sampler=lambda: recorder, ema=None), SimpleNamespace(num_classes=3, image_size=8),
                        tmp_path / "final", cfg)
    assert [g.interval.high for g in recorder.guidances] == [450.0]
    assert json.loads((tmp_path / "final" / "manifest.json").read_text())["guidance"]["interval"]["high"] == 450.0
    # the sample_metrics callback, as ldm-train builds it
    recorder.guidances.clear()
    callback = instantiate(cfg.callbacks.sample_metrics)
    assert isinstance(callback, SampleMetricsCallback) and callback.guidance_config.interval.high == 450.0
    callback.metrics = []  # only the guidance is followed here; metrics have their own tests
    callback.eval_cfg = evaluation_config(str(tmp_path), "mnist5k", "judge", 256)  # what setup takes from the data
    callback.compute(SimpleNamespace(global_step=1, datamodule=None, precision="32-true"),
                     SimpleNamespace(image_size=8, sampler=lambda: recorder, model=recorder))
    assert [g.interval.high for g in recorder.guidances] == [450.0]


# --- end to end: a run keeps its own guide; ldm-sample guides with it ---------------------------------
def test_ldm_sample_refuses_an_incompatible_guide_in_one_line_naming_both(monkeypatch, tmp_path):
    import ldm.io.load
    from ldm.sample import run

    models = {"runs/main/export": toy_model(), "runs/uncond/export": toy_model(num_classes=0)}
    info = {"config": {"sampler": {"name": "ddim", "steps": 2}, "data": {"image_size": SIZE}}}
    monkeypatch.setattr(ldm.io.load, "load_ldm", lambda path, *a, **k: (models[str(path)], info))
    common = ["model_path=runs/main/export", f"out_dir={tmp_path}", "labels=[1]", "n=1", "guidance=autoguidance"]
    with pytest.raises(ConfigError) as err:
        run(_compose("sample", [*common, "guidance.guide=runs/uncond/export"]))
    message = str(err.value)
    assert "\n" not in message and "runs/main/export" in message and "runs/uncond/export" in message
    with pytest.raises(ConfigError, match="needs guidance.guide"):
        run(_compose("sample", common))  # the group's `guide: ???` left unset


def test_a_guide_step_at_or_after_the_last_step_fails_at_start():
    from ldm.lit.guide_snapshot import GuideSnapshot

    export = SimpleNamespace(folder=Path("run/export"))
    with pytest.raises(ConfigError, match=r"keep_guide_at_step=4 is not before the run's last step \(stage.max_steps=4\)"):
        GuideSnapshot(4, export).on_fit_start(SimpleNamespace(max_steps=4), None)
    GuideSnapshot(3, export).on_fit_start(SimpleNamespace(max_steps=4), None)
    with pytest.raises(ConfigError, match="positive optimizer step"):
        GuideSnapshot(0, export)


@pytest.mark.slow
def test_a_run_keeps_its_early_ema_as_a_guide_and_ldm_sample_guides_with_it(tmp_path, compose_cfg):
    from ldm.io.export import read_export
    from ldm.sample import run
    from ldm.train import train

    train(compose_cfg(["stage=vae", "debug=fast", "logger=csv", "data.batch_size=16"], tmp_path / "vae"))
    # Previews every 2 steps and final samples within a band, and the EMA of step 2 kept as a guide.
    results = train(compose_cfg([
        "stage=ldm", f"first_stage.path={tmp_path / 'vae' / 'export'}", "debug=fast", "logger=csv",
        "data.batch_size=16", "model/ldm=unet_tiny", "stage.final_samples.judge=null",
        "stage.final_samples.per_class=1", "sampler.steps=3", "stage.keep_guide_at_step=2", *BAND,
        "stage.module.preview.every_n_steps=2"], tmp_path / "main"))
    export = tmp_path / "main" / "export"
    _, _, meta = read_export(export / "guide", kind="ldm")
    assert meta["global_step"] == 2
    main_tensors, _, _ = read_export(export, kind="ldm")
    guide_tensors, _, _ = read_export(export / "guide", kind="ldm")
    assert main_tensors.keys() == guide_tensors.keys()
    assert not all(torch.equal(main_tensors[k], guide_tensors[k]) for k in main_tensors)  # two steps later
    manifest = json.loads((Path(results["samples"]).parent / "manifest.json").read_text())
    assert manifest["guidance"]["interval"] == {"low": 0.0, "high": 450.0, "unit": "t"}

    out = tmp_path / "samples"
    run(_compose("sample", [f"model_path={export}", "labels=[3]", "n=2", "save_pngs=false", "sampler=ddim",
                            "sampler.steps=3", "guidance=autoguidance", f"guidance.guide={export / 'guide'}",
                            f"out_dir={out}", f"paths.output_dir={tmp_path}"]))
    assert json.loads((out / "manifest.json").read_text())["guidance"]["guide"] == str(export / "guide")
