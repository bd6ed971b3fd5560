"""LoRA (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") through ``peft``.

A targeted linear layer ``W`` becomes ``W x + (alpha / r) B A x`` with ``A`` (r, in) random and ``B`` (out, r)
zero, so training starts exactly at the pretrained model and only ``A``, ``B`` train. peft renames the layer's
own weights to ``<module>.base_layer.weight`` and adds ``<module>.lora_A.<adapter>.weight`` /
``<module>.lora_B.<adapter>.weight``; everything here works on those names, so a merged state dict
(``merge_lora_state``) has the plain names again and loads into the model without LoRA.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.errors import ConfigError

ADAPTER = "default"
# Our UNet's attention projections keep CompVis' names (ldm/nets/attention.py), which are also diffusers'.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_KEY = re.compile(rf"^(?P<module>.+)\.lora_(?P<which>[AB])\.{ADAPTER}\.weight$")


@dataclass
class LoraSpec:
    """rank r, alpha (the update is scaled by alpha / r), dropout on the LoRA branch's input, and the module
    names (a name, or a dotted suffix of one: "to_out.0" matches every "...attn1.to_out.0") that get LoRA."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(UNET_TARGETS))

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty: name the modules to adapt, e.g. [to_q, to_k, to_v, to_out.0]")
        self.rank, self.alpha, self.dropout = int(self.rank), float(self.alpha), float(self.dropout)
        self.target_modules = [str(t) for t in self.target_modules]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def check_targets(module: nn.Module, targets: Sequence[str], where: str) -> None:
    """Every target must name at least one linear or convolution layer; else say which exist."""
    layers = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) and n]
    absent = [t for t in targets if not any(matches(n, t) for n in layers)]
    if absent:
        suffixes = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                           for n in layers})
        raise ConfigError(
            f"LoRA target module(s) {absent} match no layer of the {where}; its linear/conv layers are named e.g. "
            f"{suffixes[:30]} (full names like {layers[:2]}). Fix finetune.lora target_modules"
        )


def apply_lora(module: nn.Module, spec: LoraSpec, where: str = "backbone") -> nn.Module:
    """Inject LoRA layers in place (peft) and freeze everything else of ``module``; returns it."""
    from peft import LoraConfig, inject_adapter_in_model

    check_targets(module, spec.target_modules, where)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), init_lora_weights=True)
    module.requires_grad_(False)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    for name, param in module.named_parameters():
        param.requires_grad_(".lora_" in name)
    return module


def has_lora(module: nn.Module) -> bool:
    return any(".lora_" in n for n, _ in module.named_parameters())


def lora_state_dict(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (``<module>.lora_A.default.weight`` / ``lora_B``), detached."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: v.detach() for k, v in state.items() if _LORA_KEY.match(k)}


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A (r, in[, kh, kw]), B (out, r[, 1, 1]))} of a state dict holding LoRA tensors."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match["module"], {})[match["which"]] = value
    broken = sorted(m for m, ab in found.items() if set(ab) != {"A", "B"})
    if broken:
        raise ValueError(f"LoRA layers without both A and B: {broken[:4]}")
    return {m: (ab["A"], ab["B"]) for m, ab in found.items()}


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """scale * B A as a weight of ``shape``: linear (out, in) or convolution (out, in, kh, kw) with a 1x1 B."""
    delta = b.flatten(1).double() @ a.flatten(1).double()  # (out, in * kh * kw), in float64: merge exactly
    return (scale * delta).reshape(shape)


def merge_lora_state(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with peft LoRA layers -> the plain one of the same model with ``W + scale * B A`` merged."""
    pairs = lora_pairs(state)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _LORA_KEY.match(key):
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith(".base_layer") and module[: -len(".base_layer")] in pairs:
            owner = module[: -len(".base_layer")]
            if leaf == "weight":
                a, b = pairs[owner]
                value = (value.double() + lora_delta(a, b, scale, value.shape)).to(value.dtype)
            merged[f"{owner}.{leaf}"] = value
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------------------------------------------
# which parameters train


def freeze_except(module: nn.Module, trainable: Sequence[str], where: str) -> list[str]:
    """Only parameters whose name matches a glob of ``trainable`` train (``["*"]``: all). Returns their names;
    a pattern that matches nothing is an error that lists a few names."""
    names = [n for n, _ in module.named_parameters()]
    unused = [p for p in trainable if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        raise ConfigError(f"finetune.trainable pattern(s) {unused} match no parameter of the {where}; names look "
                          f"like {names[:3]} ... {names[-2:]}")
    chosen = []
    for name, param in module.named_parameters():
        train = any(fnmatch.fnmatchcase(name, p) for p in trainable)
        param.requires_grad_(train)
        if train:
            chosen.append(name)
    return chosen
