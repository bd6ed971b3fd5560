"""CLIP text-model key names in the layout files are exchanged in, whatever transformers is installed.

transformers 4 nests the CLIP text tower under ``text_model.`` (``text_model.encoder.layers.0.self_attn.q_proj``);
SD-1.x single files (``cond_stage_model.transformer.text_model.*``), diffusers pipelines' ``text_encoder/`` and
their LoRA files (``text_encoder.text_model.encoder.layers...``) all use that layout. transformers 5 flattened the
tower (``encoder.layers...``) in memory but still reads the nested layout. So every file written here uses the
nested one; a model's own ``state_dict`` names go through ``to_transformers4`` first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")
TOWER = "text_model."
_TOWER_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")
# CLIP's layers are encoder.layers.<i>.self_attn; BERT's encoder.layer.<i>.attention, T5's encoder.block.<i>
_CLIP_LAYER = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn|mlp|layer_norm[12])\.")


def is_clip_text(names: Iterable[str]) -> bool:
    """Whether module or tensor names (relative to the text model) are a CLIP text tower's."""
    return any(_CLIP_LAYER.match(n) for n in names)


def to_transformers4(state: Mapping[str, V]) -> dict[str, V]:
    """A CLIP text model's names (either layout) in transformers 4's nested one; other keys (the projection
    of ``CLIPTextModelWithProjection``) stay as they are."""
    return {(TOWER + k if k.startswith(_TOWER_CHILDREN) else k): v for k, v in state.items()}


def layer_count(names: Iterable[str]) -> int:
    """Number of transformer layers of a CLIP text tower, from its names (either layout)."""
    found = {int(m.group(1)) for n in names if (m := re.match(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def drop_last_layer(state: Mapping[str, V]) -> dict[str, V]:
    """The tower without its last layer: its ``last_hidden_state`` (the final LayerNorm applied) is then the full
    tower's penultimate hidden state through that LayerNorm, i.e. ``layer: penultimate`` (SD-2.x, clip_skip 1)."""
    last = layer_count(state) - 1
    pattern = re.compile(rf"^(?:text_model\.)?encoder\.layers\.{last}\.")
    return {k: v for k, v in state.items() if not pattern.match(k)}
