"""``ldm-export``: a trained latent diffusion model (a stage-2 export folder) in the ecosystem's formats.

    ldm-export outputs/ldm/<run>/export --compvis sd/model.safetensors --diffusers sd/model-diffusers

--compvis: one ``.safetensors`` in the CompVis / Stable Diffusion single-file layout (``model.diffusion_model.*``
    = EMA UNet, ``first_stage_model.*``, learned ``cond_stage_model.*``, ``scale_factor``) with an original-style
    yaml beside it (``model.params.unet_config`` / ``first_stage_config`` / schedule), as the CompVis code and
    diffusers' single-file loaders expect.
--diffusers: a folder diffusers loads: ``vae/`` (AutoencoderKL), ``unet/`` (UNet2DConditionModel),
    ``scheduler/`` (DDIMScheduler with our betas and prediction type), ``model_index.json``, ``conditioner.json``
    (the encoders the context comes from) plus ``conditioner.safetensors`` with the learned conditioner parts
    (class embeddings), if any. A text-to-image model's encoder is shipped as ``text_encoder/`` + ``tokenizer/``
    (fine-tuned: merged; frozen: copied from its local folder), so ``StableDiffusionPipeline.from_pretrained``
    reads the folder alone; a frozen encoder named by hub id stays a reference (model_index entries null).
    --compvis carries the CLIP tower (fine-tuned, or frozen from its local folder) as SD-1.x's
    ``cond_stage_model.transformer.text_model.*``.
--lora: the adapters of a ``finetune=lora`` run (``<export>/lora``) as ``pytorch_lora_weights.safetensors`` in
    diffusers/peft naming; ``--merge`` is required to write such a run's merged model with --diffusers/--compvis.
Every file is written atomically; the diffusers folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ldm.diffusion.schedules import NoiseSchedule
from ldm.finetune.adapters import read_adapter, write_diffusers_lora
from ldm.io import text_encoder
from ldm.io.compvis import COND_STAGE_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX, strip_prefix
from ldm.io.convert import (
    autoencoder_to_diffusers,
    autoencoder_to_diffusers_config,
    unet_to_diffusers,
    unet_to_diffusers_config,
)
from ldm.io.convert.dit import dit_to_diffusers_config, dit_to_diffusers_state_dict
from ldm.io.export import ExportError, save_tensors_atomic, write_text_atomic
from ldm.io.parts import LatentDiffusionParts, read_parts
from ldm.io.text_encoder import TEXT_ENCODER_TARGET

DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# CompVis names its schedules after what is linear in its code (its "linear" is SD's scaled_linear).
COMPVIS_SCHEDULE = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}
DIFFUSERS_VERSION = "0.30.0"  # the config format written here is read by every diffusers since


def _target_params(node: Any) -> Any:
    """A Hydra node in CompVis' ``instantiate_from_config`` form: ``{target: ..., params: {...}}``."""
    if isinstance(node, Mapping) and "_target_" in node:
        return {"target": node["_target_"], "params": {str(k): _target_params(v) for k, v in node.items() if k != "_target_"}}
    if isinstance(node, Mapping):
        return {str(k): _target_params(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_target_params(v) for v in node]
    return node


def _embedders(parts: LatentDiffusionParts) -> list[dict[str, Any]]:
    return list(parts.conditioner.get("embedders") or [])


def _betas(parts: LatentDiffusionParts) -> torch.Tensor:
    return NoiseSchedule(**parts.schedule).betas


def _tidy(beta: torch.Tensor) -> float:
    # sqrt-then-square leaves 1e-19 residue on SD's 0.00085; 12 digits are far below float32 resolution
    return float(f"{float(beta):.12g}")


def _check_prediction(parts: LatentDiffusionParts, fmt: str) -> None:
    if parts.prediction not in DIFFUSERS_PREDICTION:
        raise ExportError(f"prediction={parts.prediction!r} has no {fmt} counterpart (eps, v and x0 do)")


# ---------------------------------------------------------------------------------------------------
# CompVis


def _original_backbone(parts: LatentDiffusionParts) -> dict[str, Any]:
    """The yaml's ``unet_config``: CompVis' UNetModel, or (CompVis has no DiT) our DiT, whose state dict is the
    official facebookresearch/DiT layout."""
    if parts.dit:
        return {"target": "ldm.nets.dit.DiT", "params": dict(parts.unet)}
    unet, spec = parts.unet, parts.unet.get("transformer")
    if spec is None:
        raise ExportError("CompVis' UNetModel always has attention in its middle block; this UNet has no transformers")
    unet_params = {
        "image_size": parts.latent_size, "in_channels": unet["in_channels"], "out_channels": unet["out_channels"],
        "model_channels": unet["model_channels"], "attention_resolutions": list(spec["attention_resolutions"]),
        "num_res_blocks": unet["num_res_blocks"], "channel_mult": list(unet["channel_mult"]),
        "use_spatial_transformer": True, "transformer_depth": spec.get("transformer_depth", 1),
        "context_dim": spec.get("context_dim"), "use_linear_in_transformer": bool(spec.get("use_linear_in_transformer")),
        "use_checkpoint": bool(unet.get("gradient_checkpointing")), "legacy": False,
        "use_scale_shift_norm": bool(unet.get("use_scale_shift_norm")), "resblock_updown": bool(unet.get("resblock_updown")),
        "dropout": float(unet.get("dropout", 0.0)),
    }
    for heads in ("num_heads", "num_head_channels"):  # only the one that is set, as SD's yamls do
        if spec.get(heads) not in (None, -1):
            unet_params[heads] = spec[heads]
    if unet.get("num_classes") is not None:
        unet_params["num_classes"] = unet["num_classes"]
    if unet.get("adm_in_channels") is not None:
        unet_params.update(num_classes="sequential", adm_in_channels=unet["adm_in_channels"])
    return {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params}


def original_config(parts: LatentDiffusionParts) -> dict[str, Any]:
    """The original CompVis yaml (``LatentDiffusion``) of the model, as SD's v1/v2 inference yamls."""
    _check_prediction(parts, "CompVis")
    unet = parts.unet
    unet_config = _original_backbone(parts)
    context_dim = unet.get("context_dim") if parts.dit else unet["transformer"].get("context_dim")
    params: dict[str, Any] = {"timesteps": parts.schedule.get("num_train_timesteps", 1000)}
    kind = parts.schedule.get("kind", "linear")
    if kind in COMPVIS_SCHEDULE and not parts.schedule.get("zero_terminal_snr"):
        params["beta_schedule"] = COMPVIS_SCHEDULE[kind]
        if kind != "cosine":
            betas = _betas(parts)
            params.update(linear_start=_tidy(betas[0]), linear_end=_tidy(betas[-1]))
    else:  # no CompVis name for it: LatentDiffusion takes the betas themselves
        params["given_betas"] = _betas(parts).tolist()
    embedders = _embedders(parts)
    concat = unet["in_channels"] > parts.embed_dim
    context = context_dim is not None and any(e.get("output", "context") != "vector" for e in embedders)
    adm = unet.get("num_classes") is not None or unet.get("adm_in_channels") is not None
    keys = {(True, True): "hybrid", (True, False): "crossattn", (False, True): "concat", (False, False): None}
    conditioning_key = keys[(context, concat)]
    if adm:
        conditioning_key = "crossattn-adm" if conditioning_key == "crossattn" else conditioning_key or "adm"
    params.update(
        parameterization=parts.prediction, first_stage_key="image",
        cond_stage_key=embedders[0].get("input_key") if embedders else None, image_size=parts.latent_size,
        channels=parts.embed_dim, cond_stage_trainable=bool(_learned(parts)),
        conditioning_key=conditioning_key, scale_factor=parts.scale_factor, use_ema=False,
        unet_config=unet_config,
        first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": parts.embed_dim, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {**asdict(parts.ddconfig), "ch_mult": list(parts.ddconfig.ch_mult),
                         "attn_resolutions": list(parts.ddconfig.attn_resolutions)}}},
        # our conditioner in CompVis' target/params form; frozen encoders are named, not shipped
        cond_stage_config=_target_params(parts.conditioner) if embedders else "__is_unconditional__",
    )
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def write_compvis(parts: LatentDiffusionParts, path: Path, yaml_path: Path | None = None) -> tuple[Path, Path]:
    if path.suffix != ".safetensors":
        raise ExportError(f"--compvis must name a .safetensors file, got {path}")
    yaml_path = yaml_path or path.with_suffix(".yaml")
    yaml_text = OmegaConf.to_yaml(OmegaConf.create(original_config(parts)))  # fails before anything is written
    save_tensors_atomic(path, text_encoder.compvis_tensors(parts.tensors, _text_to_image(parts)))
    write_text_atomic(yaml_path, yaml_text)
    return path, yaml_path


