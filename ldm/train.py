"""``ldm-train``: the Hydra entry point for both stages (thin: composition, not logic).

    ldm-train stage=vae model/vae=kl_f4 data=mnist5k
    ldm-train stage=ldm first_stage.path=<stage-1 run>/export cond=text
    ldm-train -m experiment=f_factor seed=0,1,2
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ldm.cli import run_cli
from ldm.config import (
    ConfigError,
    apply_deprecated_keys,
    check_constructor_keys,
    flat_numbers,
    instantiate_checked,
    launcher_run_name,
    register_resolvers,
    rename_deprecated_overrides,
    sweep_group,
    sweep_tags,
    user_errors_as_messages,
)
from ldm.finetune.wiring import configure as configure_finetune
from ldm.io.checkpoint_io import check_resume_checkpoint, newest_resume_checkpoint, read_checkpoint
from ldm.io.export import write_text_atomic
from ldm.lit.export import AutoencoderExport, LatentDiffusionExport
from ldm.lit.finetune import BaseReference
from ldm.lit.meta_init import fsdp_empty_build
from ldm.lit.reliability import NonFiniteLossError, keep_csv_history
from ldm.lit.sharding import check_trainer, is_fsdp
from ldm.lit.startup import check_precision, check_run_name
from ldm.run_notes import (
    clear_failed,
    config_summary,
    first_stage_export,
    in_sweep,
    mark_failed,
    next_steps,
    quiet_third_party,
)

log = logging.getLogger("ldm.train")
register_resolvers()
# An absolute path: relative ones would be resolved against the `ldm` package, where conf/ is not.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

HELP = """ldm-train: train the autoencoder (stage=vae) or the latent diffusion model on its export (stage=ldm).

  ldm-train stage=vae run_name=f4
  ldm-train stage=ldm first_stage.path=outputs/vae/f4/export run_name=c1
  ldm-train stage=ldm first_stage.path=... debug=fast           # a few steps of everything
  ldm-train -m stage=ldm first_stage.path=... seed=0,1 run_name=s1  # a sweep; again with ckpt_path=last resumes it"""

STAGES = ("vae", "ldm")
# 128 + SIGTERM, the shell's status for a process stopped by SIGTERM: schedulers and retry loops see an
# unfinished run (after ResumeCheckpoint wrote last.ckpt) rather than a finished one.
PREEMPTED_EXIT_CODE = 143
# Bad input raises ValueError (ConfigError, ExportError, CheckpointError, ...) with a message naming the fix.
USER_ERRORS = (ValueError, NonFiniteLossError)


def run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def resolve_ckpt_path(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path=last`` resumes this run folder's newest checkpoint (last.ckpt, or a SLURM requeue's
    hpc_ckpt), or starts fresh (and says so). The file is checked to be a readable checkpoint here, before
    any data or model is built."""
    if cfg.ckpt_path is None:
        return None
    if str(cfg.ckpt_path) == "last":
        last = newest_resume_checkpoint(out)
        if last is None:
            log.warning("ckpt_path=last but %s does not exist: starting fresh", out / "checkpoints" / "last.ckpt")
            return None
        path = last
    else:
        path = Path(str(cfg.ckpt_path))
        if not path.exists():  # a file, or trainer=fsdp's distributed checkpoint folder
            raise ConfigError(f"ckpt_path={path} does not exist (use ckpt_path=last to resume this run folder)")
    read_checkpoint(path)
    log.info("resuming from %s", path)
    return str(path)


def build_callbacks(cfg: DictConfig, out: Path) -> list[pl.Callback]:
    callbacks = [instantiate_checked(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    export_dir = out / "export"
    if cfg.stage.name == "vae":
        callbacks.append(AutoencoderExport(export_dir, OmegaConf.to_container(cfg.model.vae.autoencoder, resolve=True)))
    else:
        callbacks.append(LatentDiffusionExport(export_dir, cfg))
        if cfg.stage.get("keep_guide_at_step") is not None:  # an autoguidance guide from this run
            from ldm.lit.guide_snapshot import GuideSnapshot

            callbacks.append(GuideSnapshot(int(cfg.stage.keep_guide_at_step), callbacks[-1]))
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        extra = {}
        if "WandbLogger" in str(node.get("_target_", "")):
            extra["tags"] = sweep_tags(node.get("tags"))
        loggers.append(instantiate_checked(node, f"logger.{name}", **extra))
    return loggers


def run_dir_given() -> str | None:
    """The run folder set on the command line (``hydra.run.dir=...``, as ``make train`` does): a name every
    node agrees on, like run_name."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return next((o.split("=", 1)[1] for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.run.dir=")), None)


