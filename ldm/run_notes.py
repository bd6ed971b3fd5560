"""What ``ldm-train`` tells the user around a run: a compact config summary at the start, the next command at
the end, and a FAILED marker in the folder of a run that stopped on an error (so it does not pass for a real
one). Lines go through logging, so Hydra's ``train.log`` in the run folder holds what the console showed."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.cli import FAILED_MARKER

log = logging.getLogger("ldm.train")


def _choices() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def config_summary(cfg: DictConfig, out: Path) -> str:
    """One line per concern, e.g. ``stage=ldm  model/ldm=unet_small  cond=class  data=mnist5k (batch 64)``;
    the run folder's config.yaml holds the rest."""
    choices = _choices()
    stage = str(cfg.stage.name)
    model = f"model/{stage}={choices.get(f'model/{stage}', '?')}"
    what = [f"stage={stage}", model]
    if stage == "ldm":
        what += [f"cond={choices.get('cond')}", f"first_stage.path={OmegaConf.select(cfg, 'first_stage.path')}"]
    data = f"data={choices.get('data')} (batch {OmegaConf.select(cfg, 'data.batch_size')})"
    how = [data, f"{cfg.stage.max_steps} steps", f"trainer={choices.get('trainer')}", f"seed={cfg.seed}"]
    if stage == "ldm":
        how += [f"schedule={choices.get('schedule')}", f"objective={choices.get('objective')}",
                f"sampler={choices.get('sampler')} ({OmegaConf.select(cfg, 'sampler.steps')} steps, "
                f"cfg {OmegaConf.select(cfg, 'stage.final_samples.guidance_scale')})"]
    extra = [f"{g}={choices[g]}" for g in ("experiment", "debug", "init") if choices.get(g) not in (None, "none")]
    return "\n".join([
        "ldm-train: " + "  ".join(what),
        "  " + "  ".join(how + extra),
        f"  run folder: {out} (config.yaml there holds every setting)",
    ])


def next_steps(cfg: DictConfig, out: Path) -> list[str]:
    """The command a user runs next, with this run's paths filled in."""
    export = shlex.quote(str(out / "export"))
    if cfg.stage.name == "vae":
        return [f"next: ldm-train stage=ldm first_stage.path={export}"]
    lines = [f"next: ldm-sample model_path={export} n=8" + (" labels=[3,7]" if _choices().get("cond", "").startswith("class") else ""),
             f"      ldm-evaluate model_path={export} n=100    # FID/KID/accuracy of 100 samples per class"]
    return lines


def mark_failed(out: Path, err: BaseException) -> None:
    """A FAILED file in the run folder (Hydra made it before the run started), holding the error."""
    if not out.is_dir():
        return
    message = " ".join(str(err).split()) or type(err).__name__
    (out / FAILED_MARKER).write_text(f"{type(err).__name__}: {message}\n")


def clear_failed(out: Path) -> None:
    """A run that finished (e.g. resumed after a failure) is no longer a failed one."""
    (out / FAILED_MARKER).unlink(missing_ok=True)


def first_stage_export(cfg: DictConfig) -> None:
    """``first_stage.path`` given as a stage-1 run folder (the likeliest slip) is taken as its ``export/``;
    a path that is neither is refused here, in one line, before any interpolation reads the folder."""
    if "from_export" not in str(OmegaConf.select(cfg, "first_stage._target_") or ""):
        return
    path = OmegaConf.select(cfg, "first_stage.path")
    if path in (None, "", "None", "null"):
        return  # read_export names the fix when the model is built
    path = Path(str(path))
    if (path / "meta.json").is_file():
        return
    if (path / "export" / "meta.json").is_file():
        log.info("first_stage.path=%s is a run folder: using its export %s", path, path / "export")
        cfg.first_stage.path = str(path / "export")
        return
    from ldm.errors import ConfigError

    if not path.exists():
        raise ConfigError(f"first_stage.path={path} does not exist: give the export/ folder of a stage-1 run "
                          "(ldm-train stage=vae prints it at the end, e.g. outputs/vae/<run>/export)")
    raise ConfigError(f"first_stage.path={path} is not a stage-1 export (no meta.json there, nor in "
                      f"{path / 'export'}): give <stage-1 run>/export")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in str(record.msg)


def quiet_third_party() -> None:
    """Third-party notices that are noise here silenced, and Lightning's own lines routed to Hydra's handlers,
    so train.log holds them too (Lightning gives its loggers a console handler of their own when it is
    imported before logging is configured, which cuts them off from the run folder's log file)."""
    import warnings

    # Lightning's advertisement for its cloud loggers and model registry, at every Trainer construction.
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    # The first stage and frozen text encoders are in eval mode on purpose (ldm.model.FirstStage).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # A dependency (transformers / diffusers) still calls the old private pytree API; nothing of ours does.
    # Lightning's own pytree helper still uses an API that torch deprecated; nothing to act on for a user.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*torch\.utils\._pytree\._register_pytree_node.* is deprecated")
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True


def missing_samples(path: Path) -> str:
    """samples= that does not exist, with the samples.npz files that do exist near it (a guidance-scale list
    puts them in one subfolder per scale, the likeliest reason the named one is not there)."""
    base = path.parent if path.suffix == ".npz" else path
    while not base.is_dir() and base != base.parent:
        base = base.parent
    found = sorted(base.glob("**/samples.npz"))[:8] if base != Path("/") else []
    listed = f"; samples.npz files under {base}: {', '.join(str(p) for p in found)}" if found else ""
    return f"samples={path} does not exist{listed or ': give a samples.npz (ldm-sample writes one) or an image folder'}"


def small_sample_warning(n: int, metrics: list[str], subset_size: int) -> str | None:
    """FID and KID from fewer samples than KID's subset are biased upwards and noisy: comparable only with
    numbers measured at the same n."""
    if n >= subset_size or not {"fid", "kid"} & set(metrics):
        return None
    return (f"warning: FID/KID from n={n} samples (< kid.subset_size={subset_size}) are biased upwards and noisy: "
            "compare them only with numbers measured at the same n (n=1000+ for a result)")


def evaluate_next(mode: str, cfg: DictConfig, out_dir: Path) -> list[str]:
    """Where ldm-evaluate wrote, and what to run next."""
    lines = [f"metrics: {out_dir / 'metrics.json'}"]
    if in_sweep():
        return lines  # the sweep ends with its folder and the ldm-report command (ldm.cli.SweepSummary)
    if mode == "model_path":
        lines.append(f"next: ldm-evaluate -m model_path={shlex.quote(str(cfg.model_path))} n={cfg.n} "
                     "guidance_scale=1.5,1.75,2,3    # a guidance sweep; ldm-report <its folder> tabulates it")
    elif mode == "samples":
        lines.append("next: ldm-evaluate samples=<another samples.npz> with the same n and reference, to compare")
    else:
        lines.append(f"next: ldm-train stage=ldm first_stage.path={shlex.quote(str(cfg.autoencoder))}")
    return lines