# ---------------------------------------------------------------------------------------------------
# diffusers


def scheduler_config(parts: LatentDiffusionParts) -> dict[str, Any]:
    """DDIMScheduler config with exactly our betas (by name where diffusers has it, else listed)."""
    _check_prediction(parts, "diffusers")
    kind, schedule = parts.schedule.get("kind", "linear"), parts.schedule
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(schedule.get("num_train_timesteps", 1000)),
        "prediction_type": DIFFUSERS_PREDICTION[parts.prediction], "clip_sample": False,
        # our samplers step to the clean sample after the last timestep: alphas_cumprod = 1
        "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": parts.timestep_spacing,
        "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr")), "trained_betas": None,
    }
    betas = NoiseSchedule(kind, config["num_train_timesteps"], schedule.get("beta_start"), schedule.get("beta_end")).betas
    if kind in ("linear", "scaled_linear"):
        config.update(beta_schedule=kind, beta_start=_tidy(betas[0]), beta_end=_tidy(betas[-1]))
    elif kind == "cosine":
        config["beta_schedule"] = "squaredcos_cap_v2"  # Nichol & Dhariwal's, as ours
    else:
        config.update(beta_schedule="linear", trained_betas=betas.tolist())
    return config


def _learned(parts: LatentDiffusionParts) -> dict[str, torch.Tensor]:
    """Learned conditioner parts (class embeddings), without a fine-tuned text tower (shipped as an encoder)."""
    return {k: v for k, v in strip_prefix(parts.tensors, COND_STAGE_PREFIX).items()
            if not (COND_STAGE_PREFIX + k).startswith(text_encoder.TUNED_PREFIX)}


