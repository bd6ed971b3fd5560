"""How a model is guided beyond its scale: the ``guidance`` config group and its resolved form.

``GuidanceConfig`` is what ``conf/guidance/*.yaml`` instantiate: the method (``cfg`` = classifier-free guidance,
Ho & Salimans 2022; ``autoguidance`` = a weaker guide model, Karras et al., NeurIPS 2024), an optional band of
noise levels (Kynkäänniemi et al., NeurIPS 2024) and, for autoguidance, where the guide model is. The scale and
guidance rescale stay where they were (``guidance_scale``, ``guidance_rescale``): a sweep varies them per call.
``Guidance`` is the resolved form ``LatentDiffusion.sample`` takes: the interval and the guide model itself
(``ldm.io.guide.resolve_guidance`` loads it and checks it against the model at start-up).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ldm.diffusion.guidance import GuidanceInterval
from ldm.errors import ConfigError

GUIDANCE_METHODS = ("cfg", "autoguidance")


def _interval(value: Any) -> GuidanceInterval | None:
    if value is None or isinstance(value, GuidanceInterval):
        return value
    if isinstance(value, Mapping):
        # high None: no upper bound (how describe() and an export's record write infinity)
        fields = {k: v for k, v in value.items() if k != "_target_" and not (k == "high" and v is None)}
        try:
            return GuidanceInterval(**fields)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"guidance.interval={dict(fields)}: {err} (give low, high and unit: sigma | t)") from err
    raise ConfigError(f"guidance.interval must be null or {{low, high, unit}}, got {value!r}")


@dataclass
class GuidanceConfig:
    """method: ``cfg`` | ``autoguidance``; interval: guide only within this band of noise levels (None: at
    every step); guide: autoguidance's guide model, a stage-2 export folder or ``.ckpt`` on the same first
    stage and conditioning (an earlier snapshot of the run, e.g. ``<export>/guide`` from
    ``stage.keep_guide_at_step``, or a smaller preset); guide_use_ema: a ``.ckpt`` guide's EMA weights."""

    method: str = "cfg"
    interval: Any = None
    guide: str | None = None
    guide_use_ema: bool = True

    def __post_init__(self) -> None:
        if self.method not in GUIDANCE_METHODS:
            raise ConfigError(f"guidance.method={self.method!r} is unknown: choose one of {list(GUIDANCE_METHODS)}")
        self.interval = _interval(self.interval)
        if self.guide == "???":  # an unset mandatory value of conf/guidance/autoguidance.yaml
            self.guide = None
        if self.method == "autoguidance" and not self.guide:
            raise ConfigError("guidance=autoguidance needs guidance.guide=<a stage-2 export or .ckpt> (e.g. the "
                              "<run>/export/guide a run with stage.keep_guide_at_step writes)")
        if self.method == "cfg" and self.guide:
            raise ConfigError(f"guidance.guide={self.guide} is only used by guidance=autoguidance: pick it, or "
                              "remove guidance.guide")

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the method (what ldm-report and a reader need to tell samples apart)."""
        interval = self.interval
        band = None if interval is None else {"low": interval.low, "high": None if math.isinf(interval.high)
                                              else interval.high, "unit": interval.unit}
        return {"method": self.method, "interval": band, "guide": self.guide}


def as_guidance_config(value: Any) -> GuidanceConfig:
    """A GuidanceConfig from itself, None (plain CFG) or a config node / mapping of its fields."""
    if value is None:
        return GuidanceConfig()
    if isinstance(value, GuidanceConfig):
        return value
    if isinstance(value, Mapping) or hasattr(value, "items"):
        fields = {str(k): v for k, v in value.items() if k != "_target_"}
        if isinstance(fields.get("interval"), Mapping) or hasattr(fields.get("interval"), "items"):
            fields["interval"] = dict(fields["interval"].items())
        unknown = sorted(set(fields) - set(GuidanceConfig.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"guidance has unknown keys {unknown}; it takes {list(GuidanceConfig.__dataclass_fields__)}")
        return GuidanceConfig(**fields)
    raise ConfigError(f"guidance must be a config group entry (guidance=cfg|interval|autoguidance), got {value!r}")


@dataclass
class Guidance:
    """Resolved guidance for ``LatentDiffusion.sample``: the band (None: every step) and autoguidance's guide
    model (None: classifier-free guidance, the unconditional branch of the model itself)."""

    interval: GuidanceInterval | None = None
    guide: Any = None  # a LatentDiffusion

    def to(self, device: Any) -> Guidance:
        if self.guide is not None:
            self.guide.to(device)
        return self


def check_guide(model: Any, guide: Any, model_name: str, guide_name: str) -> None:
    """One ConfigError line naming both when ``guide`` cannot guide ``model``: autoguidance mixes their x0
    predictions of the same latents under the same condition and noise level, so the latent space (first stage
    and scale), the conditioning and the schedule's time axis must agree; backbone size and training may differ."""
    def latents(m: Any) -> tuple[int, int]:
        return m.first_stage.latent_channels, m.first_stage.downsample_factor

    checks = [
        ("latent channels, downsample factor", latents(model), latents(guide)),
        ("latent scale factor", round(float(model.first_stage.scale_factor), 5),
         round(float(guide.first_stage.scale_factor), 5)),
        ("condition inputs", model.conditioner.input_keys, guide.conditioner.input_keys),
        ("condition spec", model.conditioner.spec, guide.conditioner.spec),
        ("training timesteps", model.objective.schedule.num_train_timesteps,
         guide.objective.schedule.num_train_timesteps),
    ]
    for what, mine, theirs in checks:
        if mine != theirs:
            raise ConfigError(f"guidance.guide={guide_name} cannot guide model {model_name}: {what} {theirs} vs "
                              f"{mine}. Autoguidance needs a guide on the same first stage and conditioning (an "
                              "earlier snapshot of the same run, or a smaller preset trained on them)")