def check_config(cfg: DictConfig) -> None:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage.name must be one of {STAGES}, got {cfg.stage.name!r}")
    for key in ("stage.module", "data", "trainer", "callbacks", "logger"):
        node = OmegaConf.select(cfg, key)
        if node is not None:
            check_constructor_keys(node, key)
    check_precision(cfg.trainer)
    check_run_name(cfg, launcher_run_name() or run_dir_given())
    if cfg.stage.name == "ldm":
        check_sampling(cfg)
        check_judge(cfg)


def check_sampling(cfg: DictConfig) -> None:
    """Sampler settings are first used at a preview or after training; a bad one must fail before it."""
    steps = OmegaConf.select(cfg, "sampler.steps")
    num_timesteps = int(OmegaConf.select(cfg, "schedule.num_train_timesteps") or 1000)
    if steps is not None and not 1 <= int(steps) <= num_timesteps:
        raise ConfigError(f"sampler.steps={steps} is out of range: use 1..{num_timesteps} (schedule.num_train_timesteps)")
    scales = {"stage.final_samples.guidance_scale": OmegaConf.select(cfg, "stage.final_samples.guidance_scale")}
    for i, scale in enumerate(OmegaConf.select(cfg, "stage.module.preview.guidance_scales") or []):
        scales[f"stage.module.preview.guidance_scales[{i}]"] = scale
    for key, scale in scales.items():
        if scale is not None and not float(scale) >= 0:
            raise ConfigError(f"{key}={scale} is out of range: guidance scales must be >= 0 (1 = no guidance)")


JUDGES = ("mnist5k",)


def check_judge(cfg: DictConfig) -> None:
    """The final samples are judged after training: a judge that cannot read this data must fail now."""
    judge = OmegaConf.select(cfg, "stage.final_samples.judge")
    if judge is None or not OmegaConf.select(cfg, "stage.final_samples.enabled"):
        return
    if judge not in JUDGES:
        raise ConfigError(f"stage.final_samples.judge={judge!r} is not a judge: use one of {list(JUDGES)} or null")
    own = OmegaConf.select(cfg, "data.judge")
    if judge != own:
        data = OmegaConf.select(cfg, "data.name") or OmegaConf.select(cfg, "data._target_")
        raise ConfigError(f"stage.final_samples.judge={judge} cannot judge samples of this data ({data}, whose "
                          f"data.judge is {own}): set stage.final_samples.judge=null, or data.judge={judge} if "
                          "the data is what that judge was trained on")


def condition_data(cfg: DictConfig, datamodule: Any, model: Any) -> Any:
    """The data as the model's conditioning needs it: batches carry exactly the keys its embedders read
    (``conditioner.batch_keys``), from the images or from the latent cache."""
    conditioner = model.conditioner
    if hasattr(datamodule, "condition_keys"):
        datamodule.condition_keys = conditioner.batch_keys
    if not cfg.stage.latent_cache:
        return datamodule
    if conditioner.needs_images:
        raise ConfigError("this conditioning (cond=inpaint) works on the images themselves: set stage.latent_cache=false")
    from ldm.data.latent_cache import LatentCacheDataModule
    from ldm.data.stream import StreamDataModule

    if isinstance(datamodule, StreamDataModule):
        raise ConfigError("stage.latent_cache=true cannot cache data=stream (shards may not fit one disk): write "
                          "the latents into the shards with `ldm-prepare encode=true first_stage.path=...` instead")

    return LatentCacheDataModule(datamodule, model.first_stage, Path(cfg.paths.cache_dir) / "latents",
                                 keys=conditioner.batch_keys)


def configure_backends(cfg: DictConfig) -> None:
    """Process-wide numerics switches, set before any model is built. ``tf32``: fp32 matmuls and
    convolutions on Ampere+ GPUs use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation);
    no effect on CPU. null leaves PyTorch's defaults alone."""
    tf32 = cfg.get("tf32")
    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        torch.backends.cudnn.allow_tf32 = bool(tf32)


