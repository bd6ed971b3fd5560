"""``init=dit``: stage 2 starts from a facebookresearch/DiT checkpoint (Peebles & Xie 2023).

Two file forms exist: the released ``DiT-XL-2-256x256.pt`` / ``-512x512.pt`` (a bare state dict of the EMA weights)
and train.py's checkpoints ``{"model", "ema", "opt", "args"}`` (``args`` an ``argparse.Namespace``, the only class
allowed besides tensors when unpickling). Our ``DiT`` (ldm.nets.dit) keeps the official module names, so the
tensors load under their own keys; what has to be recovered is the architecture, from the shapes:

  x_embedder.proj.weight (D, C, p, p)   width, latent channels, patch size
  pos_embed (1, T, D)                   the token grid: input_size = sqrt(T) * p (32 for 256 px through an f=8 VAE)
  blocks.N.*                            depth; mlp.fc1 (r*D, D) the MLP ratio
  final_layer.linear.weight (p*p*C', D) C' = 2C: learned sigma (mean half first, as our learn_sigma)
  y_embedder.embedding_table (K+1, D)   K classes + the null class of CFG as the last row (our num_classes = K+1)

Heads leave no trace in the shapes: they come from the paper's presets (Table 1). The run must match the file
where the file decides (architecture, latent channels, label count, DDPM's linear schedule, eps prediction):
each mismatch is one line naming the override, never a silent replacement.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.schedules import NoiseSchedule
from ldm.finetune.source import InitError, layout_of
from ldm.io.compvis import SAFETENSORS_SUFFIXES, UNET_PREFIX, load_torch_file, read_state_dict
from ldm.nets.dit import sincos_pos_embed_2d

log = logging.getLogger("ldm.finetune")
DIT_TARGET = "ldm.nets.dit.DiT"
# (depth, width) -> (size, heads): the paper's Table 1; the patch size is the suffix (DiT-XL/2, DiT-XL/4, ...)
PRESETS = {(12, 384): ("S", 6), (12, 768): ("B", 12), (24, 1024): ("L", 16), (28, 1152): ("XL", 16)}
# what conf/model/ldm/dit_{s,b,l,xl}2.yaml set besides the preset sizes (tests/finetune/test_init_dit.py checks it)
PRESET_CONFIG = {"patch_size": 2, "input_size": 32, "learn_sigma": False, "mlp_ratio": 4.0, "timestep_freq_shift": 0}
# guided-diffusion's "linear" at 1000 steps (DiT's create_diffusion default), eps prediction
SCHEDULE = {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 2e-2,
            "zero_terminal_snr": False}
PREDICTION = "eps"


@dataclass
class OfficialDiT:
    """What a DiT file holds: the architecture read from its shapes, the copy chosen and what else is there."""

    path: Path
    copy: str  # "ema" / "model" of a train.py checkpoint, or "state dict" for a bare one
    arch: dict[str, Any]
    args: dict[str, Any] = field(default_factory=dict)  # train.py's command-line arguments
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor, prefixed by its entry

    @property
    def preset(self) -> tuple[str, str, int] | None:
        """(name, config override, heads) of the paper's preset, e.g. ("DiT-XL/2", "model/ldm=dit_xl2", 16)."""
        found = PRESETS.get((self.arch["depth"], self.arch["hidden_size"]))
        if found is None or self.arch["mlp_ratio"] != 4.0:
            return None
        size, heads = found
        config = f"model/ldm=dit_{size.lower()}2"
        return f"DiT-{size}/{self.arch['patch_size']}", config, heads

    @property
    def summary(self) -> str:
        a = self.arch
        return (f"depth {a['depth']}, width {a['hidden_size']}, patch {a['patch_size']}, {a['input_size']}x"
                f"{a['input_size']} latents of {a['in_channels']} channels, "
                f"{'learned' if a['learn_sigma'] else 'fixed'} sigma, "
                + (f"{a['num_classes'] - 1} classes" if a["num_classes"] else "unconditional"))


def _tensor_shapes(obj: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    if torch.is_tensor(obj):
        return {prefix.rstrip("."): tuple(obj.shape)}
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensor_shapes(value, f"{prefix}{key}.").items()}


