"""``ldm-evaluate``: sample-quality metrics of a sample set, a model, or an autoencoder (conf/evaluate.yaml).

    ldm-evaluate samples=outputs/samples/<run>/samples.npz          # FID, KID, P/R, accuracy vs MNIST-5k
    ldm-evaluate model_path=outputs/ldm/<run>/export n=100     # at the model's own guidance (the default: 3.5, t <= 400)
    ldm-evaluate autoencoder=outputs/vae/<run>/export               # PSNR, SSIM, LPIPS, rFID

Every metric is reported with the number of samples (and reference samples) behind it and the feature
extractor it used, since FID-like numbers are only comparable under equal counts and features. Metrics
whose weights are not available here (Inception Score, CLIP score, LPIPS) are skipped with the reason.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm import distributed, run_notes
from ldm.backends import set_tf32
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


def generate(cfg: DictConfig, out_dir: Path) -> SampleSet:
    """Model mode: sample with the ldm-sample settings into ``samples.npz`` (+ manifest), and return the set
    (memory-mapped, not loaded).

    Under ``torchrun --nproc_per_node=N -m ldm.evaluate model_path=...`` every rank draws its share of the batches
    (the same images one process would draw) into its part of the npz, rank 0 joins the parts, and every rank
    gets the set back to measure its share of it."""
    from ldm.io.load import load_ldm
    from ldm.io.samples import sample_to_npz, write_manifest
    from ldm.model.sharded import rank_batches
    from ldm.sample import build_conditions, file_hash, guidance_scales, sampling_guidance, sampling_precision

    sampler, info = load_ldm(Path(str(cfg.model_path)), distributed.local_device(), bool(cfg.use_ema))
    sampler_cfg = OmegaConf.to_container(cfg.sampler) if cfg.get("sampler") else dict(info["config"]["sampler"])
    image_size = int(cfg.image_size or info["config"]["data"]["image_size"])
    guidance, guidance_record = sampling_guidance(cfg, sampler, Path(str(cfg.model_path)), info)
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
        npz = sample_to_npz(sampler, conditions, image_size, int(cfg.seed), out_dir / "samples.npz",
                            batch_size=int(cfg.batch_size), sampler=dict(sampler_cfg),
                            guidance_scale=scale, guidance_rescale=float(cfg.guidance_rescale), guidance=guidance,
                            autocast_dtype=sampling_precision(cfg, info, sampler.device))
    finally:
        for hook in hooks:
            hook.remove()
    seconds = time.perf_counter() - started
    batches = max(1, len(rank_batches(count, int(cfg.batch_size))[0]))  # rank 0's (the most)
    # CFG runs the conditional and unconditional halves in one batched call, so a call is one NFE here.
    cost = {"nfe": len(unet_calls) / batches, "generate_s": seconds, "images_per_s": count / seconds}
    if distributed.rank() == 0:
        write_manifest(out_dir / "manifest.json", {
            "command": OmegaConf.to_container(cfg, resolve=True), "sampler": sampler_cfg, "seed": int(cfg.seed),
            "guidance_scale": scale, "guidance_rescale": float(cfg.guidance_rescale), "guidance": guidance_record,
            "image_size": image_size, "model": str(cfg.model_path), "world_size": world,
            "batch_size": int(cfg.batch_size), "model_sha256": file_hash(Path(str(cfg.model_path))), "cost": cost,
        })
    samples = load_samples(npz)
    samples.cost = cost
    return samples


def evaluate_samples(cfg: DictConfig, samples: SampleSet) -> tuple[dict[str, Any], SampleMetrics]:
    """The metrics of ``samples`` (every rank of a distributed run calls it and measures its share)."""
    resolution, channels = samples.images.shape[1], samples.images.shape[-1]
    if cfg.image_size is not None and int(cfg.image_size) != resolution:
        raise ConfigError(f"the samples are {resolution} px but image_size={cfg.image_size}")
    measure = SampleMetrics(cfg, resolution, channels)
    metrics, skipped = measure.run(samples, [str(m) for m in cfg.metrics])
    warning = run_notes.small_sample_warning(len(samples.images), [str(m) for m in cfg.metrics], int(cfg.kid.subset_size))
    if warning and distributed.rank() == 0:
        print(warning, file=sys.stderr, flush=True)
    report = {
        "metrics": metrics,
        "skipped": skipped,
        "samples": {"source": samples.source, "n": len(samples.images), "resolution": resolution,
                    "channels": channels, "labels": samples.labels is not None},
        "reference": {"name": str(cfg.reference), "key": measure.key, "split": str(cfg.reference_split),
                      "stats": None if cfg.get("reference_stats") is None else str(cfg.reference_stats)},
        "cost": samples.cost,
    }
    return report, measure


def reference_only(cfg: DictConfig) -> SampleMetrics:
    """The measure of the reference alone (``write_reference_stats=`` without samples): its resolution is
    ``image_size`` (32 for mnist5k), its channels those of its images."""
    if cfg.image_size is None and str(cfg.reference) != "mnist5k":
        raise ConfigError("set image_size=<the resolution to compare at> to write a folder reference's statistics")
    resolution = int(cfg.image_size or 32)
    channels = reference_source(cfg, resolution, str(cfg.reference_split))[1]().shape[-1]
    return SampleMetrics(cfg, resolution, channels)


def write_reference_stats(cfg: DictConfig, measure: SampleMetrics) -> Path:
    """The reference's mu/sigma (ADM's format, plus count and extractor name) at ``write_reference_stats``, so
    later evaluations read them instead of the reference (``reference_stats=``). Every rank calls it."""
    from ldm.metrics.features import cache_identity

    stats = measure.reference_stats()
    path = Path(str(cfg.write_reference_stats))
    if distributed.rank() == 0:
        stats.save(path, **cache_identity(measure.key, measure.resolution, measure.extractor.name))
        print(f"reference statistics ({len(stats.mu)}-d {stats.feature_name}, n={stats.count}): {path}", flush=True)
    return path


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
    measure = SampleMetrics(cfg, resolution, originals.shape[-1], split="val", collective=False)
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
        fid, _ = measure.run(SampleSet(recon), ["fid"])
        metrics["rfid"] = fid["fid"]
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
    if not modes and cfg.get("write_reference_stats") is not None:
        modes = ["reference"]
    if len(modes) != 1:
        raise ConfigError(f"give exactly one of samples=, model_path=, autoencoder= (got {modes or 'none'}), or "
                          "write_reference_stats=<file.npz> alone")
    if cfg.get("reference_stats") is not None and cfg.get("write_reference_stats") is not None:
        raise ConfigError("give reference_stats= (read them) or write_reference_stats= (compute them from reference=), "
                          "not both")
    if str(cfg.get("precision", "auto")) not in ("auto", "32", "bf16", "16"):
        raise ConfigError(f"precision must be auto, 32, bf16 or 16, got {cfg.precision!r}")
    for key, valid in (("metrics", SAMPLE_METRICS), ("reconstruction_metrics", RECONSTRUCTION_METRICS)):
        unknown = sorted({str(m) for m in cfg[key]} - set(valid))
        if unknown:
            raise ConfigError(f"unknown {key} {unknown}; choose from {list(valid)}")
    if str(cfg.features) not in ("judge", "inception"):
        raise ConfigError(f"features must be 'judge' or 'inception', got {cfg.features!r}")
    if modes[0] == "samples" and not Path(str(cfg.samples)).exists():
        raise ConfigError(run_notes.missing_samples(Path(str(cfg.samples))))
    if cfg.get("reference_stats") is not None:
        check_reference_stats(cfg)
    return modes[0]


def check_reference_stats(cfg: DictConfig) -> None:
    """``reference_stats=`` readable and as wide as the features, checked before any sample is drawn."""
    from ldm.metrics import FeatureStats
    from ldm.metrics.classifier import JudgeArch

    path = Path(str(cfg.reference_stats))
    if not path.is_file():
        raise ConfigError(f"reference_stats={path} does not exist (write it with write_reference_stats=<file.npz>)")
    width = {"judge": JudgeArch().feature_dim, "inception": 2048}[str(cfg.features)]
    dim = len(FeatureStats.load(path).mu)
    if dim != width:
        raise ConfigError(f"reference_stats={path} holds {dim}-d statistics but features={cfg.features} gives "
                          f"{width}-d features: use statistics of the same features (write_reference_stats=...)")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured evaluation; writes ``metrics.json`` to ``out_dir`` and returns the report."""
    mode = check_config(cfg)
    set_tf32(cfg.get("tf32"))
    # Under torchrun the ranks share the sampling and the feature extraction; the autoencoder mode is rank 0's alone.
    distributed.init_from_environment()
    if mode == "autoencoder" and distributed.rank() != 0:
        return {}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    if mode == "reference":
        return {"written": [str(write_reference_stats(cfg, reference_only(cfg)))]}
    measure = None
    if mode == "autoencoder":
        report = evaluate_autoencoder(cfg)
    else:
        samples = load_samples(cfg.samples) if mode == "samples" else generate(cfg, out_dir)
        report, measure = evaluate_samples(cfg, samples)
    if measure is not None and cfg.get("write_reference_stats") is not None:
        report["reference"]["stats_written"] = str(write_reference_stats(cfg, measure))
    if distributed.rank() != 0:
        return {}  # rank 0 reports the numbers every rank holds
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
