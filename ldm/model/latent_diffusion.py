"""The latent diffusion model without Lightning (Rombach et al. 2022, sec. 3.2-3.3).

``LatentDiffusion`` = backbone (UNet, DiT, ...) + conditioner + frozen first stage + the diffusion objective
(schedule and parameterization, in ``ldm.diffusion``). It offers what training, sampling and the CLIs share:
``loss(batch, generator)``, ``denoiser(cond)`` and ``sample(conditions, ...)`` (SDEdit and inpainting included),
and it owns eval mode while sampling. Lightning (``ldm.lit``) adds only the optimizer, EMA, logging and
callbacks around it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ldm.diffusion import samplers as sampler_lib
from ldm.diffusion.guidance import Autoguidance, ClassifierFreeGuidance
from ldm.diffusion.objective import Denoiser, DiffusionObjective
from ldm.errors import ConfigError
from ldm.model.edit import LatentEdit
from ldm.model.first_stage import FirstStage
from ldm.model.guidance import Guidance
from ldm.model.sharded import batch_size_of, slice_conditions, uint8_nhwc
from ldm.nets.backbone import check_backbone, run_backbone

log = logging.getLogger(__name__)

BackboneFactory = Callable[..., nn.Module]


def sampling_autocast(device: torch.device | str, precision: str | int | None) -> torch.dtype | None:
    """The backbone's autocast dtype while sampling on ``device`` for a trainer ``precision`` ("bf16-mixed",
    "16-mixed", ...): the training one on a GPU; None (fp32) on the CPU, where bf16 autocast was not faster
    at our sizes, and for full-precision runs."""
    if torch.device(device).type != "cuda" or precision is None:
        return None
    precision = str(precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def autocast_backbone(backbone: nn.Module, dtype: torch.dtype | None) -> Callable:
    """``run_backbone`` under autocast to ``dtype`` (None: as is), its output back in fp32."""
    if dtype is None:
        return lambda x, t, c: run_backbone(backbone, x, t, c)

    def run(x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype):
            out = run_backbone(backbone, x, t, c)
        return out.float()

    return run


class LatentDiffusion(nn.Module):
    """backbone: a built backbone (checked against the conditioning), or a factory (a class or a Hydra
    ``_partial_``) that is called with the conditioner's spec (``ConditionSpec.backbone_kwargs``): channels,
    context width and label count then come from the conditioner and the first stage, never from a config copy.
    """

    def __init__(self, backbone: nn.Module | BackboneFactory, conditioner: nn.Module, first_stage: FirstStage,
                 objective: DiffusionObjective) -> None:
        super().__init__()
        latent = first_stage.latent_channels
        # The arguments the backbone took from the conditioning: an export records them with its own config.
        self.backbone_kwargs = conditioner.spec.backbone_kwargs(latent)
        if not isinstance(backbone, nn.Module):
            wired = sorted(set(getattr(backbone, "keywords", {})) & set(self.backbone_kwargs))
            if wired:
                given = ", ".join(f"{k}={backbone.keywords[k]}" for k in wired)
                raise ConfigError(f"model.ldm.backbone sets {given}, which the model wires from its conditioning and "
                                  f"first stage ({', '.join(f'{k}={self.backbone_kwargs[k]}' for k in wired)}): "
                                  "remove it from the backbone config")
            try:
                backbone = backbone(**self.backbone_kwargs)
            except TypeError as err:
                raise ConfigError(f"the backbone factory does not take the conditioning's arguments "
                                  f"{sorted(self.backbone_kwargs)}: {err}. A backbone config leaves in_channels, "
                                  "out_channels, context_dim, num_classes and adm_in_channels to the model") from err
        try:
            check_backbone(backbone, conditioner.spec, latent)
        except ValueError as err:
            raise ConfigError(f"{err} Fix model.ldm.backbone (or pick a matching cond=).") from err
        self.backbone = backbone
        self.conditioner = conditioner
        self.first_stage = first_stage
        self.objective = objective

    def with_backbone(self, backbone: nn.Module, conditioner: nn.Module | None = None) -> LatentDiffusion:
        """The same model with another backbone of the same shape (the EMA copy), and, where given, another
        conditioner (the EMA copy of a fine-tuned text encoder's), sharing everything else."""
        return LatentDiffusion(backbone, conditioner if conditioner is not None else self.conditioner,
                               self.first_stage, self.objective)

    def frozen_state(self, prefix: str = "", ema_prefix: str | None = None,
                     ema_conditioner_prefix: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors that never train: the first stage, frozen conditioner encoders and frozen backbone weights
        (a LoRA base, a freeze list's rest), keys with ``prefix``. Checkpoints leave them out and take them from
        their source (an export, pretrained weights) on load. ``ema_prefix``: also the EMA copy's names of the
        frozen backbone weights, which an EMA of a partly frozen backbone shares instead of copying;
        ``ema_conditioner_prefix``: alike for the EMA copy of a conditioner whose text encoder trains."""
        trainable = {f"conditioner.{n}" for n, p in self.conditioner.named_parameters() if p.requires_grad}
        frozen_backbone = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if not p.requires_grad}
        state = self.state_dict()
        frozen = {prefix + k: v for k, v in state.items()
                  if k.startswith("first_stage.") or k in frozen_backbone
                  or (k.startswith("conditioner.") and k not in trainable)}
        if ema_prefix is not None:
            frozen.update({ema_prefix + k.removeprefix("backbone."): state[k] for k in frozen_backbone})
        if ema_conditioner_prefix is not None:
            frozen.update({ema_conditioner_prefix + k.removeprefix("conditioner."): v for k, v in state.items()
                           if k.startswith("conditioner.") and k not in trainable})
        return frozen

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # --- training --------------------------------------------------------------------------------
    def latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents z0 (B, C, h, w): from precomputed posterior moments when the batch carries them."""
        if "latent_mean" in batch:
            return self.first_stage.scale(batch["latent_mean"], batch["latent_std"], generator=generator)
        return self.first_stage.encode(batch["image"], generator=generator)

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
             backbone: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample weighted loss (B,), timesteps (B,)); ``backbone`` overrides the model's (the EMA copy)."""
        batch = self.conditioner.prepare(batch, self.first_stage, generator)
        z0 = self.latents(batch, generator)
        cond = self.conditioner(batch, generator=generator)
        net = backbone if backbone is not None else self.backbone
        return self.objective.loss(lambda x, t, c: run_backbone(net, x, t, c), z0, cond, generator=generator)

    # --- sampling --------------------------------------------------------------------------------
    def denoiser(self, cond: Any = None, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                 uncond: Any = None, guidance: Guidance | None = None, guide_cond: Any = None,
                 autocast_dtype: torch.dtype | None = None) -> Denoiser:
        """The sampler contract denoise(x_t, t, cond) -> x0_hat, guided when ``guidance_scale != 1``: by the
        unconditional branch (classifier-free guidance; ``uncond``: the unconditional condition dict), or by
        ``guidance.guide`` (autoguidance; ``guide_cond``: the guide's own embedding of the conditions), within
        ``guidance.interval`` if one is set. Every sampler sees the same contract, whatever the method.
        ``autocast_dtype``: the backbones run under autocast to it; their output, and so the sampler's state,
        stays fp32."""
        denoise = self.objective.denoiser(autocast_backbone(self.backbone, autocast_dtype))
        if guidance_scale == 1.0:
            return denoise
        guidance = guidance or Guidance()
        schedule = self.objective.schedule
        if guidance.guide is not None:
            return Autoguidance(denoise, guidance.guide.denoiser(), guidance_scale, guide_cond=guide_cond,
                                rescale=guidance_rescale, schedule=schedule, interval=guidance.interval)
        if uncond is None:
            raise ValueError("guidance needs the unconditional condition (uncond=)")
        return ClassifierFreeGuidance(denoise, uncond, guidance_scale, rescale=guidance_rescale,
                                      schedule=schedule, interval=guidance.interval)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode (no dropout, no condition dropout) and no autograd; the previous modes come back after."""
        modes = [(m, m.training) for m in (self.backbone, self.conditioner)]
        for module, _ in modes:
            module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, mode in modes:
                module.train(mode)

    def example_conditions(self, per_group: int, **kwargs: Any) -> dict[str, Any]:
        """See ``Conditioner.example_conditions``."""
        return self.conditioner.example_conditions(per_group, **kwargs)

    def embed(self, chunk: dict[str, Any], batch_size: int, spatial_size: tuple[int, ...]) -> dict[str, Any]:
        """The conditioner's outputs for a chunk of sampling inputs (unconditional when it holds none)."""
        if chunk:
            return self.conditioner(chunk, allow_missing=True, spatial_size=spatial_size)
        return self.conditioner.unconditional(batch_size, device=self.device, spatial_size=spatial_size)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.first_stage.downsample_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the first stage's factor {f}")
        return self.first_stage.latent_channels, image_size // f, image_size // f

    def sample(
        self,
        conditions: dict[str, Any],
        image_size: int,
        sampler: dict[str, Any] | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        progress: Callable[[int, int], None] | None = None,
        edit: LatentEdit | None = None,
        guidance_rescale: float = 0.0,
        guidance: Guidance | None = None,
        uint8: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] on the CPU, or with ``uint8`` (N, H, W, C) uint8 (converted on the
        device, batch by batch); same generator seed -> same images.

        ``conditions`` maps batch keys to inputs (``example_conditions`` makes them); an embedder whose key is
        absent runs unconditionally, and ``{"n": [None] * N}`` alone samples N unconditional images.
        ``edit`` starts from given latents (SDEdit) and/or keeps a masked region of them (inpainting).
        ``guidance_rescale`` is phi of Lin et al. 2023 (eq. 15-17; 0 = off, they use 0.7).
        ``guidance``: the method beyond the scale (``ldm.model.guidance``): a band of noise levels, or autoguidance
        by a guide model (which then embeds the same conditions with its own conditioner).
        Classifier-free guidance is skipped when the model has no guided condition (unconditional, or concat
        only): both branches would be the same network call. Autoguidance needs none.
        ``autocast_dtype`` (``sampling_autocast``): the backbone's precision; the VAE decode and the sampler's
        state stay fp32.
        """
        sampler = dict(sampler or {"name": "ddim", "steps": 50})
        name = sampler.pop("name")
        n = batch_size_of(conditions)
        shape = self.latent_shape(image_size)
        given = any(key != "n" for key in conditions)  # {"n": ...} alone: no inputs, already unconditional
        guide_model = guidance.guide if guidance is not None else None
        guide = guidance_scale != 1.0 and (guide_model is not None or (self.conditioner.guided and given))
        if guidance_scale != 1.0 and not guide:
            log.info("guidance_scale=%g skipped: no guided condition is given, so the unconditional prediction "
                     "is the conditional one (one network call per step)", guidance_scale)
        device, out = self.device, []
        with self.inference(), (guide_model.inference() if guide_model is not None else contextlib.nullcontext()):
            for start in range(0, n, batch_size):
                chunk = slice_conditions(conditions, start, min(n, start + batch_size))
                m = batch_size_of(chunk)
                chunk = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in chunk.items() if k != "n"}
                cond = self.embed(chunk, m, shape[1:])
                uncond = guide_cond = None
                if guide and guide_model is not None:
                    guide_cond = guide_model.embed(chunk, m, shape[1:])
                elif guide:
                    uncond = self.conditioner(chunk, force_unconditional=True, allow_missing=True,
                                              spatial_size=shape[1:])
                denoise = self.denoiser(guidance_scale=guidance_scale if guide else 1.0,
                                        guidance_rescale=guidance_rescale, uncond=uncond, guidance=guidance,
                                        guide_cond=guide_cond, autocast_dtype=autocast_dtype)
                noise = torch.randn((m, *shape), generator=generator, device=device)
                kwargs = dict(sampler)
                if edit is not None:
                    part = edit.slice(start, start + m, device)
                    denoise = part.keep_known(denoise)
                    noise, kwargs = part.start(noise, self.objective.schedule, kwargs)
                z0 = sampler_lib.sample(name, denoise, noise, self.objective.schedule, cond=cond, generator=generator,
                                        **kwargs)
                images = self.first_stage.decode(z0.float()).clamp(-1, 1).float()
                out.append(uint8_nhwc(images).cpu() if uint8 else images.cpu())
                if progress is not None:
                    progress(min(n, start + batch_size), n)
        return torch.cat(out)