def read_tensors(path: Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], dict]:
    """(DiT tensors, which copy, train.py args, every tensor's shape) of an official file."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        state = read_state_dict(path)
        return state, "state dict", {}, _tensor_shapes(state)
    obj = load_torch_file(path, allowed=(argparse.Namespace,), mmap=True)
    if not isinstance(obj, Mapping):
        raise InitError(f"init.path={path} holds a {type(obj).__name__}, not a DiT state dict or train.py checkpoint")
    args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else {}
    if isinstance(obj.get("ema"), Mapping) or isinstance(obj.get("model"), Mapping):
        copy = "ema" if use_ema and isinstance(obj.get("ema"), Mapping) else "model"
        if not isinstance(obj.get(copy), Mapping):
            raise InitError(f"init.path={path} has no '{copy}' weights: drop init.use_ema=false")
        return dict(obj[copy]), copy, args, _tensor_shapes(obj)
    state = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    return state, "state dict", args, _tensor_shapes(state)


def architecture(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """DiT constructor arguments the shapes decide (num_classes counts the null row, as ours)."""
    layout = layout_of(state.keys())
    if layout == "compvis" and f"{UNET_PREFIX}x_embedder.proj.weight" in state:
        raise InitError(f"init.path={path} holds an ldm DiT under model.diffusion_model.* (an export's "
                        "model.safetensors or ldm-export --compvis), not a facebookresearch/DiT file: init=dit reads "
                        "the latter, and init=export reads UNet exports only")
    if layout == "compvis":
        raise InitError(f"init.path={path} is a CompVis/SD single file (model.diffusion_model.*), not an official "
                        "DiT checkpoint: use init=compvis")
    if layout != "dit":
        raise InitError(f"init.path={path} is neither an official DiT checkpoint (x_embedder.proj.weight, pos_embed, "
                        "blocks.N.attn.qkv.weight, ... as facebookresearch/DiT saves them) nor a layout init=dit "
                        "reads: use init=compvis|diffusers|export for those formats")
    hidden, channels, patch, _ = (int(n) for n in state["x_embedder.proj.weight"].shape)
    tokens = int(state["pos_embed"].shape[1])
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise InitError(f"init.path={path}: pos_embed holds {tokens} positions, not a square grid")
    out = int(state["final_layer.linear.weight"].shape[0]) // (patch * patch)
    if out not in (channels, 2 * channels):
        raise InitError(f"init.path={path}: {out} output channels for {channels} input channels (expected "
                        f"{channels}, or {2 * channels} with a learned sigma)")
    table = state.get("y_embedder.embedding_table.weight")
    return {"input_size": grid * patch, "patch_size": patch, "in_channels": channels, "hidden_size": hidden,
            "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
            "mlp_ratio": int(state["blocks.0.mlp.fc1.weight"].shape[0]) / hidden,
            "num_classes": None if table is None else int(table.shape[0]), "learn_sigma": out == 2 * channels}


@functools.lru_cache(maxsize=4)
def _described(stamp: tuple[str, int], use_ema: bool) -> OfficialDiT:
    path = Path(stamp[0])
    state, copy, args, shapes = read_tensors(path, use_ema)
    return OfficialDiT(path, copy, architecture(state, path), args, shapes)


def describe(path: Path, use_ema: bool = True) -> OfficialDiT:
    """The file's architecture and contents (cached per path and modification time: read once per run)."""
    return _described((str(path.resolve()), path.stat().st_mtime_ns), bool(use_ema))


# ---------------------------------------------------------------------------------------------------
# the run against the file


