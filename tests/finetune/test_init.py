"""init=compvis|diffusers: stage 2 starts from a tiny SD-shaped model saved by diffusers as a pipeline folder and
as a CompVis single file. The model ldm-train builds gives the loss diffusers' own modules give at the same inputs;
schedule and prediction type come from the source; bad sources fail with a message that names the fix."""

from __future__ import annotations

import pickle

import pytest
import torch
from hydra.utils import instantiate
from tiny_sd import compvis, diffusers_init, stage2

from ldm.finetune.source import InitError
from ldm.finetune.wiring import configure
from ldm.io.compvis import UnsafeCheckpointError
from ldm.train import train

diffusers = pytest.importorskip("diffusers")


def build_module(compose_cfg, overrides, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    configure(cfg, tmp_path)
    return cfg, instantiate(cfg.stage.module)


def diffusers_loss(parts, images, captions, t, noise, prediction):
    """The diffusers/transformers reference: VAE mean latents x scaling_factor, CLIP last hidden state, the
    scheduler's q(x_t | x_0) and target, the UNet's output; plain per-sample MSE."""
    ids = parts["tokenizer"](captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        context = parts["text_model"](ids.input_ids).last_hidden_state
        latents = parts["vae"].encode(images).latent_dist.mean * parts["vae"].config.scaling_factor
        noisy = parts["scheduler"].add_noise(latents, noise, t)
        out = parts["unet"](noisy, t, encoder_hidden_states=context).sample
    target = noise if prediction == "epsilon" else parts["scheduler"].get_velocity(latents, noise, t)
    return (out - target).square().flatten(1).mean(1)


@pytest.mark.parametrize("fmt, prediction", [("diffusers", "epsilon"), ("compvis", "epsilon"), ("diffusers", "v_prediction")])
def test_first_loss_equals_the_one_of_diffusers_modules(tiny, compose_cfg, tmp_path, fmt, prediction):
    import tiny_sd

    parts = tiny_sd.build(tmp_path / "src", prediction)  # same seeds as `tiny`; its own scheduler config
    source = {"diffusers": diffusers_init(tmp_path / "src"), "compvis": compvis(tmp_path / "src")}[fmt]
    cfg, module = build_module(compose_cfg, stage2(tiny, *source, "cond.drop_rate=0", "first_stage.sample_posterior=false"),
                               tmp_path / "run")
    assert cfg.objective.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert cfg.schedule.kind == "scaled_linear" and float(module.model.first_stage.scale_factor) == tiny_sd.SCALE
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = ["a red square 1", "b2"]
    with torch.no_grad():
        ours, t = module.model.loss({"image": images, "caption": captions}, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)  # the objective draws t, then the noise
    z0 = module.model.first_stage.encode(images)
    t_again = module.model.objective.sample_timesteps(2, z0, replay)
    noise = module.model.objective.sample_noise(z0, replay)
    assert torch.equal(t, t_again)
    reference = diffusers_loss(parts, images, captions, t, noise, prediction)
    assert ours.mean() > 0.05
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("source", ["diffusers", "compvis"])
def test_ldm_train_starts_from_each_format_and_reports_every_tensor(tiny, compose_cfg, tmp_path, source):
    overrides = {"diffusers": diffusers_init(tiny), "compvis": compvis(tiny)}[source]
    results = train(compose_cfg(stage2(tiny, *overrides), tmp_path))
    assert results["train/steps"] == 4 and results["train/loss"] < 10
    rows = [line.split("\t") for line in (tmp_path / "init_report.tsv").read_text().splitlines()[1:]]
    where = {}
    for key, _, destination in rows:
        where.setdefault(destination.split(":")[0], []).append(key)
    assert set(where) >= {"backbone", "first_stage", "conditioner"}
    assert len(where["backbone"]) == 208  # every UNet tensor of the tiny model
    if source == "compvis":
        assert "betas" in where["skipped"] and "model_ema.decay" in where["skipped"]
    from ldm.io.load import load_ldm_export

    sampler, _ = load_ldm_export(tmp_path / "export")  # the export is an ordinary one
    assert sampler.conditioner.spec.context_dim == 64
    # Its CompVis single file carries the frozen CLIP tower where SD-1.x checkpoints have it, not only a reference
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from ldm.export_cli import main as export_main
    from ldm.io.convert.clip import to_transformers4

    assert export_main([str(tmp_path / "export"), "--compvis", str(tmp_path / "sd.safetensors")]) == 0
    prefix = "cond_stage_model.transformer."
    tower = {k.removeprefix(prefix): v for k, v in load_file(str(tmp_path / "sd.safetensors")).items() if k.startswith(prefix)}
    base = to_transformers4(  # the installed transformers may name it without text_model.
        CLIPTextModel.from_pretrained(str(tiny / "diffusers" / "text_encoder")).state_dict())
    base.pop("text_model.embeddings.position_ids", None)
    tower.pop("text_model.embeddings.position_ids", None)
    assert tower.keys() == base.keys()
    assert all(torch.equal(tower[k], base[k]) for k in base)  # a copy of the frozen weights


def test_init_errors_name_the_fix(tiny, compose_cfg, tmp_path):
    def fails(overrides, error, match):
        with pytest.raises(error, match=match):
            train(compose_cfg(stage2(tiny, *overrides), tmp_path / str(len(list(tmp_path.iterdir())))))

    fails(["init=compvis", f"init.path={tmp_path / 'missing.safetensors'}"], InitError, "does not exist: a CompVis")
    fails(["init=compvis", f"init.path={tiny / 'diffusers'}"], InitError, "is a folder.*use init=diffusers")
    fails(["init=diffusers", f"init.path={tiny / 'sd.safetensors'}"], InitError, "is a file.*use init=compvis")
    fails(["init=compvis", f"init.path={tiny / 'sd.safetensors'}", f"init.tokenizer={tiny / 'tokenizer'}"], InitError,
          "does not state its prediction type: set init.prediction=eps")
    fails(["init=compvis", f"init.path={tiny / 'sd.safetensors'}", "init.prediction=eps"], InitError,
          "no tokenizer: set init.tokenizer")
    # another architecture: the configured model/ldm must match when the config is not derived
    fails([*diffusers_init(tiny), "init.derive_config=false", "model/ldm=unet_tiny"], ValueError,
          r"first mismatch input_blocks\.3\.1\.norm\.weight: missing from the checkpoint \(model \(64,\)\)")
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "obj": pickle.PickleError()}, pickled)
    fails(["init=compvis", f"init.path={pickled}", "init.prediction=eps"], UnsafeCheckpointError, "refusing to load")
    fails(["init=export", f"init.path={tiny / 'diffusers'}"], Exception, "export")
    with pytest.raises(ValueError, match="init= and finetune= set up stage 2: use them with stage=ldm"):
        train(compose_cfg(["stage=vae", "debug=fast", "logger=csv", *diffusers_init(tiny)], tmp_path / "vae"))
