"""Exponential moving average of a network's weights (Polyak averaging), used for sampling/validation."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ldm.lit import sharding


@dataclass
class EMAConfig:
    """``decay`` is the target decay; early updates use min(decay, (1 + n) / (warmup_steps + n)),
    so the average is not dominated by the random initialisation (CompVis LitEma uses warmup_steps=10).
    """

    decay: float = 0.9999
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")
        if self.warmup_steps < 1:
            raise ValueError(f"ema.warmup_steps must be >= 1, got {self.warmup_steps}")


class EMA(nn.Module):
    """Holds a frozen copy of ``model`` and moves it towards the live weights after each optimizer step.

    A submodule of the LightningModule, so its weights and update count are in every checkpoint and a
    resumed run continues the same average. Under DDP the live weights are identical on every rank after
    the optimizer step, so each rank's copy stays identical without communication. Under FSDP the copy is
    sharded like the live model (``LatentDiffusionModule.configure_model``) and each rank averages its shards.
    """

    def __init__(self, model: nn.Module, config: EMAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Parameters that do not train (a LoRA base, a freeze list) never change: the copy shares them instead of
        # holding a second one (a full SD UNet for a few MB of adapters), and only the trained ones are averaged.
        self.averaged = [n for n, p in model.named_parameters() if p.requires_grad]
        if len(self.averaged) < len(list(model.parameters())):
            _share_frozen(self.model, model)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.config.decay, (1 + n) / (self.config.warmup_steps + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        # FSDP: both copies are sharded alike (the backbone whole, a conditioner embedder by embedder), so each
        # rank averages its own shards, no communication; a forward without backward left them gathered.
        sharding.reshard(self.model)
        ema, live = dict(self.model.named_parameters()), dict(model.named_parameters())
        ema_params = [sharding.local(ema[n]) for n in self.averaged]
        live_params = [sharding.local(live[n].detach()) for n in self.averaged]
        # ema <- ema + (1 - decay) * (live - ema), one fused kernel over all tensors.
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(live_params, ema_params)], 1.0 - decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        # The averaged copy is only ever evaluated (dropout off).
        super().train(mode)
        self.model.eval()
        return self


def _share_frozen(copy_: nn.Module, model: nn.Module) -> None:
    """Point ``copy_``'s parameters that are frozen in ``model`` at ``model``'s own tensors."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            owner, _, leaf = name.rpartition(".")
            setattr(copy_.get_submodule(owner) if owner else copy_, leaf, param)
