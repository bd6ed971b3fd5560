"""LatentDiffusion.sample (ldm.model) on analytic stand-ins for the backbone and the first stage: what guidance does to
inpainting conditions, when it is skipped, guidance rescale reaching the guidance from every entry point, and
SDEdit under a Karras sampler."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ldm.model.latent_diffusion as latent_model
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule
from ldm.metrics.final_samples import write_final_samples
from ldm.model import LatentDiffusion, LatentEdit
from ldm.nets.conditioners import ClassEmbedder, ConcatConditioner, Conditioner

C, SIZE = 2, 8  # latent channels; latent = pixel size (f = 1)


class IdentityFirstStage:
    """f = 1 and decode = identity, so the images the sampler returns are its latents."""

    downsample_factor, latent_channels = 1, C

    def decode(self, z):
        return z


class InpaintUNet(nn.Module):
    """x0-prediction of an ideal inpainting model: the masked-image latents where the mask says keep (mask 0),
    a label-dependent fill in the hole; records the batch size of every call."""

    in_channels, out_channels, context_dim, adm_in_channels = 2 * C + 1, C, None, None

    def __init__(self, num_classes=4):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.calls: list[int] = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append(x.shape[0])
        x_t, mask, known = x[:, :C], x[:, C : C + 1], x[:, C + 1 :]
        fill = 0.2 * y.float().view(-1, 1, 1, 1) - 0.3 + self.scale * x_t
        return (1 - mask) * known + mask * fill


class PlainUNet(nn.Module):
    in_channels, out_channels, context_dim, num_classes, adm_in_channels = C, C, None, None, None

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls: list[int] = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append(x.shape[0])
        return self.scale * x


def _objective():
    return DiffusionObjective(NoiseSchedule("linear"), prediction="x0")


def _inpaint_sampler():
    conditioner = Conditioner([
        ConcatConditioner("inpaint_concat", channels=C + 1),
        ClassEmbedder(num_classes=3, output="vector", drop_rate=0.1),
    ])
    return LatentDiffusion(InpaintUNet(), conditioner, IdentityFirstStage(), _objective())


def _inpaint_conditions(n=4):
    gen = torch.Generator().manual_seed(0)
    z0 = 0.8 * torch.rand(n, C, SIZE, SIZE, generator=gen) - 0.4  # inside [-1, 1]: decode's clamp keeps it
    hole = torch.zeros(n, 1, SIZE, SIZE)
    hole[:, :, 2:6, 3:7] = 1
    concat = torch.cat([hole, z0 * (1 - hole)], dim=1)
    return {"label": torch.arange(n) % 3, "inpaint_concat": concat}, z0, hole


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("scale", [1.0, 3.0, 7.5])
def test_guidance_keeps_the_inpainting_condition_in_both_branches(name, scale):
    # Dropping the masked image from the unconditional branch made the kept region 3 z0 - 2 x0_uncond at scale 3.
    sampler = _inpaint_sampler()
    conditions, z0, hole = _inpaint_conditions()
    images = sampler.sample(conditions, SIZE, {"name": name, "steps": 5}, guidance_scale=scale,
                            generator=torch.Generator().manual_seed(1))
    kept = (1 - hole).bool().expand_as(z0)
    torch.testing.assert_close(images[kept], z0[kept], rtol=0, atol=1e-4)
    # and guidance still acts in the hole (the label is dropped there): scales give different fills
    assert sampler.backbone.calls == [len(z0) * (1 if scale == 1.0 else 2)] * 5


def test_guidance_is_skipped_without_a_guided_condition(caplog):
    # An unconditional model (or one with only concat conditions) has uncond = cond: one call per step.
    n, steps = 3, 4
    unconditional = LatentDiffusion(PlainUNet(), Conditioner([]), IdentityFirstStage(), _objective())
    with caplog.at_level(logging.INFO, logger="ldm.model.latent_diffusion"):
        guided = unconditional.sample({"n": [None] * n}, SIZE, {"name": "ddim", "steps": steps}, guidance_scale=3.0,
                                      generator=torch.Generator().manual_seed(0))
    assert unconditional.backbone.calls == [n] * steps
    assert "no guided condition is given" in caplog.text
    plain = unconditional.sample({"n": [None] * n}, SIZE, {"name": "ddim", "steps": steps}, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)
    concat_only = LatentDiffusion(InpaintUNet(num_classes=None), Conditioner([ConcatConditioner("inpaint_concat", C + 1)]),
                                  IdentityFirstStage(), _objective())
    conditions, _, _ = _inpaint_conditions(n)
    del conditions["label"]
    concat_only.backbone.forward = _with_label(concat_only.backbone.forward)
    concat_only.sample(conditions, SIZE, {"name": "ddim", "steps": steps}, guidance_scale=3.0)
    assert concat_only.backbone.calls == [n] * steps


def _with_label(forward):
    return lambda x, t, context=None, y=None: forward(x, t, context, torch.zeros(x.shape[0], dtype=torch.long))


class RecordingGuidance(latent_model.ClassifierFreeGuidance):
    made: list[RecordingGuidance] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingGuidance.made.append(self)


def test_guidance_rescale_reaches_the_guidance(monkeypatch):
    monkeypatch.setattr(latent_model, "ClassifierFreeGuidance", RecordingGuidance)
    RecordingGuidance.made = []
    sampler = _inpaint_sampler()
    conditions, _, _ = _inpaint_conditions(2)
    sampler.sample(conditions, SIZE, {"name": "ddim", "steps": 2}, guidance_scale=3.0, guidance_rescale=0.7)
    (guidance,) = RecordingGuidance.made
    assert guidance.rescale == 0.7 and guidance.scale == 3.0 and guidance.schedule is sampler.objective.schedule
    RecordingGuidance.made = []
    sampler.sample(conditions, SIZE, {"name": "ddim", "steps": 2}, guidance_scale=3.0)
    assert RecordingGuidance.made[0].rescale == 0.0


class RecordingSampler:
    """Stands in for a loaded model: records the arguments of sample() and returns grey images."""

    def __init__(self, conditioner=None):
        self.backbone = nn.Linear(1, 1)
        self.conditioner = conditioner or Conditioner([ClassEmbedder(num_classes=3, embed_dim=4)])
        self.device = torch.device("cpu")
        self.calls: list[dict] = []
        self.guidances: list = []  # the resolved ldm.model.guidance.Guidance of each call

    def sample(self, conditions, image_size, sampler=None, guidance_scale=1.0, generator=None, batch_size=256,
               progress=None, edit=None, guidance_rescale=0.0, guidance=None, uint8=False, autocast_dtype=None):
        n = len(next(iter(conditions.values())))
        self.calls.append({"guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale})
        self.guidances.append(guidance)
        if uint8:
            return torch.zeros(n, image_size, image_size, 1, dtype=torch.uint8)
        return torch.zeros(n, 1, image_size, image_size)

    def example_conditions(self, per_group, **kwargs):
        return self.conditioner.example_conditions(per_group, **kwargs)


def _fake_load(monkeypatch, recorder):
    import ldm.io.load

    info = {"config": {"sampler": {"name": "ddim", "steps": 2}, "data": {"image_size": 8}}}
    monkeypatch.setattr(ldm.io.load, "load_ldm", lambda *a, **k: (recorder, info))


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(latent_model.__file__).parents[2] / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_ldm_sample_passes_guidance_rescale(monkeypatch, tmp_path):
    from ldm.config import ConfigError
    from ldm.sample import run

    recorder = RecordingSampler()
    _fake_load(monkeypatch, recorder)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    common = [f"model_path={model}", f"out_dir={tmp_path / 'out'}", f"paths.output_dir={tmp_path}", "labels=[1]",
              "n=2", "save_pngs=false"]
    assert _compose("sample", common).guidance_rescale == 0.0
    run(_compose("sample", [*common, "guidance_rescale=0.7"]))
    # guidance_scale: null = the export's; this stand-in records none, so the default recipe's 1.75
    assert recorder.calls == [{"guidance_scale": 1.75, "guidance_rescale": 0.7}]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["guidance_rescale"] == 0.7
    with pytest.raises(ConfigError, match="guidance_rescale"):
        run(_compose("sample", [*common, "guidance_rescale=1.5"]))


def test_ldm_evaluate_passes_guidance_rescale(monkeypatch, tmp_path):
    from ldm.evaluate import generate

    recorder = RecordingSampler()
    _fake_load(monkeypatch, recorder)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    common = [f"model_path={model}", f"paths.output_dir={tmp_path}", "labels=[0]", "n=2"]
    assert _compose("evaluate", common).guidance_rescale == 0.0
    generate(_compose("evaluate", [*common, "guidance_rescale=0.5"]), tmp_path)
    # guidance_scale: null = the export's; this stand-in records none, so the default recipe's 1.75
    assert recorder.calls == [{"guidance_scale": 1.75, "guidance_rescale": 0.5}]
    assert json.loads((tmp_path / "manifest.json").read_text())["guidance_rescale"] == 0.5


def test_previews_and_final_samples_pass_guidance_rescale(monkeypatch, tmp_path, compose_cfg):
    from hydra.utils import instantiate

    from ldm.lit import latent_diffusion

    cfg = compose_cfg(["stage=ldm", "stage.module.preview.guidance_rescale=0.6",
                       "stage.final_samples.guidance_rescale=0.4", "stage.final_samples.judge=null"], tmp_path)
    preview = instantiate(cfg.stage.module.preview)
    assert preview.guidance_rescale == 0.6
    recorder = RecordingSampler()
    trainer = SimpleNamespace(is_global_zero=True, precision="32-true", default_root_dir=str(tmp_path), global_step=1,
                              loggers=[])
    module = SimpleNamespace(image_size=8, trainer=trainer, preview=preview, device=torch.device("cpu"),
                             sampler=lambda: recorder, _guidance=None, preview_prompts=lambda: [],
                             ema_precision=contextlib.nullcontext)
    latent_diffusion.LatentDiffusionModule.log_previews(module)
    # 3 classes x 8 in batches of 16: two batches per guidance scale
    assert [c["guidance_rescale"] for c in recorder.calls] == [0.6] * 2 * len(preview.guidance_scales)

    recorder.calls = []
    module = SimpleNamespace(sampler=lambda: recorder, ema=None)
    cfg.stage.final_samples.per_class = 1
    write_final_samples(module, SimpleNamespace(num_classes=3, image_size=8), tmp_path / "final", cfg)
    assert recorder.calls == [{"guidance_scale": 3.5, "guidance_rescale": 0.4}]  # the default final samples' scale

    from ldm.lit.sample_metrics import SampleMetricsCallback

    recorder.calls = []
    callback = SampleMetricsCallback(guidance_scale=2.0, guidance_rescale=0.7, per_class=1, metrics=[],
                                     cache_dir=str(tmp_path), reference="mnist5k")
    module = SimpleNamespace(image_size=8, sampler=lambda: recorder, model=recorder)
    callback.compute(SimpleNamespace(global_step=1, datamodule=None, precision="32-true"), module)
    assert recorder.calls == [{"guidance_scale": 2.0, "guidance_rescale": 0.7}]


def test_sdedit_under_a_karras_sampler_falls_back_to_discrete_timesteps(caplog):
    # sampler=heun (the Karras default) used to raise for img2img: an edit starts at a discrete timestep.
    schedule = NoiseSchedule("linear")
    z0 = torch.zeros(2, C, SIZE, SIZE)
    with caplog.at_level(logging.INFO, logger="ldm.model.edit"):
        x, kwargs = LatentEdit(z0, strength=0.5).start(torch.randn(2, C, SIZE, SIZE), schedule,
                                                       {"steps": 10, "karras": True, "timestep_spacing": "trailing"})
    assert "karras" not in kwargs and kwargs["timesteps"][0] == round(0.5 * 999) and len(kwargs["timesteps"]) == 5
    assert "sampler.karras=false" in caplog.text
    sampler = LatentDiffusion(PlainUNet(), Conditioner([]), IdentityFirstStage(), _objective())
    edit = LatentEdit(torch.full((2, C, SIZE, SIZE), 0.3), strength=0.4)
    images = sampler.sample({"n": [None] * 2}, SIZE, {"name": "heun", "steps": 6, "karras": True}, edit=edit)
    assert torch.isfinite(images).all()
    # strength 1 (pure noise, e.g. inpainting with a mask) keeps the Karras sigmas
    _, kwargs = LatentEdit(z0, strength=1.0).start(torch.randn(2, C, SIZE, SIZE), schedule, {"karras": True})
    assert kwargs == {"karras": True}