def batch_plan(cfg: DictConfig, trainer: pl.Trainer) -> dict[str, int]:
    """The batch each optimizer step sees, spelled out: the learning rate is never rescaled for it."""
    per_device = int(cfg.data.batch_size)
    accumulate = int(trainer.accumulate_grad_batches)
    world = int(trainer.world_size)
    return {
        "per_device": per_device,
        "world_size": world,
        "accumulate_grad_batches": accumulate,
        "global": per_device * world * accumulate,
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured stage; returns the final logged metrics and the paths it wrote."""
    apply_deprecated_keys(cfg)
    out = run_dir(cfg)
    # A sweep's jobs form one wandb group (the sweep's name unless group= is set), tagged by their overrides.
    cfg.group = sweep_group(cfg.get("group"))
    cfg.tags = sweep_tags(cfg.get("tags"))
    first_stage_export(cfg)
    # finetune (issue 18): init= / finetune= set the stage-2 nodes they decide, before anything reads them (cached
    # resolvers would keep the values seen first) and before config.yaml records them
    base = configure_finetune(cfg, out)
    check_config(cfg)
    configure_backends(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg, out)
    check_trainer(cfg.trainer, ckpt_path)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if rank_zero():
        log.info(config_summary(cfg, out))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)

    datamodule = instantiate_checked(cfg.data, "data")
    if cfg.stage.name == "ldm" and is_fsdp(cfg.trainer):
        fsdp_empty_build(cfg, rank0=rank_zero(), resume=ckpt_path is not None and base is None)
    module = instantiate_checked(cfg.stage.module, "stage.module")
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, module, cfg.stage.name)
    if cfg.stage.name == "ldm":
        datamodule = condition_data(cfg, datamodule, module.model)
    callbacks = build_callbacks(cfg, out)
    if base is not None:  # finetune (issue 18): checkpoints name the base their omitted weights come from
        callbacks.append(BaseReference(base))
    loggers = build_loggers(cfg)
    if not loggers:
        # logger=none: LearningRateMonitor would refuse the logger-less Trainer at fit start, and has
        # nowhere to write to anyway.
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    plan = batch_plan(cfg, trainer)
    if trainer.is_global_zero:
        log.info("batch: %(per_device)d per device x %(world_size)d devices x %(accumulate_grad_batches)d "
                 "accumulated = %(global)d per optimizer step", plan)
    if ckpt_path is not None:
        keep_csv_history(trainer.loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "batch": plan})

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    results: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    results.update({f"batch/{k}": v for k, v in plan.items()})
    # Optimizer steps actually taken: a run stopped by trainer.max_time (equal-compute studies) or a
    # resumed run says here how far it got.
    results["train/steps"] = int(trainer.global_step)
    results["run_dir"] = str(out)
    results["export"] = str(out / "export")
    if cfg.stage.name == "ldm" and cfg.stage.final_samples.enabled:
        from ldm.metrics.final_samples import write_final_samples

        # Lightning's teardown moved the module to the CPU; every rank samples its share on its device.
        module.to(trainer.strategy.root_device)
        results.update(write_final_samples(module, datamodule, out / "samples", cfg))
    if trainer.is_global_zero:
        # ldm-report reads every sweep job's numbers from here (and its overrides from .hydra/).
        write_text_atomic(out / "results.json", json.dumps(flat_numbers(results), indent=2, sort_keys=True))
        summarize(results)
        if not in_sweep():  # a sweep ends with one pointer to ldm-report instead (ldm.cli.SweepSummary)
            for line in next_steps(cfg, out):
                log.info(line)
    _finish_wandb()
    return results


def summarize(results: dict[str, Any]) -> None:
    lines = [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(results.items())]
    log.info("ldm-train finished:\n" + "\n".join(lines))


def rank_zero() -> bool:
    # Before the Trainer exists: the launcher's rank variables (torchrun, SLURM), else a single process.
    import os

    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))


def _finish_wandb() -> None:
    # Each multirun job must end its own wandb run, or the next job logs into it.
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def main() -> float | None:
    sys.argv[1:] = rename_deprecated_overrides(sys.argv[1:])
    return run_cli("ldm-train", CONF_DIR, "train", HELP, hydra_main)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    out = run_dir(cfg)
    with user_errors_as_messages("ldm-train", USER_ERRORS):
        try:
            results = train(cfg)
        except SIGTERMException:
            sys.exit(PREEMPTED_EXIT_CODE)  # ResumeCheckpoint has written last.ckpt and said so
        except Exception as err:
            mark_failed(out, err)
            raise
    clear_failed(out)
    # A scalar lets Hydra sweepers (e.g. Optuna) optimise the run.
    monitor = cfg.stage.monitor
    return results.get(monitor)


if __name__ == "__main__":
    main()
