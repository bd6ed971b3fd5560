"""``ldm-evaluate``: sample-quality metrics of a sample set, a model, or an autoencoder (conf/evaluate.yaml).

    ldm-evaluate samples=outputs/samples/<run>/samples.npz          # FID, KID, P/R, accuracy vs MNIST-5k
    ldm-evaluate model_path=outputs/ldm/<run>/export n=100     # at the model's own guidance scale (1.75)
    ldm-evaluate autoencoder=outputs/vae/<run>/export               # PSNR, SSIM, LPIPS, rFID

Every metric is reported with the number of samples (and reference samples) behind it and the feature
extractor it used, since FID-like numbers are only comparable under equal counts and features. Metrics
whose weights are not available here (Inception Score, CLIP score, LPIPS) are skipped with the reason.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm import distributed, run_notes
from ldm.cli import run_cli
from ldm.config import ConfigError, register_resolvers, sweep_group, sweep_tags, user_errors_as_messages
from ldm.io.export import write_text_atomic
from ldm.metrics import (
    to_uint8_nhwc,
)
from ldm.metrics.suite import (
    SAMPLE_METRICS,
    SampleMetrics,
    SampleSet,
    device,
    flat_metrics,
    load_samples,
    reference_source,
)

register_resolvers()
# An absolute path: relative ones would be resolved against the `ldm` package, where conf/ is not.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Bad input: ValueError and its kin (ConfigError, ExportError), and OSError for the files the user names
# (an unreadable image is PIL's UnidentifiedImageError, an OSError).
USER_ERRORS = (ValueError, OSError)
RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "fid")


def generate(cfg: DictConfig, out_dir: Path) -> SampleSet | None:
    """Model mode: sample with the ldm-sample settings, keep the samples (npz + manifest), return them.

    Under ``torchrun --nproc_per_node=N -m ldm.evaluate model_path=...`` every rank draws a share of the set
    (seed + rank, on its own GPU); rank 0 gets the whole set back and measures it, the others return None."""
    from ldm.io.load import load_ldm
    from ldm.io.samples import save_samples_npz, write_manifest
    from ldm.model import sample_sharded
    from ldm.sample import build_conditions, file_hash, guidance_scales, sampling_guidance

    sampler, info = load_ldm(Path(str(cfg.model_path)), distributed.local_device(), bool(cfg.use_ema))
    sampler_cfg = OmegaConf.to_container(cfg.sampler) if cfg.get("sampler") else dict(info["config"]["sampler"])
    image_size = int(cfg.image_size or info["config"]["data"]["image_size"])
    guidance, guidance_record = sampling_guidance(cfg, sampler, Path(str(cfg.model_path)))
    scale = guidance_scales(cfg.guidance_scale, info)[0]
    conditioner = sampler.conditioner
    if conditioner.takes_prompts and cfg.prompts is None and cfg.prompts_file is None and str(cfg.reference) == "mnist5k":
        from ldm.data.captions import held_out_prompt
        from ldm.metrics.classifier import JudgeArch

        # A text model is asked for each class the judge knows, with a held-out prompt, so the judge can check it
        # per class (a class+text model gets the label and its prompt).
        classes = conditioner.num_classes or JudgeArch().num_classes
        conditions = conditioner.example_conditions(int(cfg.n), labels=range(classes), caption_for=held_out_prompt)
    else:
        conditions = build_conditions(cfg, sampler)
    count = len(next(iter(conditions.values())))
    world = distributed.world_size()
    if distributed.rank() == 0:
        print(f"generating {count} samples with {sampler_cfg} on {world} process(es)", flush=True)
    unet_calls = []  # one entry per backbone forward: the measured cost of a sampler, whatever its design
    # Autoguidance's guide is a second network: its calls are counted too.
    networks = [sampler.backbone] + ([guidance.guide.backbone] if guidance.guide is not None else [])
    hooks = [net.register_forward_hook(lambda *_: unet_calls.append(1)) for net in networks]
    started = time.perf_counter()
    try:
        images = sample_sharded(sampler, conditions, image_size, int(cfg.seed), sampler=dict(sampler_cfg),
                                guidance_scale=scale, batch_size=int(cfg.batch_size),
                                guidance_rescale=float(cfg.guidance_rescale), guidance=guidance)
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - started
    if distributed.rank() != 0:
        return None
    batches = math.ceil(math.ceil(count / world) / int(cfg.batch_size))  # this rank's batches
    # CFG runs the conditional and unconditional halves in one batched call, so a call is one NFE here.
    cost = {"nfe": len(unet_calls) / batches, "generate_s": seconds, "images_per_s": count / seconds}
    labels, prompts = conditions.get("label"), conditions.get("caption")
    npz = save_samples_npz(out_dir / "samples.npz", images, labels=labels, prompts=prompts)
    write_manifest(out_dir / "manifest.json", {
        "command": OmegaConf.to_container(cfg, resolve=True), "sampler": sampler_cfg, "seed": int(cfg.seed),
        "guidance_scale": scale, "guidance_rescale": float(cfg.guidance_rescale),
        "guidance": guidance_record,
        "image_size": image_size, "model": str(cfg.model_path), "world_size": world,
        "model_sha256": file_hash(Path(str(cfg.model_path))), "cost": cost,
    })
    samples = load_samples(npz)
    samples.cost = cost
    return samples


def evaluate_samples(cfg: DictConfig, samples: SampleSet) -> dict[str, Any]:
    resolution, channels = samples.images.shape[1], samples.images.shape[-1]
    if cfg.image_size is not None and int(cfg.image_size) != resolution:
        raise ConfigError(f"the samples are {resolution} px but image_size={cfg.image_size}")
    measure = SampleMetrics(cfg, resolution, channels)
    metrics, skipped = measure.run(samples, [str(m) for m in cfg.metrics])
    warning = run_notes.small_sample_warning(len(samples.images), [str(m) for m in cfg.metrics], int(cfg.kid.subset_size))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return {
        "metrics": metrics,
        "skipped": skipped,
        "samples": {"source": samples.source, "n": len(samples.images), "resolution": resolution,
                    "channels": channels, "labels": samples.labels is not None},
        "reference": {"name": str(cfg.reference), "key": measure.key, "split": str(cfg.reference_split)},
        "cost": samples.cost,
    }


@torch.no_grad()
def evaluate_autoencoder(cfg: DictConfig) -> dict[str, Any]:
    """Reconstructions of the reference's val split: PSNR, SSIM (torchmetrics), LPIPS, reconstruction FID."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from ldm.io.export import load_autoencoder

    names = [str(m) for m in cfg.reconstruction_metrics]
    if cfg.image_size is None and str(cfg.reference) != "mnist5k":
        raise ConfigError("set image_size=<the resolution the autoencoder was trained at> for a folder reference")
    resolution = int(cfg.image_size or 32)
    autoencoder, _ = load_autoencoder(str(cfg.autoencoder))
    originals = reference_source(cfg, resolution, "val")[1]()  # (N, H, W, C) uint8
    in_channels = getattr(getattr(autoencoder, "config", None), "in_channels", originals.shape[-1])
    if in_channels != originals.shape[-1]:
        raise ConfigError(f"the autoencoder takes {in_channels}-channel images, reference={cfg.reference} has {originals.shape[-1]}")
    autoencoder = autoencoder.to(device())
    measure = SampleMetrics(cfg, resolution, originals.shape[-1], split="val")
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, C, H, W) in [-1, 1]
    batches = x.split(int(cfg.batch_size))
    # Judged as saved: quantised to 8 bits like the originals.
    recon = to_uint8_nhwc(torch.cat([autoencoder.decode(autoencoder.encode(b.to(device())).mode()).cpu() for b in batches]))
    pred, target = (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0 for a in (recon, originals))
    n, metrics, skipped = len(x), {}, {}
    pixels = {"n": n, "features": "pixels"}
    if "psnr" in names:  # per image, then averaged
        metrics["psnr"] = {"value": float(peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3))), **pixels}
    if "ssim" in names:
        metrics["ssim"] = {"value": float(structural_similarity_index_measure(pred, target, data_range=1.0)), **pixels}
    if "lpips" in names and (cfg.lpips.vgg_weights_path is None or cfg.lpips.lpips_weights_path is None):
        skipped["lpips"] = "needs VGG16 and LPIPS weights: set lpips.vgg_weights_path and lpips.lpips_weights_path"
    elif "lpips" in names:
        from ldm.nets.perceptual import LPIPS

        lpips = LPIPS(str(cfg.lpips.vgg_weights_path), str(cfg.lpips.lpips_weights_path)).to(device())
        values = torch.cat([lpips(a.to(device()), b.to(device())).cpu() for a, b in zip((pred * 2 - 1).split(len(batches[0])), batches)])
        metrics["lpips"] = {"value": float(values.mean()), "n": n, "features": "lpips-vgg16"}
    if "fid" in names:
        metrics["rfid"] = measure.fid(SampleSet(recon))
    return {"metrics": metrics, "skipped": skipped, "autoencoder": str(cfg.autoencoder),
            "reference": {"name": str(cfg.reference), "key": measure.key, "split": "val"}}