def _text_to_image(parts: LatentDiffusionParts) -> dict[str, Any] | None:
    """The text embedder of a model StableDiffusionPipeline runs (text context alone, no concat, no classes)."""
    embedder = text_encoder.text_embedder(_embedders(parts))
    if embedder is None or parts.dit or parts.unet["in_channels"] != parts.embed_dim or parts.unet.get("num_classes") is not None:
        return None
    return embedder


def conditioner_reference(parts: LatentDiffusionParts, shipped: bool = False) -> dict[str, Any]:
    """Which encoders the UNet's context comes from: ``text_encoder`` (+ ``tokenizer``) of the folder itself when
    ``shipped``, else a referenced path or hub id."""
    references, conditioner = [], json.loads(json.dumps(parts.conditioner))
    for embedder in conditioner.get("embedders") or []:
        if embedder.get("_target_") == TEXT_ENCODER_TARGET:
            if shipped:  # the base encoder is no longer what the context comes from
                embedder["pretrained"] = "text_encoder"
            references.append({k: embedder.get(k) for k in ("pretrained", "max_length", "layer", "input_key")})
            if shipped:
                references[-1]["tokenizer"] = "tokenizer"
    return {"text_encoders": references, "conditioner": conditioner,
            "learned_weights": "conditioner.safetensors" if _learned(parts) else None}


def _diffusers_backbone(parts: LatentDiffusionParts) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """({part: folder name, config: its config.json}, its weights) of the UNet or DiT."""
    state = strip_prefix(parts.tensors, UNET_PREFIX)
    if parts.dit:  # DiTPipeline: CFG with its hard-coded null class 1000 only fits a 1000-class (ImageNet) DiT
        return ({"part": "transformer", "config": dit_to_diffusers_config(parts.unet)},
                dit_to_diffusers_state_dict(state, parts.unet))
    return ({"part": "unet", "config": unet_to_diffusers_config(parts.unet, parts.latent_size)},
            unet_to_diffusers(state, parts.unet))


