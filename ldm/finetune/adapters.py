"""LoRA adapters of a fine-tuned run: split from its export, stored beside it, and written for diffusers.

A LoRA run's export folder holds the *merged* model in ``model.safetensors`` (so ``ldm-sample``,
``ldm-evaluate`` and ``ldm-export --merge --diffusers/--compvis`` read it like any export) and the adapters
alone in ``lora/adapter.safetensors`` (our module paths: ``unet.<CompVis path>.lora_A.weight``,
``text_encoder.<path>.lora_B.weight``) with ``lora/adapter.json`` (rank, alpha, targets, base model).

``ldm-export --lora OUT`` renames them to diffusers/peft's layout (``unet.down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.lora_A.weight``) in ``OUT/pytorch_lora_weights.safetensors``, which
``StableDiffusionPipeline.load_lora_weights`` and ``UNet2DConditionModel.load_lora_adapter`` read. The scale
alpha / r is folded into B, so the file means the same whatever alpha a loader assumes (diffusers takes
alpha = r when a peft-format file states none).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.finetune.lora import lora_pairs, merge_lora_state
from ldm.io.convert import unet_key_map
from ldm.io.convert.clip import is_clip_text, to_transformers4
from ldm.io.export import ExportError, save_tensors_atomic, write_text_atomic

ADAPTER_DIR = "lora"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
UNET = "model.diffusion_model."
COND = "cond_stage_model."


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def split_lora_export(
    tensors: Mapping[str, torch.Tensor], unet_scale: float | None, text_scale: float | None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(export tensors with every adapter merged, the adapters alone).

    ``tensors``: what ``export_tensors`` gives for a LoRA run (EMA where averaged, gathered from FSDP shards):
    peft names inside ``model.diffusion_model.*``, and inside ``cond_stage_model.*`` every embedder that trains,
    whole: a text encoder's base and adapters, merged here and shipped whole (it differs from the referenced
    pretrained encoder now)."""
    out = {k: v for k, v in tensors.items() if not k.startswith((UNET, COND))}
    adapters: dict[str, torch.Tensor] = {}
    unet = _strip(tensors, UNET)
    if unet_scale is not None:
        adapters.update({f"unet.{m}.lora_{ab}.weight": w for m, pair in lora_pairs(unet).items()
                         for ab, w in zip("AB", pair)})
        unet = merge_lora_state(unet, unet_scale)
    out.update({UNET + k: v for k, v in unet.items()})
    cond = _strip(tensors, COND)
    if text_scale is not None:
        lora = lora_pairs(cond)
        adapters.update({f"text_encoder.{m}.lora_{ab}.weight": w for m, pair in lora.items() for ab, w in zip("AB", pair)})
        cond = merge_lora_state(cond, text_scale)
    out.update({COND + k: v for k, v in cond.items()})
    leftover = [k for k in out if ".lora_" in k or ".base_layer." in k]
    if leftover:
        raise ExportError(f"LoRA tensors left after merging (no LoRA scale given for them?): {leftover[:4]}")
    return out, adapters


def write_adapter(folder: str | Path, adapters: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> Path:
    folder = Path(folder) / ADAPTER_DIR
    save_tensors_atomic(folder / ADAPTER_WEIGHTS, dict(adapters))
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter(export: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    folder = Path(export) / ADAPTER_DIR
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return None
    return load_file(str(folder / ADAPTER_WEIGHTS)), json.loads((folder / ADAPTER_CONFIG).read_text())


def diffusers_lora_state(adapters: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                         unet_kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our adapters -> diffusers/peft names (``unet.<diffusers module>.lora_A.weight``), alpha / r folded into B."""
    names = unet_key_map(unet_kwargs)  # "<our module>.weight" -> "<diffusers module>.weight"
    text_modules = [k.split(".transformer.", 1)[1] for k in adapters if k.startswith("text_encoder.")]
    clip = is_clip_text(text_modules)
    out: dict[str, torch.Tensor] = {}
    scales = {"unet": info.get("unet_scale"), "text_encoder": info.get("text_encoder_scale")}
    for key, value in adapters.items():
        part, _, rest = key.partition(".")
        module, _, leaf = rest.rpartition(".lora_")  # leaf: "A.weight" / "B.weight"
        if part == "unet":
            if f"{module}.weight" not in names:
                raise ExportError(f"adapter on UNet module {module!r} has no diffusers counterpart")
            target = names[f"{module}.weight"].removesuffix(".weight")
        else:
            target = module.split(".transformer.", 1)[1]  # the text model's own module path
            if clip:  # transformers 5 names it without text_model.; SD pipelines' files (transformers 4) with it
                target = next(iter(to_transformers4({target: None})))
        scale = scales[part] if leaf.startswith("B") else 1.0
        out[f"{part}.{target}.lora_{leaf}"] = (value.double() * float(scale)).to(value.dtype) if scale != 1.0 else value
    return out


def write_diffusers_lora(export: str | Path, out: str | Path, unet_kwargs: Mapping[str, Any],
                         overwrite: bool = False) -> Path:
    found = read_adapter(export)
    if found is None:
        raise ExportError(f"{export} holds no LoRA adapter ({ADAPTER_DIR}/{ADAPTER_WEIGHTS}): it is not the export "
                          "of a finetune=lora run")
    adapters, info = found
    path = Path(out) / DIFFUSERS_LORA_WEIGHTS
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass --overwrite to replace it")
    # text_encoder.* keys: the encoder's module paths, a CLIP tower's in the transformers-4 layout SD pipelines load
    save_tensors_atomic(path, diffusers_lora_state(adapters, info, unet_kwargs))
    return path
