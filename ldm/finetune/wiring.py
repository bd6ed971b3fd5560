"""How ``init=`` and ``finetune=`` reach a stage-2 run, as functions of the modules they change.

``configure(cfg, run_dir)`` (called by ldm-train before the run's config.yaml is written, so every later reader
of that file, ``ldm-sample`` on a .ckpt included, rebuilds the same model) replaces the config nodes the source
decides and wraps ``stage.module.model.backbone`` / ``stage.module.model.conditioner`` in ``prepare_backbone`` /
``prepare_conditioner``, which load the pretrained weights and apply LoRA or the freeze list before the
LightningModule takes its EMA copy. With ``init=none finetune=full`` (the defaults) nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from ldm.errors import ConfigError
from ldm.finetune.init import InitSpec, derived_nodes, init_report, load_backbone
from ldm.finetune.lora import LoraSpec, apply_lora, freeze_except
from ldm.finetune.official_dit import check_backbone_config, check_schedule

log = logging.getLogger("ldm.finetune")
MODES = ("full", "lora")


@dataclass
class FinetuneSpec:
    """mode: full (the parameters matching ``trainable`` train) or lora (only LoRA adapters train).
    trainable: glob patterns of backbone parameter names that train under mode=full (["*"]: all; e.g.
        ["*transformer_blocks*"] trains only the attention blocks).
    lora: the backbone's adapters. train_text_encoder: also put adapters (``text_encoder``) on the text encoder."""

    mode: str = "full"
    trainable: Sequence[str] = field(default_factory=lambda: ["*"])
    lora: LoraSpec | None = None
    train_text_encoder: bool = False
    text_encoder: LoraSpec | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"finetune.mode={self.mode!r} is not one of {MODES}")
        if self.mode == "lora" and self.lora is None:
            raise ConfigError("finetune=lora needs finetune.lora (rank, alpha, dropout, target_modules)")
        if self.train_text_encoder and (self.mode != "lora" or self.text_encoder is None):
            raise ConfigError("finetune.train_text_encoder=true needs finetune=lora and finetune.text_encoder (LoRA spec)")
        self.trainable = list(self.trainable or ["*"])

    @property
    def changes_backbone(self) -> bool:
        return self.mode == "lora" or self.trainable != ["*"]