def model_index(parts: LatentDiffusionParts, text_parts: dict[str, list[str]] | None) -> dict[str, Any]:
    if parts.dit:
        return {"_class_name": "DiTPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "DDIMScheduler"]}
    index: dict[str, Any] = {"_diffusers_version": DIFFUSERS_VERSION, "vae": ["diffusers", "AutoencoderKL"],
                             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if _text_to_image(parts) is not None:
        # StableDiffusionPipeline.from_pretrained(folder); without a shipped encoder (a hub id the export only
        # references) the caller passes text_encoder= and tokenizer=
        index.update(_class_name="StableDiffusionPipeline", text_encoder=[None, None], tokenizer=[None, None],
                     safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        index.update(text_parts or {})
    return index


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_diffusers(parts: LatentDiffusionParts, folder: Path, overwrite: bool = False) -> Path:
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} exists; pass --overwrite to replace it")
    # Everything is converted before the first byte is written, so an inexpressible model leaves no trace.
    backbone, backbone_state = _diffusers_backbone(parts)
    vae_state = autoencoder_to_diffusers(strip_prefix(parts.tensors, FIRST_STAGE_PREFIX), parts.ddconfig, parts.embed_dim)
    vae_config = autoencoder_to_diffusers_config(parts.ddconfig, parts.embed_dim, parts.scale_factor,
                                                 parts.latent_size * 2 ** (len(parts.ddconfig.ch_mult) - 1))
    embedder = _text_to_image(parts)
    shipped = text_encoder.shipped_encoder(embedder, parts.tensors) if embedder is not None else None
    if shipped is None and text_encoder.tuned_tower(parts.tensors):
        raise ExportError("the text encoder was fine-tuned, but this model has no diffusers pipeline form "
                          "(StableDiffusionPipeline: one text encoder, no class or concat conditioning)")
    reference = conditioner_reference(parts, shipped is not None)
    files: dict[str, dict[str, Any]] = {
        "vae/config.json": {**vae_config, "_diffusers_version": DIFFUSERS_VERSION},
        f"{backbone['part']}/config.json": {**backbone["config"], "_diffusers_version": DIFFUSERS_VERSION},
        "scheduler/scheduler_config.json": scheduler_config(parts), "conditioner.json": reference,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_tensors_atomic(staging / "vae" / "diffusion_pytorch_model.safetensors", vae_state)
        save_tensors_atomic(staging / backbone["part"] / "diffusion_pytorch_model.safetensors", backbone_state)
        if reference["learned_weights"]:
            save_tensors_atomic(staging / "conditioner.safetensors", _learned(parts))
        text_parts = text_encoder.write_pipeline_parts(shipped, staging) if shipped is not None else None
        for name, data in files.items():
            _write_json(staging / name, data)
        _write_json(staging / "model_index.json", model_index(parts, text_parts))
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _swap_in(staging: Path, folder: Path) -> None:
    """Rename the finished folder into place; an old one is moved aside first and removed after."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(staging, folder)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm-export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path, help="stage-2 export folder (what `ldm-train stage=ldm` prints)")
    parser.add_argument("--compvis", type=Path, help="CompVis single file to write (.safetensors)")
    parser.add_argument("--compvis-yaml", type=Path, help="its original-style yaml (default: beside it, .yaml)")
    parser.add_argument("--diffusers", type=Path, help="diffusers folder to write")
    parser.add_argument("--text-encoder", help="path or hub id to reference for the frozen text encoder "
                                               "(default: the one the model was trained with)")
    parser.add_argument("--lora", type=Path, help="folder for the LoRA adapters of a finetune=lora run, in the layout "
                                              "diffusers' load_lora_weights / load_lora_adapter read")
    parser.add_argument("--merge", action="store_true", help="a finetune=lora export: write the merged model with "
                                                             "--diffusers / --compvis (required for it)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compvis is None and args.diffusers is None and args.lora is None:
        parser.error("nothing to do: give --compvis FILE.safetensors, --diffusers FOLDER and/or --lora FOLDER")
    try:
        if read_adapter(args.export) is not None and not args.merge and (args.compvis or args.diffusers):
            raise ExportError(f"{args.export} is a LoRA fine-tune: pass --merge to write the merged model with "
                              "--diffusers/--compvis, or --lora FOLDER to write the adapters alone")
        if args.compvis is not None and not args.overwrite:
            for path in (args.compvis, args.compvis_yaml or args.compvis.with_suffix(".yaml")):
                if path.exists():
                    raise ExportError(f"{path} exists; pass --overwrite to replace it")
        parts = read_parts(args.export)
        if args.text_encoder is not None:
            for embedder in _embedders(parts):
                if embedder.get("_target_") == TEXT_ENCODER_TARGET:
                    embedder["pretrained"] = args.text_encoder
        if args.compvis is not None:
            weights, yaml_path = write_compvis(parts, args.compvis, args.compvis_yaml)
            print(f"CompVis single file: {weights}\n  original config: {yaml_path}")
        if args.diffusers is not None:
            print(f"diffusers folder: {write_diffusers(parts, args.diffusers, args.overwrite)}")
        if args.lora is not None:
            print(f"LoRA adapters (diffusers layout): {write_diffusers_lora(args.export, args.lora, parts.unet, args.overwrite)}")
    except ValueError as err:  # ExportError / ConversionError / bad schedule: a message, not a traceback
        print(f"ldm-export: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
