"""``ldm-export``: a stage-2 export as a CompVis single file (read back by diffusers' own single-file conversion
utilities and by our reader) and as a diffusers folder (loaded by diffusers), all with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldm.diffusion.schedules import NoiseSchedule, sampling_timesteps
from ldm.export_cli import main
from ldm.io.compvis import load_compvis_autoencoder, load_compvis_unet, read_original_config
from ldm.io.export import save_export
from ldm.nets.autoencoder import AutoencoderKL
from ldm.nets.conditioners import ClassEmbedder
from ldm.nets.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

DDCONFIG = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, attn_resolutions=[], in_channels=3, out_ch=3,
                resolution=16, dropout=0.0, double_z=True, use_mid_attn=True, norm_num_groups=32)
CLASS_CONDITIONER = {"_target_": "ldm.nets.conditioners.Conditioner", "embedders": [{
    "_target_": "ldm.nets.conditioners.ClassEmbedder", "num_classes": 10, "embed_dim": 16, "n_tokens": 1,
    "output": "context", "input_key": "label", "drop_rate": 0.1}]}
TEXT_CONDITIONER = {"_target_": "ldm.nets.conditioners.Conditioner", "embedders": [{
    "_target_": "ldm.nets.conditioners.FrozenTextEncoder", "pretrained": "/models/minilm", "max_length": 32,
    "layer": "last", "freeze": True, "input_key": "caption", "drop_rate": 0.1}]}
VARIANTS = {
    # SD-1.x style: conv projections, 2 heads, SD's scaled-linear betas, eps, class tokens as context
    "sd1-class": dict(spec=dict(attention_resolutions=[1], num_heads=2), unet={}, conditioner=CLASS_CONDITIONER,
                      schedule=dict(kind="scaled_linear"), prediction="eps"),
    # SD-2.x style: linear projections, 16-channel heads, depth 2, v prediction, cosine betas
    "sd2-v-cosine": dict(spec=dict(attention_resolutions=[1, 2], num_head_channels=16, transformer_depth=2,
                                   use_linear_in_transformer=True), unet={}, conditioner=CLASS_CONDITIONER,
                         schedule=dict(kind="cosine"), prediction="v"),
    # text reference, AdaGN, a schedule only given_betas/trained_betas can carry
    "text-sigmoid-zsnr": dict(spec=dict(attention_resolutions=[2], num_heads=4), unet=dict(use_scale_shift_norm=True),
                              conditioner=TEXT_CONDITIONER, schedule=dict(kind="sigmoid", zero_terminal_snr=True),
                              prediction="v"),
}


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def _make_export(folder, variant: str):
    """A stage-2 export folder as LatentDiffusionExport writes it, with random weights."""
    v = VARIANTS[variant]
    spec = {"attention_resolutions": [1], "num_heads": None, "num_head_channels": None, "transformer_depth": 1,
            "context_dim": 16, "use_linear_in_transformer": False, **v["spec"]}
    unet_kwargs = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                   "use_scale_shift_norm": False, "resblock_updown": False, "dropout": 0.0,
                   "gradient_checkpointing": False, "num_classes": None, "adm_in_channels": None, **v["unet"]}
    unet = _randomize(UNetModel(transformer=spec, **unet_kwargs), 1)
    autoencoder = _randomize(AutoencoderKL(DDCONFIG, 4), 2)
    tensors = {f"model.diffusion_model.{k}": t for k, t in unet.state_dict().items()}
    tensors.update({f"first_stage_model.{k}": t for k, t in autoencoder.state_dict().items()})
    if v["conditioner"] is CLASS_CONDITIONER:
        embedder = _randomize(ClassEmbedder(10, 16), 3)
        tensors["cond_stage_model.embedders.0.embedding.weight"] = embedder.embedding.weight
    tensors["scale_factor"] = torch.tensor(0.7)
    schedule = {"_target_": "ldm.diffusion.schedules.NoiseSchedule", "kind": "linear", "num_train_timesteps": 1000,
                "beta_start": None, "beta_end": None, "zero_terminal_snr": False, **v["schedule"]}
    config = {
        "unet": {"_target_": "ldm.nets.unet.UNetModel", **unet_kwargs,
                 "transformer": {"_target_": "ldm.nets.unet.TransformerSpec", **spec}},
        "conditioner": v["conditioner"],
        "objective": {"_target_": "ldm.diffusion.objective.DiffusionObjective", "schedule": schedule,
                      "prediction": v["prediction"], "loss_type": "l2", "weighting": "none"},
        "autoencoder": {"_target_": "ldm.nets.autoencoder.AutoencoderKL", "ddconfig": DDCONFIG, "embed_dim": 4},
        "sampler": {"name": "ddim", "steps": 50, "eta": 0.0, "timestep_spacing": "trailing"},
        "scale_factor": 0.7, "data": {"image_size": 16},
    }
    save_export(folder, tensors, config, {"kind": "ldm", "latent_channels": 4})
    return unet, autoencoder, schedule


def _inputs(seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 900]), torch.randn(2, 5, 16, generator=gen),
            torch.randn(2, 3, 16, 16, generator=gen))


def _assert_same_models(unet, autoencoder, their_unet, their_vae):
    z, t, ctx, image = _inputs()
    with torch.no_grad():
        ours, theirs = unet(z, t, context=ctx), their_unet(z, t, encoder_hidden_states=ctx).sample
        assert ours.abs().mean() > 0.05
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(autoencoder.decode(z), their_vae.decode(z).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(autoencoder.encode(image).mean, their_vae.encode(image).latent_dist.mean,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compvis_single_file_reads_back_in_diffusers_and_ours(tmp_path, variant):
    unet, autoencoder, schedule = _make_export(tmp_path / "export", variant)
    target = tmp_path / "out" / "model.safetensors"
    assert main([str(tmp_path / "export"), "--compvis", str(target)]) == 0
    checkpoint = load_file(str(target))
    original = yaml.safe_load(target.with_suffix(".yaml").read_text())

    # diffusers' own single-file conversion, fed our file and our yaml
    unet_config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    if original["model"]["params"]["unet_config"]["params"]["use_scale_shift_norm"]:
        unet_config["resnet_time_scale_shift"] = "scale_shift"  # a CompVis setting diffusers' helper ignores
    their_unet = diffusers.UNet2DConditionModel(**unet_config).eval()
    their_unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original, checkpoint)
    assert vae_config["scaling_factor"] == pytest.approx(0.7)
    their_vae = diffusers.AutoencoderKL(**vae_config).eval()
    their_vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    _assert_same_models(unet, autoencoder, their_unet, their_vae)

    # our reader: same config, same schedule, same weights
    ours = read_original_config(target.with_suffix(".yaml"))
    assert ours.prediction == VARIANTS[variant]["prediction"] and ours.scale_factor == pytest.approx(0.7)
    expected_schedule = {k: v for k, v in schedule.items() if k != "_target_"}
    if ours.schedule["beta_start"] is not None:  # written as the betas' end points
        expected_schedule.update(beta_start=ours.schedule["beta_start"], beta_end=ours.schedule["beta_end"])
    assert ours.schedule == expected_schedule
    torch.testing.assert_close(NoiseSchedule(**ours.schedule).alphas_cumprod,
                               NoiseSchedule(**expected_schedule).alphas_cumprod, rtol=1e-9, atol=0)
    loaded_unet, _ = load_compvis_unet(target, original_config=ours)
    loaded_vae = load_compvis_autoencoder(target, original_config=ours)
    assert loaded_vae.scale_factor == pytest.approx(0.7)
    z, t, ctx, _ = _inputs()
    with torch.no_grad():
        # the weights are compared exactly; two modules' calls agree to fp32 rounding
        assert all(torch.equal(v, unet.state_dict()[k]) for k, v in loaded_unet.state_dict().items())
        torch.testing.assert_close(loaded_unet(z, t, context=ctx), unet(z, t, context=ctx))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compvis_single_file_loads_with_diffusers_from_single_file(tmp_path, variant, monkeypatch):
    """What a diffusers user runs on the file: ``from_single_file`` with our yaml as ``original_config``.
    Offline: local files only, and any connection attempt (a hub config fetch) fails the test."""
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError(f"from_single_file tried to connect: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    unet, autoencoder, _ = _make_export(tmp_path / "export", variant)
    target = tmp_path / "out" / "model.safetensors"
    assert main([str(tmp_path / "export"), "--compvis", str(target), "--diffusers", str(tmp_path / "d")]) == 0
    unet_kwargs = vae_kwargs = {"original_config": str(target.with_suffix(".yaml")), "local_files_only": True}
    if VARIANTS[variant]["unet"].get("use_scale_shift_norm"):
        # diffusers' yaml reader ignores CompVis' use_scale_shift_norm (AdaGN): the architecture then comes
        # from the config ldm-export --diffusers wrote; the weights still come from the single file.
        unet_kwargs = {"config": str(tmp_path / "d"), "subfolder": "unet", "local_files_only": True}
    their_unet = diffusers.UNet2DConditionModel.from_single_file(str(target), **unet_kwargs).eval()
    their_vae = diffusers.AutoencoderKL.from_single_file(str(target), **vae_kwargs).eval()
    assert their_vae.config.scaling_factor == pytest.approx(0.7)
    _assert_same_models(unet, autoencoder, their_unet, their_vae)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusers_folder_loads_in_diffusers_with_same_outputs_and_schedule(tmp_path, variant):
    unet, autoencoder, schedule = _make_export(tmp_path / "export", variant)
    folder = tmp_path / "diffusers"
    assert main([str(tmp_path / "export"), "--diffusers", str(folder)]) == 0
    their_unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    their_vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    assert their_vae.config.scaling_factor == pytest.approx(0.7)
    _assert_same_models(unet, autoencoder, their_unet, their_vae)

    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    ours = NoiseSchedule(**{k: v for k, v in schedule.items() if k != "_target_"})
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours.alphas_cumprod, rtol=2e-5, atol=1e-7)
    expected_prediction = {"eps": "epsilon", "v": "v_prediction"}[VARIANTS[variant]["prediction"]]
    assert scheduler.config.prediction_type == expected_prediction
    scheduler.set_timesteps(50)
    assert torch.equal(scheduler.timesteps, sampling_timesteps(1000, 50, "trailing"))

    index = json.loads((folder / "model_index.json").read_text())
    reference = json.loads((folder / "conditioner.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    if VARIANTS[variant]["conditioner"] is CLASS_CONDITIONER:
        learned = load_file(str(folder / "conditioner.safetensors"))
        assert reference["text_encoders"] == [] and reference["learned_weights"] == "conditioner.safetensors"
        assert list(learned) == ["embedders.0.embedding.weight"] and learned["embedders.0.embedding.weight"].shape == (11, 16)
        assert "_class_name" not in index
    else:
        assert reference["text_encoders"] == [{"pretrained": "/models/minilm", "max_length": 32, "layer": "last",
                                               "input_key": "caption"}]
        assert reference["learned_weights"] is None and not (folder / "conditioner.safetensors").exists()
        assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == [None, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers", "export"]  # no staging left behind


def test_text_encoder_reference_can_be_renamed(tmp_path):
    _make_export(tmp_path / "export", "text-sigmoid-zsnr")
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert main([str(tmp_path / "export"), "--diffusers", str(tmp_path / "d"), "--compvis", str(tmp_path / "m.safetensors"),
                 "--text-encoder", hub_id]) == 0
    reference = json.loads((tmp_path / "d" / "conditioner.json").read_text())
    assert reference["text_encoders"][0]["pretrained"] == hub_id
    assert reference["conditioner"]["embedders"][0]["pretrained"] == hub_id
    original = yaml.safe_load((tmp_path / "m.yaml").read_text())["model"]["params"]
    assert original["cond_stage_config"]["params"]["embedders"][0] == {
        "target": "ldm.nets.conditioners.FrozenTextEncoder",
        "params": {"pretrained": hub_id, "max_length": 32, "layer": "last", "freeze": True, "input_key": "caption",
                   "drop_rate": 0.1}}
    assert original["conditioning_key"] == "crossattn" and original["cond_stage_trainable"] is False
    assert len(original["given_betas"]) == 1000 and "beta_schedule" not in original


def test_sd1_yaml_fields_match_stable_diffusion_conventions(tmp_path):
    _make_export(tmp_path / "export", "sd1-class")
    assert main([str(tmp_path / "export"), "--compvis", str(tmp_path / "m.safetensors")]) == 0
    params = yaml.safe_load((tmp_path / "m.yaml").read_text())["model"]["params"]
    assert params["beta_schedule"] == "linear"  # CompVis' name for SD's scaled_linear
    assert (params["linear_start"], params["linear_end"], params["timesteps"]) == (0.00085, 0.012, 1000)
    assert params["parameterization"] == "eps" and params["channels"] == 4 and params["image_size"] == 8
    assert params["cond_stage_key"] == "label" and params["cond_stage_trainable"] is True
    unet = params["unet_config"]["params"]
    assert unet["num_heads"] == 2 and "num_head_channels" not in unet and unet["use_spatial_transformer"]


def test_existing_outputs_inexpressible_models_and_empty_requests_fail_clearly(tmp_path, capsys):
    _make_export(tmp_path / "export", "sd1-class")
    folder = tmp_path / "d"
    assert main([str(tmp_path / "export"), "--diffusers", str(folder)]) == 0
    first = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main([str(tmp_path / "export"), "--diffusers", str(folder)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "export"), "--diffusers", str(folder), "--overwrite"]) == 0
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "export"]

    config_path = tmp_path / "export" / "config.yaml"
    config_path.write_text(config_path.read_text().replace("prediction: eps", "prediction: edm"))
    assert main([str(tmp_path / "export"), "--diffusers", str(tmp_path / "e"), "--compvis", str(tmp_path / "e.safetensors")]) == 2
    assert "prediction='edm' has no CompVis counterpart" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.safetensors").exists()
    assert main([str(tmp_path / "nope"), "--diffusers", str(tmp_path / "f")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "export")])
    assert "nothing to do" in capsys.readouterr().err
