"""The remaining init options, checked where they act (the composed config, the loaded weights), and a run that
continues from an ldm-train export (init=export), LoRA with dropout on a MiniLM-free tiny text model."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tiny_sd import compvis, diffusers_init, stage2

from ldm.finetune.source import InitError
from ldm.finetune.wiring import configure
from ldm.train import train

ORIGINAL_YAML = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    parameterization: v
    scale_factor: 0.5
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {in_channels: 4, out_channels: 4, model_channels: 32, attention_resolutions: [1], num_res_blocks: 1,
               channel_mult: [1, 2], num_heads: 8, use_spatial_transformer: true, transformer_depth: 1,
               context_dim: 64, legacy: false}
"""


def configured(compose_cfg, tmp_path, *overrides):
    cfg = compose_cfg(stage2(*overrides), tmp_path)
    configure(cfg, tmp_path)
    return cfg


def test_original_config_decides_architecture_schedule_and_prediction(tiny, compose_cfg, tmp_path):
    (tmp_path / "sd.yaml").write_text(ORIGINAL_YAML)
    source = [f"init.original_config={tmp_path / 'sd.yaml'}"]
    cfg = configured(compose_cfg, tmp_path, tiny, *compvis(tiny)[:3], *source)
    assert cfg.objective.prediction == "v" and cfg.schedule.kind == "scaled_linear"
    assert cfg.model.ldm.backbone.transformer.num_heads == 8 and cfg.first_stage.original_config == str(tmp_path / "sd.yaml")
    with pytest.raises(InitError, match="init.prediction=eps but .* was trained with v"):
        configured(compose_cfg, tmp_path, tiny, *compvis(tiny), *source)


def test_use_ema_loads_the_flat_model_ema_copy(tiny, compose_cfg, tmp_path):
    tensors = load_file(str(tiny / "sd.safetensors"))
    unet = {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1 for k, v in unet.items()}
    save_file({**tensors, **ema}, str(tmp_path / "ema.safetensors"))
    overrides = ["init=compvis", f"init.path={tmp_path / 'ema.safetensors'}", f"init.tokenizer={tiny / 'tokenizer'}",
                 "init.prediction=eps"]
    plain = instantiate(configured(compose_cfg, tmp_path / "a", tiny, *overrides).stage.module.model).backbone
    averaged = instantiate(configured(compose_cfg, tmp_path / "b", tiny, *overrides, "init.use_ema=true").stage.module.model).backbone
    key = "out.2.bias"
    assert torch.equal(averaged.state_dict()[key], plain.state_dict()[key] + 1)
    with pytest.raises(InitError, match="only with init=compvis"):
        configured(compose_cfg, tmp_path / "c", tiny, *diffusers_init(tiny), "init.use_ema=true")


def test_first_stage_and_conditioner_can_stay_as_configured(tiny, compose_cfg, tmp_path):
    cfg = configured(compose_cfg, tmp_path, tiny, *diffusers_init(tiny), "init.first_stage=false",
                     "init.conditioner=false", "cond=clip", f"cond.conditioner.embedders.0.pretrained={tiny / 'x'}")
    assert cfg.first_stage._target_ == "ldm.io.first_stage.from_export"
    assert cfg.cond.conditioner.embedders[0].pretrained == str(tiny / "x")


def test_an_explicit_text_encoder_folder_wins(tiny, compose_cfg, tmp_path):
    import tiny_sd

    tokenizer, model = tiny_sd.tokenizer_and_text_model()
    tokenizer.save_pretrained(tmp_path / "te")
    model.save_pretrained(tmp_path / "te")
    cfg = configured(compose_cfg, tmp_path, tiny, *compvis(tiny)[:2], "init.prediction=eps",
                     f"init.text_encoder={tmp_path / 'te'}")
    assert cfg.cond.conditioner.embedders[0].pretrained == str(tmp_path / "te") and cfg.cond.context_dim == 64


def test_single_file_text_encoder_equals_the_original(tiny, compose_cfg, tmp_path):
    """The CLIP model assembled from cond_stage_model.* + the tokenizer gives the source model's hidden states."""
    import tiny_sd

    tokenizer, model = tiny_sd.tokenizer_and_text_model()
    cfg = configured(compose_cfg, tmp_path, tiny, *compvis(tiny))
    conditioner = instantiate(cfg.cond.conditioner).eval()
    ids = tokenizer(["a b3"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(conditioner({"caption": ["a b3"]})["context"], model(ids).last_hidden_state)


@pytest.mark.slow
def test_a_run_continues_from_an_ldm_export_with_lora_dropout(tiny, compose_cfg, tmp_path):
    train(compose_cfg(stage2(tiny, *diffusers_init(tiny)), tmp_path / "base"))
    export = tmp_path / "base" / "export"
    overrides = ["init=export", f"init.path={export}", "finetune=lora", "finetune.lora.dropout=0.1"]
    cfg = configured(compose_cfg, tmp_path / "probe", tiny, *overrides)
    base = OmegaConf.load(export / "config.yaml")
    assert OmegaConf.to_container(cfg.model.ldm.backbone)["channel_mult"] == list(base.backbone.channel_mult)
    results = train(compose_cfg(stage2(tiny, *overrides), tmp_path / "ft"))
    assert results["train/steps"] == 4
    assert (tmp_path / "ft" / "export" / "lora" / "adapter.safetensors").is_file()


def test_a_given_scale_factor_and_posterior_setting_are_kept(tiny, compose_cfg, tmp_path):
    cfg = configured(compose_cfg, tmp_path, tiny, *compvis(tiny), "first_stage.scale_factor=0.25",
                     "first_stage.sample_posterior=false")
    first_stage = instantiate(cfg.first_stage)
    assert float(first_stage.scale_factor) == 0.25 and first_stage.sample_posterior is False
