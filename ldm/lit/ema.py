"""Exponential moving average of a network's weights (Polyak averaging), used for sampling/validation."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
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
    # Set by ldm-train under FSDP, not by hand: the copy is built on the meta device (shapes, no memory) and its
    # shards are filled from the live model's once sharded (ldm.lit.meta_init), so no rank holds a full copy.
    copy_on_meta: bool = False

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
        copied = _empty_copy(model) if config.copy_on_meta else copy.deepcopy(model)
        self.model = copied.eval().requires_grad_(False)
        # Parameters that do not train (a LoRA base, a freeze list) never change: the copy shares them instead of
        # holding a second one (a full SD UNet for a few MB of adapters), and only the trained ones are averaged.
        self.averaged = [n for n, p in model.named_parameters() if p.requires_grad]
        self._shared: list[nn.Parameter] = []
        if len(self.averaged) < len(list(model.parameters())):
            self._shared = _share_frozen(self.model, model)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_weight(self) -> torch.Tensor:
        """1 - the current decay, as a 0-dim tensor on the counter's device: max(1 - decay, (w - 1) / (w + n)).
        Computed there, never read back: a host-side decay would cost a device sync every step."""
        n = self.num_updates.to(torch.float32)
        warm = (self.config.warmup_steps - 1) / (self.config.warmup_steps + n)
        return torch.clamp(warm, min=1.0 - self.config.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s weights. ``skip``: a 0-dim tensor, 1 (or True) for an optimizer
        step that was skipped on the device (NonFiniteGuard): the average and the count then stay as they
        are, with no host-device sync to find out."""
        weight = self.current_weight()
        keep = None
        if skip is not None:
            keep = 1 - skip.to(device=weight.device, dtype=torch.float32)
            weight = weight * keep
        # FSDP: both copies are sharded alike (the backbone whole, a conditioner embedder by embedder), so each
        # rank averages its own shards, no communication; a forward without backward left them gathered.
        sharding.reshard(self.model)
        ema, live = dict(self.model.named_parameters()), dict(model.named_parameters())
        ema_params = [sharding.local(ema[n]) for n in self.averaged]
        live_params = [sharding.local(live[n].detach()) for n in self.averaged]
        if ema_params:
            # ema <- ema + (1 - decay) * (live - ema). The weight is a device tensor, passed once per tensor: the
            # overload taking one tensor weight reads it on the host (a sync).
            weight = weight.to(ema_params[0].device)
            live_params = [p.to(e.dtype) for p, e in zip(live_params, ema_params)]
            torch._foreach_lerp_(ema_params, live_params, [weight] * len(ema_params))
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            ema_buf.copy_(buf)
        self.num_updates += 1 if keep is None else keep.to(self.num_updates.device, torch.long)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> EMA:
        """Device moves apply; casts to 16-bit floats do not: the average stays in fp32.

        Under ``precision=bf16-true`` Lightning casts the whole module to bf16. An average at decay 0.9999 moves
        by 1e-4 of the gap per step, below bf16's resolution (8 bits of mantissa, 2^-8 relative): the EMA
        would silently freeze. It stays fp32 and is evaluated under autocast (``LatentDiffusionModule``)."""
        probe = fn(torch.zeros((), dtype=torch.float32))
        if probe.dtype not in (torch.bfloat16, torch.float16):
            return super()._apply(fn, recurse)
        shared = {id(p) for p in self._shared}  # the live model's frozen tensors follow the live model

        def move_only(t: torch.Tensor) -> torch.Tensor:
            if id(t) in shared or not t.is_floating_point():
                return fn(t)
            return t.to(device=probe.device)

        return super()._apply(move_only, recurse)

    def train(self, mode: bool = True) -> EMA:
        # The averaged copy is only ever evaluated (dropout off).
        super().train(mode)
        self.model.eval()
        return self


def _empty_copy(model: nn.Module) -> nn.Module:
    """``model`` deep-copied with every parameter and buffer on the meta device: no memory is allocated."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _share_frozen(copy_: nn.Module, model: nn.Module) -> list[nn.Parameter]:
    """Point ``copy_``'s parameters that are frozen in ``model`` at ``model``'s own tensors; returns them."""
    shared = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            owner, _, leaf = name.rpartition(".")
            setattr(copy_.get_submodule(owner) if owner else copy_, leaf, param)
            shared.append(param)
    return shared