def trained_fraction(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def prepare_backbone(backbone: Any, init: InitSpec | None = None, finetune: FinetuneSpec | None = None,
                     report: str | None = None) -> Any:
    """The backbone as training sees it: pretrained weights loaded (init), then LoRA or the freeze list.

    A backbone factory (the usual ``_partial_`` config, which the model calls with its conditioning's channels)
    gives a factory back that prepares what it builds."""
    if not isinstance(backbone, nn.Module):
        factory = backbone
        return lambda **wired: prepare_backbone(factory(**wired), init, finetune, report)
    # On the meta device (an FSDP rank other than 0, ldm.lit.meta_init) there is nothing to load into: rank 0
    # loads the weights and sends each rank its shards.
    if init is not None and init.loads and not any(p.is_meta for p in backbone.parameters()):
        init_report(init, report)
        load_backbone(backbone, init)
    if finetune is not None and finetune.mode == "lora":
        apply_lora(backbone, finetune.lora, "backbone")
    elif finetune is not None:
        freeze_except(backbone, finetune.trainable, "backbone")
    trained, total = trained_fraction(backbone)
    log.info("backbone: %s of %s parameters train (%.3f %%)", f"{trained:,}", f"{total:,}", 100 * trained / max(total, 1))
    return backbone


def text_encoders(conditioner: nn.Module) -> list[nn.Module]:
    from ldm.nets.conditioners import FrozenTextEncoder

    return [e for e in getattr(conditioner, "embedders", []) if isinstance(e, FrozenTextEncoder)]


def prepare_conditioner(conditioner: nn.Module, finetune: FinetuneSpec | None = None) -> nn.Module:
    """LoRA on the text encoder(s) when ``finetune.train_text_encoder``: the encoder runs with gradients (its
    ``freeze`` flag off, so also its own dropout in training mode, as diffusers' LoRA scripts train it) and
    its embedding cache is off (embeddings now change every step)."""
    if finetune is None or not finetune.train_text_encoder:
        return conditioner
    encoders = text_encoders(conditioner)
    if not encoders:
        raise ConfigError("finetune.train_text_encoder=true but the conditioner has no text encoder (cond=text/clip/t5)")
    for encoder in encoders:
        apply_lora(encoder.transformer, finetune.text_encoder, "text encoder")
        encoder.freeze, encoder.embedding_cache_size = False, 0
        encoder._memo.clear()
        trained, total = trained_fraction(encoder.transformer)
        log.info("text encoder: %s of %s parameters train (LoRA)", f"{trained:,}", f"{total:,}")
    return conditioner


# ---------------------------------------------------------------------------------------------------
# the config


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def configure(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Apply ``init=`` / ``finetune=`` to the composed config (see the module docstring). Returns the base
    reference recorded in checkpoints, or None when the run is an ordinary one."""
    init_node, finetune_node = cfg.get("init"), cfg.get("finetune")
    if init_node is not None and init_node.get("format") == "none":
        init_node = None
    finetune = FinetuneSpec(**{k: v for k, v in OmegaConf.to_container(finetune_node, resolve=True).items()
                               if k != "_target_"}) if finetune_node is not None else None
    if finetune is not None:
        finetune.lora = _lora(finetune.lora)
        finetune.text_encoder = _lora(finetune.text_encoder)
    active = init_node is not None or (finetune is not None and (finetune.changes_backbone or finetune.train_text_encoder))
    if not active:
        return None
    if cfg.stage.name != "ldm":
        raise ConfigError("init= and finetune= set up stage 2: use them with stage=ldm (or init=none finetune=full)")
    init = None
    if init_node is not None:
        init = InitSpec(**{k: v for k, v in OmegaConf.to_container(init_node, resolve=True).items() if k != "_target_"})
        _apply_init(cfg, init)
    # The raw nodes (interpolations such as ${model.ldm.backbone}) are wrapped, so config.yaml shows them resolved.
    model = OmegaConf.to_container(cfg.stage.module.model, resolve=False)
    _set(cfg, "stage.module.model.backbone", {"_target_": "ldm.finetune.wiring.prepare_backbone", "backbone": model["backbone"],
                                    "init": "${init}", "finetune": "${finetune}",
                                    "report": str(Path(run_dir) / "init_report.tsv") if init is not None else None})
    if finetune is not None and finetune.train_text_encoder:
        _set(cfg, "stage.module.model.conditioner", {"_target_": "ldm.finetune.wiring.prepare_conditioner",
                                                     "conditioner": model["conditioner"], "finetune": "${finetune}"})
    return {"init": None if init is None else {"format": init.format, "path": str(init.path)},
            "finetune": finetune.mode if finetune is not None else "full"}


def _lora(node: Any) -> LoraSpec | None:
    if node is None or isinstance(node, LoraSpec):
        return node
    return LoraSpec(**{k: v for k, v in dict(node).items() if k != "_target_"})


def _apply_init(cfg: DictConfig, init: InitSpec) -> None:
    """Replace what the source decides; each replacement is logged, none is silent."""
    checkpointing = bool(OmegaConf.select(cfg, "model.ldm.backbone.gradient_checkpointing", default=False))
    nodes = derived_nodes(init, str(cfg.paths.cache_dir), checkpointing)
    if init.format == "dit":
        # the file states no schedule of its own (official DiT has one): the run must already use it
        check_schedule(nodes["dit"], OmegaConf.to_container(cfg.schedule, resolve=True), cfg.objective.prediction)
        if not init.derive_config:
            check_backbone_config(nodes["dit"], OmegaConf.to_container(cfg.model.ldm.backbone, resolve=True))
    if init.derive_config:
        _set(cfg, "model.ldm.backbone", nodes["backbone"])
    _set(cfg, "schedule", nodes["schedule"])
    _set(cfg, "objective.prediction", nodes["prediction"])
    if "first_stage" in nodes:
        # settings of the first stage the user gave (SD single files state no scale: first_stage.scale_factor=0.18215)
        for key in ("sample_posterior", "scale_factor"):
            value = OmegaConf.select(cfg, f"first_stage.{key}", default=None)
            if value is not None:
                nodes["first_stage"][key] = value
        _set(cfg, "first_stage", nodes["first_stage"])
    if "conditioner" in nodes:
        if init.format != "export":
            for embedder in nodes["conditioner"]["embedders"]:
                embedder["drop_rate"] = float(OmegaConf.select(cfg, "cond.drop_rate", default=0.1))
        _set(cfg, "cond.conditioner", nodes["conditioner"])
    if "context_dim" in nodes:
        _set(cfg, "cond.context_dim", nodes["context_dim"])
    schedule = {k: v for k, v in nodes["schedule"].items() if k != "_target_"}
    log.info("init=%s: schedule %s, prediction %s%s%s%s", init.format, schedule, nodes["prediction"],
             ", backbone config from the source" if init.derive_config else "",
             ", first stage from the source" if "first_stage" in nodes else "",
             ", conditioner from the source" if "conditioner" in nodes else "")
