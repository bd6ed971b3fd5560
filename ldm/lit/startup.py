"""Start-up checks of how a run is launched: combinations that would fail (or go wrong) only once every node has
built its model, refused before, each with one line that names the fix."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.errors import ConfigError

# Lightning's ModelParallelStrategy (trainer=fsdp) accepts these precisions only: 16-mixed needs a loss scaler,
# which it does not provide (lightning.pytorch.trainer.connectors.accelerator_connector).
MODEL_PARALLEL_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
_MODEL_PARALLEL_TARGETS = ("ldm.lit.sharding.FullyShardedStrategy", "lightning.pytorch.strategies.ModelParallelStrategy")


def check_precision(trainer: DictConfig) -> None:
    """trainer=fsdp with a precision Lightning's ModelParallelStrategy refuses (it would say so only after the
    model is built, naming Fabric)."""
    target = OmegaConf.select(trainer, "strategy._target_")
    precision = str(OmegaConf.select(trainer, "precision"))
    if target in _MODEL_PARALLEL_TARGETS and precision not in MODEL_PARALLEL_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} does not run under FSDP (Lightning's ModelParallelStrategy takes "
            f"{', '.join(MODEL_PARALLEL_PRECISIONS)}): use bf16-mixed (Ampere and newer), 32-true on older GPUs, or "
            f"trainer=ddp if the model fits one GPU with its optimizer state and {precision} is what you need")


def is_multi_node(trainer: DictConfig, environ: Any = os.environ) -> bool:
    """trainer.num_nodes > 1, or a launcher (torchrun, SLURM) whose world spans more processes than this node's."""
    if int(OmegaConf.select(trainer, "num_nodes") or 1) > 1:
        return True
    if int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", 1)) or 1) > 1:
        return True
    world, local = environ.get("WORLD_SIZE"), environ.get("LOCAL_WORLD_SIZE")
    return world is not None and local is not None and int(world) > int(local)


def check_run_name(cfg: DictConfig, stable_name: str | None, environ: Any = os.environ) -> None:
    """A multi-node run must name its run folder the same on every node: each node composes its own config, and
    a start time differs between them (checkpoints scattered over several folders, ``ckpt_path=last`` finding
    a different one on each node). ``stable_name``: the name the launcher gives (SLURM job id, torchrun
    --rdzv-id), or None."""
    if cfg.get("run_name") not in (None, "") or stable_name is not None:
        return
    if is_multi_node(cfg.trainer, environ):
        raise ConfigError(
            "a multi-node run needs a run folder name every node agrees on: set run_name=<name> (the same on every "
            "node) or hydra.run.dir=<folder>, or launch under SLURM or with torchrun --rdzv-id=<id>; without one, each node names its folder "
            "by its own start time and ckpt_path=last resumes different checkpoints")
