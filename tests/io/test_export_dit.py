"""``ldm-export`` of a DiT export (issue 24 item 13): the diffusers folder loads in ``DiTTransformer2DModel`` with
our outputs and ``DiTPipeline.from_pretrained(folder)`` draws; the CompVis-style file holds the official DiT
layout under ``model.diffusion_model.*``; a DiT without a diffusers form is refused with the reason."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldm.export_cli import main
from ldm.io.export import save_export
from ldm.nets.autoencoder import AutoencoderKL
from ldm.nets.dit import DiT

diffusers = pytest.importorskip("diffusers")
DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], in_channels=3, out_ch=3,
                resolution=16, dropout=0.0, double_z=True, use_mid_attn=True, norm_num_groups=32)
# cond=class_vector: the labels go to the DiT's own table (10 classes + the null row)
CONDITIONER = {"_target_": "ldm.nets.conditioners.Conditioner", "embedders": [{
    "_target_": "ldm.nets.conditioners.ClassEmbedder", "num_classes": 10, "output": "vector", "input_key": "label",
    "drop_rate": 0.1}]}
DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0,
           num_classes=11, learn_sigma=False, gradient_checkpointing=False, timestep_freq_shift=1)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def _make_export(folder, **overrides) -> DiT:
    kwargs = {**DIT, **overrides}
    dit = _randomize(DiT(**kwargs), 1)
    autoencoder = _randomize(AutoencoderKL(DDCONFIG, 4), 2)
    tensors = {f"model.diffusion_model.{k}": t for k, t in dit.state_dict().items()}
    tensors.update({f"first_stage_model.{k}": t for k, t in autoencoder.state_dict().items()})
    tensors["scale_factor"] = torch.tensor(0.7)
    config = {
        "backbone": {"_target_": "ldm.nets.dit.DiT", **kwargs}, "conditioner": CONDITIONER,
        "objective": {"_target_": "ldm.diffusion.objective.DiffusionObjective", "prediction": "eps", "loss_type": "l2",
                      "weighting": "none", "schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule",
                                                        "kind": "linear", "num_train_timesteps": 1000}},
        "autoencoder": {"_target_": "ldm.nets.autoencoder.AutoencoderKL", "ddconfig": DDCONFIG, "embed_dim": 4},
        "sampler": {"name": "ddim", "steps": 50, "eta": 0.0, "timestep_spacing": "trailing"},
        "scale_factor": 0.7, "data": {"image_size": 16},
    }
    save_export(folder, tensors, config, {"kind": "ldm", "latent_channels": 4})
    return dit


def test_dit_export_loads_in_diffusers_and_dit_pipeline_draws(tmp_path):
    dit = _make_export(tmp_path / "export")
    out = tmp_path / "d"
    assert main([str(tmp_path / "export"), "--diffusers", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    gen = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        ours = dit(x, t, y=y)
        assert ours.abs().mean() > 0.05
        expected = theirs(x, timestep=t, class_labels=y).sample  # another implementation: fp32 rounding differs
        assert float((ours - expected).norm() / expected.norm()) < 1e-4
        pipe = diffusers.DiTPipeline.from_pretrained(str(out))  # the folder alone
        # guidance_scale 1: DiTPipeline's null class is 1000 (ImageNet), not this model's 10
        images = pipe(class_labels=[1, 7], num_inference_steps=3, guidance_scale=1.0, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_dit_compvis_file_holds_the_official_layout(tmp_path):
    dit = _make_export(tmp_path / "export")
    assert main([str(tmp_path / "export"), "--compvis", str(tmp_path / "m.safetensors")]) == 0
    tensors = load_file(str(tmp_path / "m.safetensors"))
    state = {k.removeprefix("model.diffusion_model."): v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    assert "blocks.0.attn.qkv.weight" in state and "y_embedder.embedding_table.weight" in state
    original = yaml.safe_load((tmp_path / "m.yaml").read_text())["model"]["params"]
    backbone = original["unet_config"]
    assert backbone["target"] == "ldm.nets.dit.DiT"
    again = DiT(**backbone["params"])
    again.load_state_dict(state, strict=True)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([2])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x, t, y=y), dit(x, t, y=y), rtol=0, atol=0)


def test_dit_without_a_diffusers_form_is_refused_with_the_reason(tmp_path, capsys):
    _make_export(tmp_path / "export", timestep_freq_shift=0)
    assert main([str(tmp_path / "export"), "--diffusers", str(tmp_path / "d")]) == 2
    assert "timestep_freq_shift=1" in capsys.readouterr().err and not (tmp_path / "d").exists()
