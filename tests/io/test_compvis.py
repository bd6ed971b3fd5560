"""Reading CompVis / Stable Diffusion single files and diffusers AutoencoderKL folders: safe loading (a
code-executing pickle is refused), configs from shapes and from original yamls, strict matching with a
readable report, and first_stage=pretrained."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.config import ConfigError
from ldm.io.compvis import (
    UnsafeCheckpointError,
    autoencoder_config_from_state_dict,
    load_compvis_autoencoder,
    load_compvis_unet,
    load_diffusers_autoencoder,
    read_original_config,
    read_state_dict,
    schedule_from_compvis,
    unet_kwargs_from_state_dict,
)
from ldm.io.export import ExportError
from ldm.io.first_stage import pretrained_first_stage
from ldm.nets.autoencoder import AutoencoderKL, EncoderDecoderConfig
from ldm.nets.unet import UNetModel

SD1_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    conditioning_key: crossattn
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def _sd2_yaml() -> str:
    """SD-2.x v-model yaml: v prediction, 64-channel heads, linear projections, OpenCLIP-H context."""
    return (SD1_YAML.replace("num_heads: 8", "num_head_channels: 64\n        use_linear_in_transformer: True\n"
                             "        use_fp16: True")
            .replace("context_dim: 768", "context_dim: 1024")
            .replace("    linear_start", '    parameterization: "v"\n    linear_start')
            .replace("          double_z: true", '          attn_type: "vanilla-xformers"\n          double_z: true'))


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


TINY_UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                 transformer=dict(attention_resolutions=[1], num_heads=2, context_dim=16))
TINY_DDCONFIG = EncoderDecoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)


def _unet_output(unet: UNetModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 16, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([4, 800]), context=ctx)


def _sd_like_checkpoint():
    """A tiny full single file as SD ships it: all parts under their prefixes, plus schedule buffers,
    CompVis' flat model_ema.* copy of the UNet and a condition encoder."""
    unet, ema = _randomize(UNetModel(**TINY_UNET), 1), _randomize(UNetModel(**TINY_UNET), 2)
    autoencoder = _randomize(AutoencoderKL(TINY_DDCONFIG, 4), 3)
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.state_dict().items()})
    tensors.update({f"first_stage_model.{k}": v for k, v in autoencoder.state_dict().items()})
    tensors.update({"betas": torch.linspace(1e-4, 2e-2, 10), "model_ema.num_updates": torch.tensor(7),
                    "cond_stage_model.transformer.embeddings.weight": torch.randn(5, 16)})
    return tensors, unet, ema, autoencoder


