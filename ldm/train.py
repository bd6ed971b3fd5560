"""``ldm-train``: the Hydra entry point for both stages (thin: composition, not logic).

    ldm-train stage=vae model/vae=kl_f4 data=mnist5k
    ldm-train stage=ldm first_stage.path=<stage-1 run>/export cond=text
    ldm-train -m experiment=f_factor seed=0,1,2
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigError, check_constructor_keys, instantiate_checked, register_resolvers
from ldm.io.export import write_text_atomic
from ldm.lit.export import AutoencoderExport, LatentDiffusionExport

log = logging.getLogger("ldm.train")
register_resolvers()
# An absolute path: relative ones would be resolved against the `ldm` package, where conf/ is not.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

STAGES = ("vae", "ldm")


def run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def resolve_ckpt_path(cfg: DictConfig, out: Path) -> str | None:
    """``ckpt_path=last`` resumes this run folder's last.ckpt, or starts fresh (and says so)."""
    if cfg.ckpt_path is None:
        return None
    if str(cfg.ckpt_path) == "last":
        last = out / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        log.warning("ckpt_path=last but %s does not exist: starting fresh", last)
        return None
    path = Path(str(cfg.ckpt_path))
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist (use ckpt_path=last to resume this run folder)")
    return str(path)


def build_callbacks(cfg: DictConfig, out: Path) -> list[pl.Callback]:
    callbacks = [instantiate_checked(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    export_dir = out / "export"
    if cfg.stage.name == "vae":
        callbacks.append(AutoencoderExport(export_dir, OmegaConf.to_container(cfg.model.vae.autoencoder, resolve=True)))
    else:
        callbacks.append(LatentDiffusionExport(export_dir, cfg))
    return callbacks


def build_loggers(cfg: DictConfig) -> list:
    return [instantiate_checked(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]


def check_config(cfg: DictConfig) -> None:
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage.name must be one of {STAGES}, got {cfg.stage.name!r}")
    for key in ("stage.module", "data", "trainer", "callbacks", "logger"):
        node = OmegaConf.select(cfg, key)
        if node is not None:
            check_constructor_keys(node, key)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured stage; returns the final logged metrics and the paths it wrote."""
    check_config(cfg)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(int(cfg.seed), workers=True)

    datamodule = instantiate_checked(cfg.data, "data")
    module = instantiate_checked(cfg.stage.module, "stage.module")
    if cfg.stage.name == "ldm" and cfg.stage.latent_cache:
        from ldm.data.latent_cache import LatentCacheDataModule

        datamodule = LatentCacheDataModule(datamodule, module.first_stage, Path(cfg.paths.cache_dir) / "latents")
    callbacks = build_callbacks(cfg, out)
    trainer: pl.Trainer = instantiate_checked(cfg.trainer, "trainer", callbacks=callbacks, logger=build_loggers(cfg) or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg, out))

    results: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    results["run_dir"] = str(out)
    results["export"] = str(out / "export")
    if cfg.stage.name == "ldm" and cfg.stage.final_samples.enabled and trainer.is_global_zero:
        from ldm.sampling import write_final_samples

        results.update(write_final_samples(module, datamodule, out / "samples", cfg))
    if trainer.is_global_zero:
        summarize(results)
    _finish_wandb()
    return results


def summarize(results: dict[str, Any]) -> None:
    lines = [f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(results.items())]
    print("ldm-train finished:\n" + "\n".join(lines), flush=True)


def _finish_wandb() -> None:
    # Each multirun job must end its own wandb run, or the next job logs into it.
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    # A scalar lets Hydra sweepers (e.g. Optuna) optimise the run.
    monitor = cfg.stage.monitor
    return results.get(monitor)


if __name__ == "__main__":
    main()