# One line per metric in the human summary; the JSON holds everything.
_SUMMARY = {
    "fid": "FID({f}, {vs}) {value:.4g}", "rfid": "rFID({f}, {vs}) {value:.4g}",
    "kid": "KID({f}, {vs}) {value:.4g} ± {std:.2g}", "pr": "P/R({f}, k={k}, {vs}) {precision:.3f}/{recall:.3f}",
    "accuracy": "acc {percent:.1f}% ({vs})", "is": "IS({vs}) {value:.3g} ± {std:.2g}", "clip_score": "CLIP({f}, {vs}) {value:.4g}",
    "psnr": "PSNR({vs}) {value:.2f} dB", "ssim": "SSIM({vs}) {value:.4f}", "lpips": "LPIPS({vs}) {value:.4f}",
}


def summary_line(metrics: dict[str, Any], skipped: dict[str, str]) -> str:
    """e.g. ``FID(judge128, n=1000 vs 4500) 12.3 | KID(...) 0.0123 ± 0.001 | acc 97.1% (n=1000)``."""
    parts = []
    for name, m in metrics.items():
        vs = f"n={m['n']} vs {m['ref_n']}" if "ref_n" in m else f"n={m['n']}"
        features = str(m.get("features", ""))  # judge128-<weights hash> -> judge128; the JSON has the hash
        short = features.split("-")[0] if features.startswith("judge") else features
        parts.append(_SUMMARY[name].format(**m, f=short, vs=vs, percent=100 * m.get("value", 0.0)))
    return " | ".join(parts + [f"{name} skipped ({reason})" for name, reason in skipped.items()])


