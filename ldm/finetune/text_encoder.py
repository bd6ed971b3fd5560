"""The text encoder of a pretrained source as a ``from_pretrained`` folder that ``FrozenTextEncoder`` loads.

``FrozenTextEncoder`` (ldm.nets.conditioners) reads model and tokenizer from one folder. A diffusers pipeline
keeps them in two (``text_encoder/``, ``tokenizer/``), and an SD-1.x single file holds only the CLIP weights
(``cond_stage_model.transformer.*``) with neither config nor tokenizer. Both are assembled once into
``<cache_dir>/init/<source fingerprint>/text_encoder`` (links for diffusers; config + weights + the given
tokenizer for a single file), written atomically so that concurrent ranks agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ldm.finetune.source import (
    CLIP_PREFIX,
    InitError,
    compvis_shapes,
    compvis_tensors,
    diffusers_config,
    local_path,
    text_encoder_kind,
)

# What shapes do not show of a CLIP text model; the values of CLIP ViT-L/14, SD-1.x's text encoder.
CLIP_HEAD_CHANNELS = 64
CLIP_ACTIVATION = "quick_gelu"


def _fingerprint(path: Path, *extra: object) -> str:
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_mtime_ns, stat.st_size, *map(str, extra)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _publish(build, target: Path) -> Path:
    """Build a folder beside ``target`` and rename it into place; a folder another rank published first wins."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        try:
            os.replace(staging, target)
        except OSError:  # published meanwhile by another process: same content
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def text_encoder_folder(path: str, fmt: str, tokenizer: str | None, text_encoder: str | None, cache_dir: str) -> str:
    """The folder ``FrozenTextEncoder(pretrained=...)`` loads for this source.

    text_encoder: an explicit Hugging Face folder (model + tokenizer), used as it is; it wins over the source's.
    tokenizer: the tokenizer folder for a single file, which carries none (CLIP ViT-L/14's for SD-1.x).
    """
    if text_encoder not in (None, "", "None", "null"):
        if not Path(str(text_encoder)).is_dir():
            raise InitError(f"init.text_encoder={text_encoder} is not a folder (a Hugging Face model + tokenizer)")
        return str(text_encoder)
    source = local_path(path, fmt)
    kind = text_encoder_kind(source, fmt)
    target = Path(cache_dir) / "init" / _fingerprint(source, tokenizer) / "text_encoder"
    if fmt == "diffusers":
        if kind is None:
            return _referenced_encoder(source)
        return str(_publish(lambda d: _link_diffusers(source, d), target))
    if kind == "open_clip":
        raise InitError(
            f"{source} holds an OpenCLIP text encoder (SD-2.x, cond_stage_model.model.*), which is not converted: "
            "set init.text_encoder=<folder with its Hugging Face CLIPTextModel and tokenizer> (the text_encoder/ "
            "and tokenizer/ of the diffusers release, merged), or start from the diffusers folder (init=diffusers)"
        )
    if kind is None:
        raise InitError(f"{source} holds no text encoder (no {CLIP_PREFIX}* keys): set init.text_encoder=<folder>")
    if tokenizer in (None, "", "None", "null") or not Path(str(tokenizer)).is_dir():
        raise InitError(
            f"{source} holds the CLIP text encoder's weights but no tokenizer: set init.tokenizer=<folder with "
            f"its tokenizer files> (for SD-1.x, the tokenizer of openai/clip-vit-large-patch14); got {tokenizer}"
        )
    return str(_publish(lambda d: _clip_from_single_file(source, Path(str(tokenizer)), d), target))


def _link_diffusers(source: Path, folder: Path) -> None:
    for part in ("text_encoder", "tokenizer"):
        if not (source / part).is_dir():
            raise InitError(f"{source} has text_encoder/ but no {part}/: not a complete diffusers pipeline")
        for file in (source / part).iterdir():
            if file.is_file():
                (folder / file.name).symlink_to(file.resolve())


def _referenced_encoder(source: Path) -> str:
    """A folder written by ``ldm-export --diffusers`` references its frozen text encoder in conditioner.json."""
    reference = source / "conditioner.json"
    if reference.is_file():
        encoders = json.loads(reference.read_text()).get("text_encoders") or []
        if len(encoders) == 1 and encoders[0].get("pretrained"):
            return str(encoders[0]["pretrained"])
    raise InitError(f"{source} has no text_encoder/ (nor a conditioner.json naming one): set init.text_encoder=<folder>")


def clip_state(source: Path) -> dict[str, torch.Tensor]:
    """The single file's CLIP tensors under transformers' CLIPTextModel names (``text_model.`` nesting dropped)."""
    tensors = {k[len(CLIP_PREFIX):]: v for k, v in compvis_tensors(source).items() if k.startswith(CLIP_PREFIX)}
    state = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    state.pop("embeddings.position_ids", None)  # a buffer older transformers saved; rebuilt, not loaded
    return state


def _clip_config(source: Path):
    from transformers import CLIPTextConfig

    shapes = {k[len(CLIP_PREFIX):].removeprefix("text_model."): s for k, s in compvis_shapes(source).items()
              if k.startswith(CLIP_PREFIX)}
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.layers.")})
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // CLIP_HEAD_CHANNELS),
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0], hidden_act=CLIP_ACTIVATION,
    )


def _clip_from_single_file(source: Path, tokenizer: Path, folder: Path) -> None:
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    config = _clip_config(source)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model = CLIPTextModel(config)
    state = clip_state(source)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs CLIP {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
             if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise InitError(f"the {CLIP_PREFIX}* weights of {source} are not a CLIPTextModel: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}, shapes {wrong[:2]}")
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))


def context_dim(path: str, fmt: str, text_encoder: str | None) -> int:
    """Width of the text encoder's hidden states: the UNet's cross-attention context width."""
    if text_encoder not in (None, "", "None", "null"):
        config = json.loads((Path(str(text_encoder)) / "config.json").read_text())
        return int(config.get("hidden_size") or config["d_model"])
    source = local_path(path, fmt)
    if fmt == "diffusers" and text_encoder_kind(source, fmt):
        return int(diffusers_config(source, "text_encoder")["hidden_size"])
    if fmt == "diffusers":
        return int(json.loads((Path(_referenced_encoder(source)) / "config.json").read_text())["hidden_size"])
    shapes = {k.removeprefix(CLIP_PREFIX).removeprefix("text_model."): s for k, s in compvis_shapes(source).items()}
    if "embeddings.token_embedding.weight" not in shapes:
        raise InitError(f"{source} holds no CLIP text encoder: set init.text_encoder=<folder>")
    return int(shapes["embeddings.token_embedding.weight"][1])