# ---------------------------------------------------------------------------------------------------
# safe reading


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "plain-pickle"])
def test_code_executing_pickle_is_refused_not_run(tmp_path, writer):
    import pickle

    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    if writer == "torch.save":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": _Payload(marker)}, path)
    else:  # no tensors: the payload is the first thing the unpickler meets
        path.write_bytes(pickle.dumps({"callbacks": _Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.ckpt.*Convert it to .safetensors.*(posix|os).system"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_compvis_unet(path)
    assert not marker.exists()


def test_plain_checkpoints_load_and_bad_files_fail_clearly(tmp_path):
    state = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    torch.save({"state_dict": state, "global_step": 12, "epoch": 1}, tmp_path / "sd.ckpt")
    loaded = read_state_dict(tmp_path / "sd.ckpt")
    assert set(loaded) == set(state) and torch.equal(loaded["a.weight"], state["a.weight"])
    save_file(state, str(tmp_path / "sd.safetensors"))
    assert torch.equal(read_state_dict(tmp_path / "sd.safetensors")["b"], state["b"])
    with pytest.raises(ExportError, match="does not exist"):
        read_state_dict(tmp_path / "missing.ckpt")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ExportError, match="unknown checkpoint type"):
        read_state_dict(tmp_path / "x.onnx")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")
    torch.save({"global_step": 3}, tmp_path / "empty.ckpt")
    with pytest.raises(ExportError, match="holds no tensors"):
        read_state_dict(tmp_path / "empty.ckpt")


# ---------------------------------------------------------------------------------------------------
# configs from shapes and from original yamls


def _meta_state(module_factory):
    with torch.device("meta"):  # shapes only: SD-sized models cost nothing
        return module_factory().state_dict()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
             transformer=dict(attention_resolutions=[1, 2, 4], num_heads=8, num_head_channels=None, transformer_depth=1,
                              context_dim=768, use_linear_in_transformer=False)),  # SD-1.5
        dict(in_channels=9, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
             transformer=dict(attention_resolutions=[1, 2, 4], num_heads=None, num_head_channels=64, transformer_depth=1,
                              context_dim=1024, use_linear_in_transformer=True)),  # SD-2 inpainting
        dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
             transformer=dict(attention_resolutions=[1], num_heads=2, num_head_channels=None, transformer_depth=2,
                              context_dim=None, use_linear_in_transformer=False),
             use_scale_shift_norm=True, resblock_updown=True, num_classes=11),
        dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=3, transformer=None,
             adm_in_channels=6),
    ],
    ids=["sd15", "sd2-inpaint", "self-attn-updown-classes", "no-transformer-adm"],
)
def test_unet_config_is_recovered_from_shapes(kwargs):
    full = {"use_scale_shift_norm": False, "resblock_updown": False, "num_classes": None, "adm_in_channels": None, **kwargs}
    spec = full["transformer"]
    heads = {} if spec is None else dict(num_heads=spec["num_heads"], num_head_channels=spec["num_head_channels"])
    if kwargs["model_channels"] == 320:
        heads = {}  # the SD convention fills them in
    assert unet_kwargs_from_state_dict(_meta_state(lambda: UNetModel(**kwargs)), **heads) == full


def test_autoencoder_config_is_recovered_from_shapes():
    kl_f8 = EncoderDecoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
    assert autoencoder_config_from_state_dict(_meta_state(lambda: AutoencoderKL(kl_f8, 4))) == (kl_f8, 4)
    odd = EncoderDecoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=3, attn_resolutions=(128,),
                               in_channels=1, out_ch=1, use_mid_attn=False)
    assert autoencoder_config_from_state_dict(_meta_state(lambda: AutoencoderKL(odd, 2))) == (odd, 2)


def test_original_yamls_map_to_our_configs(tmp_path):
    (tmp_path / "v1.yaml").write_text(SD1_YAML)
    sd1 = read_original_config(tmp_path / "v1.yaml")
    sd15_state = _meta_state(lambda: UNetModel(**sd1.unet))
    derived = unet_kwargs_from_state_dict(sd15_state)
    assert len(sd15_state) == 686 and derived["transformer"]["num_heads"] == 8
    assert {k: v for k, v in sd1.unet.items() if k not in ("dropout", "gradient_checkpointing", "transformer")} == \
        {k: v for k, v in derived.items() if k != "transformer"}
    assert sd1.ddconfig == EncoderDecoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4)
    assert sd1.embed_dim == 4 and sd1.scale_factor == 0.18215 and sd1.prediction == "eps"
    assert sd1.schedule == {"kind": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                            "beta_end": 0.012, "zero_terminal_snr": False}
    assert sd1.cond_stage_config["target"].endswith("FrozenCLIPEmbedder")

    sd2 = read_original_config(OmegaConf.create(_sd2_yaml()))
    assert sd2.prediction == "v" and sd2.unet["transformer"]["num_head_channels"] == 64
    assert sd2.unet["transformer"]["use_linear_in_transformer"] and sd2.unet["transformer"]["context_dim"] == 1024
    meta = _meta_state(lambda: UNetModel(**sd2.unet))
    assert meta["input_blocks.1.1.proj_in.weight"].shape == (320, 320)


