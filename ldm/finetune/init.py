"""``init=compvis|diffusers|export|dit``: stage 2 starts from a pretrained model instead of random weights.

``InitSpec`` is the config node. ``derived_nodes`` reads, from the source, the Hydra nodes that must follow it
(backbone config, first stage, conditioner, schedule, prediction type); ``load_backbone`` loads the UNet's
weights into the configured backbone, failing on the first key whose shape differs (both shapes named), and
``init_report`` lists every tensor of the source with where it went or why it was skipped. ``init=dit`` (an
official DiT checkpoint, ldm.finetune.official_dit) holds the transformer only: the run's schedule, objective,
first stage and labels are checked against it, never replaced.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from ldm.finetune import official_dit
from ldm.finetune import source as src
from ldm.finetune.text_encoder import context_dim, text_encoder_folder
from ldm.io.compvis import FIRST_STAGE_PREFIX, UNET_PREFIX
from ldm.io.export import frozen, load_state_strict, read_export, write_text_atomic
from ldm.model import FirstStage

log = logging.getLogger("ldm.finetune")
UNET_TARGET = "ldm.nets.unet.UNetModel"


@dataclass
class InitSpec:
    """Where stage 2 starts from.

    format: none (random initialisation: nothing is loaded), compvis (single file), diffusers (pipeline folder or
        hub id), export (an ldm-train stage-2 export) or dit (a facebookresearch/DiT checkpoint).
    derive_config: the backbone config is read from the source (true), or model/ldm must match it (false).
    first_stage / conditioner: also take the autoencoder / text encoder from the source (else the configured ones).
    use_ema: a CompVis file's model_ema.* copy of the UNet instead of model.diffusion_model.*; a DiT train.py
        checkpoint's "ema" copy instead of "model".
    original_config: the CompVis yaml of a single file (architecture, schedule and prediction type).
    prediction: eps | v | x0 where the source does not state it (a single file without its yaml); checked otherwise.
    tokenizer: the tokenizer folder of a single file's CLIP text encoder (a single file carries none).
    text_encoder: a Hugging Face folder (model + tokenizer) used instead of the source's text encoder.
    """

    format: str
    path: str | None = None
    derive_config: bool = True
    first_stage: bool = True
    conditioner: bool = True
    use_ema: bool = False
    original_config: str | None = None
    prediction: str | None = None
    tokenizer: str | None = None
    text_encoder: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("none", *src.FORMATS):
            raise src.InitError(f"init.format={self.format!r} is not one of {('none', *src.FORMATS)}")
        if self.use_ema and self.format not in ("compvis", "dit"):
            raise src.InitError("init.use_ema reads a CompVis file's model_ema.* copy (or a DiT checkpoint's 'ema'): "
                                "only with init=compvis or init=dit")
        if self.format == "dit" and (self.first_stage or self.conditioner):
            raise src.InitError("an official DiT checkpoint holds the transformer only; its first stage and labels "
                                "come from first_stage= and cond=: set init.first_stage=false init.conditioner=false")

    @property
    def loads(self) -> bool:
        return self.format != "none"

    @property
    def local(self) -> Path:
        return src.local_path(self.path, self.format)


# ---------------------------------------------------------------------------------------------------
# config nodes that follow the source


def derived_nodes(spec: InitSpec, cache_dir: str, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """{config key: node} for what the source decides: ``backbone`` (UNetModel kwargs), ``schedule``,
    ``prediction``, and where asked ``first_stage`` and ``conditioner`` (+ ``context_dim``)."""
    path = spec.local
    if spec.format == "dit":
        src.check_kind(path, spec.format)
        dit = official_dit.describe(path, spec.use_ema)
        nodes = {"schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule", **official_dit.SCHEDULE},
                 "prediction": official_dit.PREDICTION, "dit": dit}
        if spec.derive_config:
            nodes["backbone"] = official_dit.backbone_node(dit, gradient_checkpointing)
        return nodes
    kwargs = src.unet_kwargs(path, spec.format, spec.original_config)
    schedule, prediction = src.schedule_and_prediction(path, spec.format, spec.original_config, spec.prediction)
    nodes: dict[str, Any] = {
        "backbone": {"_target_": UNET_TARGET, "dropout": 0.0, **kwargs,
                     "gradient_checkpointing": bool(gradient_checkpointing)},
        "schedule": {"_target_": "ldm.diffusion.schedules.NoiseSchedule", **schedule},
        "prediction": prediction,
    }
    if spec.first_stage:
        if spec.format == "export":
            nodes["first_stage"] = {"_target_": "ldm.finetune.init.export_first_stage", "path": str(path)}
        else:
            nodes["first_stage"] = {"_target_": "ldm.io.first_stage.pretrained_first_stage",
                                    "path": str(path), "latent_channels": int(kwargs["out_channels"]),
                                    "scale_factor": None, "original_config": spec.original_config}
    if spec.conditioner:
        if spec.format == "export":
            _, config, _ = read_export(path, kind="ldm")
            nodes["conditioner"] = OmegaConf.to_container(config.conditioner, resolve=True)
        else:
            folder = text_encoder_folder(str(path), spec.format, spec.tokenizer, spec.text_encoder, cache_dir)
            max_positions = OmegaConf.load(Path(folder) / "config.json").get("max_position_embeddings", 77)
            nodes["conditioner"] = {"_target_": "ldm.nets.conditioners.Conditioner", "embedders": [{
                "_target_": "ldm.nets.conditioners.FrozenTextEncoder", "pretrained": folder,
                "max_length": int(min(77, max_positions)), "layer": "last", "freeze": True, "input_key": "caption",
                "embedding_cache_size": 0}]}
            nodes["context_dim"] = context_dim(str(path), spec.format, spec.text_encoder)
    return nodes


def export_first_stage(path: str, latent_channels: int | None = None, scale_factor: float | None = None,
                       sample_posterior: bool = True) -> FirstStage:
    """The frozen first stage held inside a stage-2 export (``first_stage_model.*`` + its config and scale)."""
    tensors, config, _ = read_export(path, kind="ldm")
    autoencoder = instantiate(config.autoencoder)
    load_state_strict(autoencoder, src.strip_prefix(tensors, FIRST_STAGE_PREFIX), f"{path} (first stage)")
    if latent_channels is not None and int(latent_channels) != int(autoencoder.embed_dim):
        raise src.InitError(f"first_stage.latent_channels={latent_channels} but the export at {path} has "
                            f"{autoencoder.embed_dim} latent channels")
    scale = float(tensors["scale_factor"]) if scale_factor is None else float(scale_factor)
    return FirstStage(frozen(autoencoder), scale, sample_posterior)


# ---------------------------------------------------------------------------------------------------
# weights


def first_mismatch(model: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """The first key (in the model's order) that is missing or has another shape, with both shapes; else an
    unexpected key; None when everything fits."""
    for key, value in model.items():
        if key not in given:
            return f"{key}: missing from the checkpoint (model {tuple(value.shape)})"
        if tuple(given[key].shape) != tuple(value.shape):
            return f"{key}: checkpoint {tuple(given[key].shape)} vs model {tuple(value.shape)}"
    extra = [k for k in given if k not in model]
    return f"{extra[0]}: in the checkpoint, not in the model ({len(extra)} such keys)" if extra else None


def backbone_state(spec: InitSpec, backbone: nn.Module) -> dict[str, torch.Tensor]:
    path = spec.local
    kwargs = src.unet_kwargs(path, spec.format, spec.original_config)
    state, _ = src.unet_state(path, spec.format, kwargs)
    if spec.use_ema:
        tensors = src.compvis_tensors(path)
        flat = {k: "model_ema." + f"diffusion_model.{k}".replace(".", "") for k in state}
        absent = [v for v in flat.values() if v not in tensors]
        if absent:
            raise src.InitError(f"{path} has no complete model_ema.* copy ({len(absent)} missing, e.g. {absent[:2]})")
        state = {k: tensors[v] for k, v in flat.items()}
    return state


def load_backbone(backbone: nn.Module, spec: InitSpec) -> nn.Module:
    """Load the source's UNet (or DiT) into ``backbone``; the first mismatch names the key and both shapes."""
    state = official_dit.load(backbone, spec.local, spec.use_ema) if spec.format == "dit" else backbone_state(spec, backbone)
    problem = first_mismatch(backbone.state_dict(), state)
    if problem is not None:
        how = ("the configured model/ldm (init.derive_config=false) is another architecture: drop "
               "init.derive_config=false, or pick the model/ldm of this checkpoint" if not spec.derive_config else
               "the weights do not fit the config derived from the same source: is it a UNetModel checkpoint?")
        raise src.InitError(f"init.path={spec.path} does not fit the backbone; first mismatch {problem}; {how}")
    backbone.load_state_dict(state, strict=True)
    return backbone


# ---------------------------------------------------------------------------------------------------
# the report


def _source_tensors(spec: InitSpec) -> list[tuple[str, tuple[int, ...]]]:
    path = spec.local
    if spec.format == "dit":
        return sorted(official_dit.describe(path, spec.use_ema).shapes.items())
    if spec.format == "compvis":
        return sorted(src.compvis_shapes(path).items())
    if spec.format == "export":
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return sorted((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
    rows = []
    for part in ("unet", "vae", "text_encoder"):
        for file in sorted((path / part).glob("*.safetensors")) if (path / part).is_dir() else []:
            with safe_open(str(file), framework="pt") as f:
                rows += [(f"{part}/{k}", tuple(f.get_slice(k).get_shape())) for k in f.keys()]
    return sorted(rows)


def _destination(spec: InitSpec, key: str) -> str:
    if spec.format == "dit":
        return _dit_destination(spec, key)
    unet = "model.diffusion_model." if spec.format != "diffusers" else "unet/"
    ema = spec.use_ema and key.startswith("model_ema.") and key != "model_ema.num_updates"
    if (key.startswith(unet) and not spec.use_ema) or ema:
        return "backbone"
    if key.startswith((FIRST_STAGE_PREFIX, "vae/", "scale_factor")):
        return "first_stage" if spec.first_stage else "skipped: init.first_stage=false"
    if key.startswith(("cond_stage_model.", "text_encoder/")):
        if spec.conditioner and spec.text_encoder in (None, "", "null"):
            return "conditioner"
        return "skipped: init.conditioner=false or init.text_encoder given"
    if key.startswith(UNET_PREFIX) or key.startswith("model_ema."):
        return "skipped: the other UNet copy (init.use_ema)"
    if key in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
               "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod"):
        return "skipped: schedule buffer (the schedule config is derived instead)"
    return "skipped: not part of a latent diffusion model we build"


def _dit_destination(spec: InitSpec, key: str) -> str:
    copy = official_dit.describe(spec.local, spec.use_ema).copy
    if copy == "state dict" or key.startswith(copy + "."):
        return "backbone"
    if key.startswith(("ema.", "model.")):
        return "skipped: the other copy (init.use_ema)"
    return "skipped: optimizer state" if key.startswith("opt.") else "skipped: not part of the DiT"


def init_report(spec: InitSpec, out: str | Path | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor of the source with its destination; logged as a table per destination, and written as a
    TSV (one line per tensor) to ``out`` when given."""
    rows = [(key, shape, _destination(spec, key)) for key, shape in _source_tensors(spec)]
    counts, sizes = Counter(), Counter()
    for _, shape, where in rows:
        counts[where] += 1
        sizes[where] += int(torch.Size(shape).numel())
    width = max(len(w) for w in counts) if counts else 10
    lines = [f"init: {spec.path} ({spec.format}), {len(rows)} tensors", f"  {'destination':<{width}}  tensors  parameters"]
    lines += [f"  {w:<{width}}  {counts[w]:>7}  {sizes[w]:>10,}" for w in sorted(counts)]
    log.info("\n".join(lines))
    if out is not None:
        text = "key\tshape\tdestination\n" + "".join(f"{k}\t{list(s)}\t{w}\n" for k, s, w in rows)
        write_text_atomic(out, text)
    return rows
