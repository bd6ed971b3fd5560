"""The text encoder of a text-to-image export, shipped inside it in the layouts pipelines load.

A stage-2 export names its frozen text encoder (``pretrained``: a folder or hub id) and carries its weights only
when they were fine-tuned (``finetune.train_text_encoder``: the merged tower under
``cond_stage_model.embedders.0.transformer.*``, named as the installed transformers names it). ``ldm-export``
ships it: ``--diffusers`` as ``text_encoder/`` + ``tokenizer/`` (so ``StableDiffusionPipeline.from_pretrained``
needs nothing else), ``--compvis`` as SD-1.x's ``cond_stage_model.transformer.text_model.*``. Config and
tokenizer always come from the referenced encoder, the weights from the export where it has them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.io.compvis import COND_STAGE_PREFIX, strip_prefix
from ldm.io.convert.clip import drop_last_layer, is_clip_text, layer_count, to_transformers4
from ldm.io.export import ExportError, save_tensors_atomic, write_text_atomic

TEXT_ENCODER_TARGET = "ldm.nets.conditioners.FrozenTextEncoder"
TUNED_PREFIX = COND_STAGE_PREFIX + "embedders.0.transformer."  # the single text embedder's tower in an export
COMPVIS_TOWER_PREFIX = COND_STAGE_PREFIX + "transformer."  # SD-1.x: FrozenCLIPEmbedder.transformer
ENCODER_CLASSES = {"clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "t5": "T5EncoderModel"}


def text_embedder(embedders: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The embedder of a text-only conditioner (one FrozenTextEncoder), else None."""
    if len(embedders) == 1 and embedders[0].get("_target_") == TEXT_ENCODER_TARGET:
        return embedders[0]
    return None


def tuned_tower(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fine-tuned text tower an export carries (empty when the encoder stayed frozen)."""
    return strip_prefix(tensors, TUNED_PREFIX)


@dataclass
class ShippedEncoder:
    state: dict[str, torch.Tensor]  # a CLIP tower in transformers 4's nested layout
    config: dict[str, Any]  # config.json
    tokenizer: Any  # a transformers tokenizer, model_max_length = the embedder's max_length
    model_class: str  # the transformers class diffusers instantiates
    fine_tuned: bool


def shipped_encoder(embedder: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ShippedEncoder | None:
    """The encoder to ship, or None when the export has none to ship: its encoder is frozen and ``pretrained``
    is no local folder (a hub id stays a reference). A fine-tuned encoder needs its base's folder for config and
    tokenizer."""
    pretrained, tuned = str(embedder.get("pretrained")), tuned_tower(tensors)
    if not Path(pretrained).is_dir():
        if tuned:
            raise ExportError(f"the text encoder was fine-tuned; its config and tokenizer come from the base encoder "
                              f"{pretrained}, which is not a local folder: pass --text-encoder <its folder>")
        return None
    import transformers

    config = transformers.AutoConfig.from_pretrained(pretrained, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained, local_files_only=True)
    tokenizer.model_max_length = int(embedder.get("max_length", 77))  # pipelines pad prompts to it, as we do
    model_class = _model_class(config)
    state = dict(tuned) if tuned else _frozen_state(pretrained, model_class)
    config_dict = config.to_dict()
    config_dict["architectures"] = [model_class]
    if is_clip_text(state):
        state = to_transformers4(state)
        if embedder.get("layer", "last") == "penultimate":
            state = drop_last_layer(state)
            config_dict["num_hidden_layers"] = layer_count(state)
    elif embedder.get("layer", "last") == "penultimate":
        raise ExportError(f"layer=penultimate of a {config.model_type} text encoder has no pipeline form (CLIP's has)")
    state.pop("text_model.embeddings.position_ids", None)  # a buffer, rebuilt by transformers
    return ShippedEncoder(state, config_dict, tokenizer, model_class, bool(tuned))


def write_pipeline_parts(encoder: ShippedEncoder, folder: Path) -> dict[str, list[str]]:
    """Write ``text_encoder/`` and ``tokenizer/`` under ``folder``; their model_index.json entries."""
    save_tensors_atomic(folder / "text_encoder" / "model.safetensors", encoder.state)
    write_text_atomic(folder / "text_encoder" / "config.json", json.dumps(encoder.config, indent=2, sort_keys=True) + "\n")
    encoder.tokenizer.save_pretrained(str(folder / "tokenizer"))
    return {"text_encoder": ["transformers", encoder.model_class],
            "tokenizer": ["transformers", type(encoder.tokenizer).__name__]}


def _model_class(config: Any) -> str:
    return ENCODER_CLASSES.get(config.model_type) or (config.architectures or ["AutoModel"])[0]


def _frozen_state(pretrained: str, model_class: str) -> dict[str, torch.Tensor]:
    import transformers

    return getattr(transformers, model_class).from_pretrained(pretrained, local_files_only=True).state_dict()


def frozen_clip_tower(embedder: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The whole CLIP tower of a frozen text embedder whose ``pretrained`` is a local folder (empty otherwise: a
    hub id stays a reference, another encoder has no SD-1.x place). Whole: a single-file loader applies CLIP skip
    (``layer=penultimate``) itself."""
    if embedder is None or not Path(str(embedder.get("pretrained"))).is_dir():
        return {}
    import transformers

    pretrained = str(embedder.get("pretrained"))
    config = transformers.AutoConfig.from_pretrained(pretrained, local_files_only=True)
    if _model_class(config) != "CLIPTextModel":
        return {}
    return _frozen_state(pretrained, "CLIPTextModel")


def compvis_tensors(tensors: Mapping[str, torch.Tensor],
                    embedder: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The export's tensors with its CLIP tower under SD-1.x's ``cond_stage_model.transformer.text_model.*`` (other
    towers keep our names): the fine-tuned one it carries, or else the frozen one ``embedder`` (the text embedder
    of a text-to-image model) names by a local folder, so that single-file loaders (A1111, ComfyUI, diffusers'
    ``from_single_file``) find the text encoder in the file as in SD-1.x's own checkpoints."""
    tower = tuned_tower(tensors) or frozen_clip_tower(embedder)
    if not tower or not is_clip_text(tower):
        return dict(tensors)
    out = {k: v for k, v in tensors.items() if not k.startswith(TUNED_PREFIX)}
    out.update({COMPVIS_TOWER_PREFIX + k: v for k, v in to_transformers4(tower).items()})
    return out