def test_unsupported_original_configs_are_named():
    cfg = OmegaConf.to_container(OmegaConf.create(SD1_YAML))
    cfg["model"]["params"]["unet_config"]["params"]["use_spatial_transformer"] = False
    with pytest.raises(ExportError, match="use_spatial_transformer=false"):
        read_original_config(cfg)
    cfg = OmegaConf.to_container(OmegaConf.create(SD1_YAML))
    cfg["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["tanh_out"] = True
    with pytest.raises(ExportError, match="tanh_out=True"):
        read_original_config(cfg)
    cfg = OmegaConf.to_container(OmegaConf.create(SD1_YAML))
    cfg["model"]["params"]["first_stage_config"]["target"] = "ldm.models.autoencoder.VQModelInterface"
    with pytest.raises(ExportError, match="only AutoencoderKL"):
        read_original_config(cfg)
    with pytest.raises(ExportError, match="no counterpart"):
        schedule_from_compvis({"beta_schedule": "sqrt"})


def test_compvis_schedule_names_and_given_betas_map_to_ours():
    from ldm.diffusion.schedules import NoiseSchedule

    assert schedule_from_compvis({"beta_schedule": "sqrt_linear"})["kind"] == "linear"
    assert schedule_from_compvis({"beta_schedule": "cosine"})["beta_start"] is None
    betas = NoiseSchedule("sigmoid", 50, zero_terminal_snr=True).betas.tolist()
    assert schedule_from_compvis({"given_betas": betas}) == {
        "kind": "sigmoid", "num_train_timesteps": 50, "beta_start": None, "beta_end": None, "zero_terminal_snr": True}


# ---------------------------------------------------------------------------------------------------
# loading single files


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd_single_file_parts_load_with_identical_outputs(tmp_path, suffix):
    tensors, unet, ema, autoencoder = _sd_like_checkpoint()
    path = tmp_path / f"model{suffix}"
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": tensors}, path)

    loaded, kwargs = load_compvis_unet(path, num_heads=2)
    assert kwargs["transformer"]["context_dim"] == 16 and not loaded.training
    torch.testing.assert_close(_unet_output(loaded), _unet_output(unet), rtol=1e-6, atol=1e-6)
    loaded_ema, _ = load_compvis_unet(path, num_heads=2, use_ema=True)
    torch.testing.assert_close(_unet_output(loaded_ema), _unet_output(ema), rtol=1e-6, atol=1e-6)

    first = load_compvis_autoencoder(path)
    assert first.scale_factor is None
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(first.autoencoder.decode(z), autoencoder.decode(z), rtol=1e-6, atol=1e-6)


def test_autoencoder_only_file_drops_training_loss_weights(tmp_path):
    autoencoder = _randomize(AutoencoderKL(TINY_DDCONFIG, 4), 4)
    tensors = dict(autoencoder.state_dict())
    tensors.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)})
    save_file(tensors, str(tmp_path / "vae.safetensors"))
    (tmp_path / "v1.yaml").write_text(SD1_YAML.replace("ch: 128", "ch: 32").replace("ch_mult: [1, 2, 4, 4]", "ch_mult: [1, 2]")
                                      .replace("num_res_blocks: 2\n          attn", "num_res_blocks: 1\n          attn"))
    loaded = load_compvis_autoencoder(tmp_path / "vae.safetensors", original_config=tmp_path / "v1.yaml")
    assert loaded.scale_factor == 0.18215  # stated by the yaml
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.autoencoder.encode(x).mean, autoencoder.encode(x).mean, rtol=1e-6, atol=1e-6)