def check_config(cfg: DictConfig) -> str:
    """The mode (samples, model_path or autoencoder), after checking what can be checked before any work."""
    modes = [key for key in ("samples", "model_path", "autoencoder") if cfg.get(key) is not None]
    if len(modes) != 1:
        raise ConfigError(f"give exactly one of samples=, model_path=, autoencoder= (got {modes or 'none'})")
    for key, valid in (("metrics", SAMPLE_METRICS), ("reconstruction_metrics", RECONSTRUCTION_METRICS)):
        unknown = sorted({str(m) for m in cfg[key]} - set(valid))
        if unknown:
            raise ConfigError(f"unknown {key} {unknown}; choose from {list(valid)}")
    if str(cfg.features) not in ("judge", "inception"):
        raise ConfigError(f"features must be 'judge' or 'inception', got {cfg.features!r}")
    if modes[0] == "samples" and not Path(str(cfg.samples)).exists():
        raise ConfigError(run_notes.missing_samples(Path(str(cfg.samples))))
    return modes[0]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured evaluation; writes ``metrics.json`` to ``out_dir`` and returns the report."""
    mode = check_config(cfg)
    # Under torchrun the ranks share the sampling of model mode; the rest is rank 0's alone.
    distributed.init_from_environment()
    if mode != "model_path" and distributed.rank() != 0:
        return {}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "autoencoder":
        report = evaluate_autoencoder(cfg)
    else:
        samples = load_samples(cfg.samples) if mode == "samples" else generate(cfg, out_dir)
        if samples is None:
            return {}  # a rank other than 0 has drawn its share
        report = evaluate_samples(cfg, samples)
    report["summary"] = summary_line(report["metrics"], report["skipped"])
    text = json.dumps(report, indent=2, sort_keys=True)
    write_text_atomic(out_dir / "metrics.json", text)
    report["written"] = [str(out_dir / "metrics.json")]
    if cfg.write_next_to_samples and mode == "samples":
        beside = Path(str(cfg.samples))
        beside = beside.with_name(f"{beside.stem if beside.is_file() else beside.name}.metrics.json")
        write_text_atomic(beside, text)
        report["written"].append(str(beside))
    # ldm-report reads a sweep job's numbers from here (and its overrides from .hydra/).
    numbers = {**flat_metrics(report["metrics"], prefix=""), **report.get("cost", {})}
    write_text_atomic(out_dir / "results.json", json.dumps(numbers, indent=2, sort_keys=True))
    log_to_wandb(cfg, report)
    print(report["summary"], flush=True)
    print("\n".join(run_notes.evaluate_next(mode, cfg, out_dir)), flush=True)
    return report


def log_to_wandb(cfg: DictConfig, report: dict[str, Any]) -> None:
    """Into the active wandb run if the caller holds one (e.g. a notebook); else, with ``wandb.enabled``,
    a run of its own (one per sweep job, grouped by ``wandb.group``, tagged with the job's overrides)."""
    values = {**flat_metrics(report["metrics"]), **{f"eval/{k}": v for k, v in report.get("cost", {}).items()}}
    wandb = sys.modules.get("wandb")  # only a process that imported wandb can hold an active run
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.summary.update(values)
        return
    settings = cfg.get("wandb") or {}
    if not settings.get("enabled"):
        return
    import wandb

    run = wandb.init(project=str(settings.project), group=sweep_group(settings.get("group")), job_type="evaluate",
                     tags=sweep_tags(settings.get("tags")), mode=str(settings.mode), dir=str(cfg.out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
    run.summary.update(values)
    run.finish()  # each multirun job ends its own run, or the next job would log into it


def main() -> None:
    run_cli("ldm-evaluate", CONF_DIR, "evaluate", __doc__, hydra_main)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors_as_messages("ldm-evaluate", USER_ERRORS):
        evaluate(cfg)


if __name__ == "__main__":
    main()