def backbone_node(dit: OfficialDiT, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """The model/ldm backbone config of the file (init.derive_config=true); channels and labels stay wired."""
    if dit.preset is None:
        raise InitError(f"init.path={dit.path} ({dit.summary}) matches no official preset, and heads cannot be read "
                        "from shapes: set init.derive_config=false and a model/ldm=dit_* with its depth, width and "
                        "heads")
    a = dit.arch
    return {"_target_": DIT_TARGET, "_partial_": True, "depth": a["depth"], "hidden_size": a["hidden_size"],
            "num_heads": dit.preset[2], "patch_size": a["patch_size"], "mlp_ratio": a["mlp_ratio"],
            "input_size": a["input_size"], "learn_sigma": a["learn_sigma"], "timestep_freq_shift": 0,
            "gradient_checkpointing": bool(gradient_checkpointing)}


def check_backbone_config(dit: OfficialDiT, node: Mapping[str, Any]) -> None:
    """The configured model/ldm backbone (a resolved config node) must be the file's architecture."""
    a, preset = dit.arch, dit.preset
    name = preset[0] if preset else "DiT"
    sizes = {"depth": a["depth"], "hidden_size": a["hidden_size"], "patch_size": a["patch_size"],
             "mlp_ratio": a["mlp_ratio"]}
    if preset:
        sizes["num_heads"] = preset[2]
    other = node.get("_target_") != DIT_TARGET or any(node.get(k, v) != v for k, v in sizes.items())
    rest = {"input_size": a["input_size"], "learn_sigma": a["learn_sigma"], "timestep_freq_shift": 0}
    fixes = []
    if other and preset:
        fixes.append(preset[1] + ("" if a["patch_size"] == 2 else f" model.ldm.backbone.patch_size={a['patch_size']}"))
        configured = PRESET_CONFIG
    elif other:
        fixes.append(f"model/ldm=dit_tiny model.ldm.backbone.depth={a['depth']} "
                     f"model.ldm.backbone.hidden_size={a['hidden_size']} model.ldm.backbone.patch_size={a['patch_size']}"
                     f" model.ldm.backbone.mlp_ratio={a['mlp_ratio']} model.ldm.backbone.num_heads=<its heads>")
        configured = PRESET_CONFIG
    else:
        configured = node
    fixes += [f"model.ldm.backbone.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in rest.items()
              if configured.get(k, PRESET_CONFIG[k]) != v]
    if fixes:
        what = (node.get("_target_", "?").rsplit(".", 1)[-1] + " " +
                ", ".join(f"{k} {node.get(k)}" for k in (*sizes, *rest) if k in node))
        raise InitError(f"init.path={dit.path} is an official {name} checkpoint ({dit.summary}) but the configured "
                        f"backbone is {what}: add {' '.join(fixes)}" + (" (or init.derive_config=true)" if preset else ""))


def check_schedule(dit: OfficialDiT, schedule: Mapping[str, Any], prediction: str) -> None:
    """Official DiT trains eps on guided-diffusion's linear betas 1e-4..0.02 over 1000 steps: the run must too."""
    theirs = NoiseSchedule(**SCHEDULE).betas
    ours = NoiseSchedule(**{k: v for k, v in schedule.items() if k != "_target_"}).betas
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=0.0):
        given = {k: v for k, v in schedule.items() if k != "_target_"}
        raise InitError(f"init.path={dit.path} was trained with DDPM's linear betas 1e-4..0.02 over 1000 steps "
                        f"(official DiT), but the run's schedule is {given}: use schedule=linear (and drop schedule.* "
                        "overrides)")
    if prediction != PREDICTION:
        raise InitError(f"init.path={dit.path} predicts eps (official DiT) but objective.prediction={prediction}: use "
                        "objective=eps (or objective=eps_min_snr)")


def check_wired(dit: OfficialDiT, backbone: nn.Module) -> None:
    """The backbone as the run wired it (first stage's latent channels, the conditioner's labels) fits the file."""
    a = dit.arch
    if getattr(backbone, "in_channels", None) != a["in_channels"]:
        raise InitError(f"init.path={dit.path} takes {a['in_channels']} latent channels but the run's first stage "
                        f"(and concat conditioning) gives {backbone.in_channels}: use the first stage it was trained "
                        "with (official DiT: first_stage=pretrained first_stage.path=<stabilityai/sd-vae-ft-ema or "
                        "-mse>, 4 channels, scale 0.18215)")
    classes = a["num_classes"]
    if classes is None:
        if backbone.num_classes is not None or backbone.context_dim is not None or backbone.adm_in_channels is not None:
            raise InitError(f"init.path={dit.path} is unconditional but the run conditions the backbone: use cond=none")
        return
    if backbone.context_dim is not None or backbone.adm_in_channels is not None or backbone.num_classes is None:
        raise InitError(f"init.path={dit.path} takes class labels through adaLN (y_embedder, {classes - 1} classes): "
                        f"use cond=class_vector cond.num_classes={classes - 1}")
    if backbone.num_classes != classes:
        raise InitError(f"init.path={dit.path} has {classes - 1} classes (+ the null class of guidance) but the run's "
                        f"conditioner has {backbone.num_classes - 1}: set cond.num_classes={classes - 1}")


def load(backbone: nn.Module, path: Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The file's DiT tensors for ``backbone`` (checked against the run first), the copy chosen logged."""
    dit = describe(path, use_ema)
    check_wired(dit, backbone)
    state, copy, args, _ = read_tensors(path, use_ema)
    origin = (f"the '{copy}' weights of a train.py checkpoint" if copy != "state dict" else
              "a bare state dict (the released DiT-*-256x256.pt / -512x512.pt files hold EMA weights)")
    trained = f" (train.py args: model {args.get('model')}, image_size {args.get('image_size')})" if args else ""
    log.info("init=dit: %s: %s%s; %s", path, origin, trained, dit.summary)
    grid = dit.arch["input_size"] // dit.arch["patch_size"]
    positions = sincos_pos_embed_2d(dit.arch["hidden_size"], grid, grid, grid, grid)
    if not torch.allclose(state["pos_embed"].float(), positions, atol=1e-4):
        log.warning("init=dit: %s: pos_embed is not the fixed 2-D sin-cos table; it is used as stored at %dx%d "
                    "tokens, but other latent sizes get sin-cos positions", path, grid, grid)
    return state