def test_mismatched_checkpoint_gives_a_readable_report(tmp_path):
    tensors, *_ = _sd_like_checkpoint()
    del tensors["model.diffusion_model.out.2.bias"]
    tensors["model.diffusion_model.input_blocks.9.0.weight"] = torch.zeros(1)
    tensors["model.diffusion_model.time_embed.0.weight"] = torch.zeros(128, 33)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    yaml_cfg = OmegaConf.create({"model": {"params": {"unet_config": {"params": {
        **{k: v for k, v in TINY_UNET.items() if k != "transformer"}, "attention_resolutions": [1], "num_heads": 2,
        "context_dim": 16, "use_spatial_transformer": True}}}}})
    with pytest.raises(ExportError) as err:
        load_compvis_unet(tmp_path / "bad.safetensors", original_config=yaml_cfg)
    text = str(err.value)
    assert "bad.safetensors (model.diffusion_model.*)" in text
    assert "missing (1): ['out.2.bias']" in text
    assert "unexpected (1): ['input_blocks.9.0.weight']" in text
    assert "shape of time_embed.0.weight: checkpoint (128, 33) vs model (128, 32)" in text
    with pytest.raises(ExportError, match="holds no model.diffusion_model"):
        save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
        load_compvis_unet(tmp_path / "vae.safetensors")


# ---------------------------------------------------------------------------------------------------
# diffusers folders and first_stage=pretrained


def _diffusers_vae_folder(tmp_path, **extra):
    diffusers = pytest.importorskip("diffusers")
    reference = _randomize(diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[32, 64], latent_channels=4, sample_size=16, scaling_factor=0.5, **extra), 5)
    folder = tmp_path / "pipeline" / "vae"
    reference.save_pretrained(folder)
    return reference, folder


def test_diffusers_folder_loads_directly_or_from_a_pipeline_folder(tmp_path):
    reference, folder = _diffusers_vae_folder(tmp_path)
    for path in (folder, folder.parent):
        loaded = load_diffusers_autoencoder(path)
        assert loaded.scale_factor == 0.5 and loaded.shift_factor is None
        z = torch.randn(1, 4, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded.autoencoder.decode(z), reference.decode(z).sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="config.json is missing"):
        load_diffusers_autoencoder(tmp_path)
    save_file(reference.state_dict(), str(tmp_path / "diffusers_names.safetensors"))
    with pytest.raises(ExportError, match="uses diffusers' key names: pass its folder"):
        load_compvis_autoencoder(tmp_path / "diffusers_names.safetensors")


def test_pretrained_first_stage_from_config(tmp_path, compose_cfg):
    reference, folder = _diffusers_vae_folder(tmp_path)
    cfg = compose_cfg(["stage=ldm", "first_stage=pretrained", f"first_stage.path={folder}", "model/ldm=unet_tiny"],
                      tmp_path)
    # the backbone's channels follow the pretrained first stage through the model's wiring
    assert instantiate(cfg.stage.module.model).backbone.out_channels == 4
    first_stage = instantiate(cfg.first_stage)
    assert float(first_stage.scale_factor) == 0.5 and first_stage.latent_channels == 4
    assert first_stage.downsample_factor == 2 and not first_stage.autoencoder.training
    x = torch.randn(2, 3, 16, 16)
    expected = reference.encode(x).latent_dist.mean * 0.5
    first_stage.sample_posterior = False
    torch.testing.assert_close(first_stage.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_pretrained_first_stage_fails_clearly(tmp_path):
    _, folder = _diffusers_vae_folder(tmp_path)
    with pytest.raises(ConfigError, match="needs first_stage.path"):
        pretrained_first_stage(None)
    with pytest.raises(ConfigError, match="does not exist"):
        pretrained_first_stage(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="set first_stage.latent_channels=4"):
        pretrained_first_stage(str(folder), latent_channels=3)
    assert float(pretrained_first_stage(str(folder), scale_factor=0.25).scale_factor) == 0.25

    save_file(AutoencoderKL(TINY_DDCONFIG, 4).state_dict(), str(tmp_path / "vae.safetensors"))
    with pytest.raises(ConfigError, match="set first_stage.scale_factor .*0.18215"):
        pretrained_first_stage(str(tmp_path / "vae.safetensors"))
    _, shifted = _diffusers_vae_folder(tmp_path / "shifted", shift_factor=0.1)
    with pytest.raises(ConfigError, match="shift_factor=0.1"):
        pretrained_first_stage(str(shifted))
