"""The metric suite shared by `ldm-evaluate` and the in-training SampleMetricsCallback: one place that
knows how each metric is computed, on which features, against which cached reference."""

from __future__ import annotations

import functools
import hashlib
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm import distributed
from ldm.errors import ConfigError
from ldm.metrics import (
    FeatureExtractor,
    FeatureStats,
    InceptionFeatures,
    JudgeFeatures,
    fid_from_stats,
    load_or_train_judge,
    precision_recall,
    reference_features,
    reference_stats,
)
from ldm.metrics.features import module_fingerprint
from ldm.metrics.kid import kid_torchmetrics_features
from ldm.metrics.observe import MetricUnavailable, Observations
from ldm.metrics.sample_images import IMAGE_SUFFIXES, ImageFiles, check_images, read_image_folder  # noqa: F401

SAMPLE_METRICS = ("fid", "kid", "pr", "accuracy", "is", "clip_score")


@dataclass
class SampleSet:
    images: Any  # (N, H, W, C) uint8: an array, a memory-mapped npz member or lazily read files
    labels: np.ndarray | None = None  # (N,) int, the class each sample was generated for
    prompts: list[str] | None = None
    source: str = ""
    cost: dict[str, float] = field(default_factory=dict)  # generation cost (nfe, seconds) in model mode


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_samples(path: str | Path) -> SampleSet:
    """A ``samples.npz`` (``arr_0`` uint8 NHWC, optional ``labels``/``prompts``) or a folder of images; the
    images are mapped or read lazily, never loaded whole."""
    from ldm.io.samples import open_images

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"samples={path} does not exist: give a samples.npz (ldm-sample writes one) or an image folder")
    if path.is_dir():
        return SampleSet(read_image_folder(path), source=str(path))
    try:
        stored = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"samples={path} is not a readable .npz file ({err})") from err
    if not isinstance(stored, np.lib.npyio.NpzFile):
        raise ConfigError(f"samples={path} is a single array, not an .npz archive with arr_0 (np.savez)")
    with stored:
        if "arr_0" not in stored.files:
            raise ConfigError(f"{path} has no arr_0 (keys: {stored.files}); arr_0 must hold the uint8 (N, H, W, C) images")
        labels = stored["labels"] if "labels" in stored.files else None
        prompts = [str(p) for p in stored["prompts"].tolist()] if "prompts" in stored.files else None
    images = check_images(open_images(path), f"{path}: arr_0")
    if labels is not None and (not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),)):
        raise ConfigError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    if prompts is not None and len(prompts) != len(images):
        raise ConfigError(f"{path}: {len(prompts)} prompts for {len(images)} images")
    return SampleSet(images, labels, prompts, str(path))


def reference_source(cfg: DictConfig, resolution: int, split: str) -> tuple[str, Callable[[], np.ndarray]]:
    """(cache key, images function) of the real data; the images are only loaded on a cache miss."""
    name = str(cfg.reference)
    if name == "mnist5k":
        if split not in ("train", "val"):
            raise ConfigError(f"reference_split must be train or val, got {split!r}")
        fraction, seed = float(cfg.reference_val_fraction), int(cfg.reference_seed)
        mode = "pad" if resolution >= 28 else "resize"  # as MNIST5kDataModule prepares its images

        def mnist_images() -> np.ndarray:
            from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split
            from ldm.data.tensor_images import fit_uint8_images

            images, labels = load_mnist5k_arrays()
            train_idx, val_idx = stratified_split(labels, fraction, seed)
            chosen = torch.from_numpy(images[train_idx if split == "train" else val_idx]).unsqueeze(1)
            return fit_uint8_images(chosen, resolution, mode).permute(0, 2, 3, 1).numpy()

        return f"mnist5k-{split}-vf{fraction:g}-seed{seed}-{mode}", mnist_images
    folder = Path(name)
    if not folder.is_dir():
        raise ConfigError(f"reference={name} is neither 'mnist5k' nor a folder of images")
    from ldm.data.folder import scan_image_files

    # The key changes whenever a file is added, removed or rewritten, so a stale cache is never used.
    digest = hashlib.sha256()
    for f in scan_image_files(folder, IMAGE_SUFFIXES)[0]:
        stat = f.stat()
        digest.update(f"{f.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return f"folder-{folder.resolve().name}-{digest.hexdigest()[:12]}", lambda: read_image_folder(folder, resolution)


class _InceptionLogits(torch.nn.Module):
    """torch-fidelity's FID Inception-v3 up to its unbiased logits (uint8 NCHW in), for the Inception Score
    (Salimans et al. 2016). The weights are read tensor-only and handed over as a copy we wrote."""

    def __init__(self, weights_path: str | None) -> None:
        super().__init__()
        from ldm.metrics.features import _load_state_dict_safely, resolve_inception_weights

        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise MetricUnavailable("needs torch-fidelity (pip install torch-fidelity)") from err
        try:
            path = resolve_inception_weights(weights_path)
        except FileNotFoundError as err:
            raise MetricUnavailable(f"no Inception weights (set inception_weights=<file>): {err}") from err
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(_load_state_dict_safely(path), Path(tmp) / "inception.pth")
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["logits_unbiased"], feature_extractor_weights_path=str(Path(tmp) / "inception.pth")
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) uint8 -> (B, 1008)
        return self.net(images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images)[0]


class SampleMetrics:
    """Measures sample sets against one reference (cached) under one feature extractor.

    ``collective``: every rank of a distributed run measures together (each observes its share of a set, the
    observations are gathered, a reference is extracted in shares); False measures on this process alone.
    """

    def __init__(self, cfg: DictConfig, resolution: int, channels: int, split: str | None = None,
                 collective: bool = True) -> None:
        self.cfg, self.resolution, self.channels, self.collective = cfg, resolution, channels, collective
        self.key, self.images_fn = reference_source(cfg, resolution, split or str(cfg.reference_split))
        self.cache_dir = str(cfg.paths.cache_dir)
        self.batch_size = int(cfg.batch_size)
        stats = cfg.get("reference_stats")
        self.stats_file = None if stats is None else Path(str(stats))

    @functools.cached_property
    def judge(self) -> torch.nn.Module:
        if self.channels != 1 or self.resolution not in (28, 32):
            raise MetricUnavailable(
                f"the digit judge takes 1-channel 28/32 px digits, these are {self.channels}-channel {self.resolution} px"
            )
        with torch.enable_grad():  # a cache miss trains the judge, possibly called from a no_grad context
            if self.collective and distributed.rank() != 0:
                distributed.barrier()  # rank 0 trains or loads it first; the others then read its cache
                return load_or_train_judge(self.cache_dir).to(device())
            judge = load_or_train_judge(self.cache_dir).to(device())
            if self.collective:
                distributed.barrier()
            return judge

    @functools.cached_property
    def extractor(self) -> FeatureExtractor:
        kind = str(self.cfg.features)
        if kind == "judge":
            try:
                return JudgeFeatures(self.judge)
            except MetricUnavailable as err:
                raise ConfigError(f"features=judge: {err}; use features=inception (with inception_weights=...)") from err
        if kind == "inception":
            try:
                return InceptionFeatures(weights_path=self.cfg.inception_weights).to(device())
            except (FileNotFoundError, ModuleNotFoundError) as err:
                raise ConfigError(f"features=inception (set inception_weights=<file>): {err}") from err
        raise ValueError(f"features must be 'judge' or 'inception', got {kind!r}")

    def observations(self, names: list[str], labels: bool = True, prompts: bool = True) -> Observations:
        """An empty :class:`Observations` for ``names``; feed it batches, then :meth:`finish` it."""
        observations = Observations(names, lambda: self.extractor, lambda: self.judge,
                                    lambda: _InceptionLogits(self.cfg.inception_weights).to(device()),
                                    self._clip, device())
        if "accuracy" in names and not labels:
            observations.skipped["accuracy"] = "the samples carry no labels (the class each one was generated for)"
        if "clip_score" in names and not prompts:
            observations.skipped["clip_score"] = "the samples carry no prompts"
        return observations

    def _clip(self) -> Any:
        if self.cfg.clip_model is None:
            raise MetricUnavailable("no CLIP model: set clip_model=<local Hugging Face CLIP folder>")
        from torchmetrics.multimodal.clip_score import CLIPScore

        try:
            return CLIPScore(model_name_or_path=str(self.cfg.clip_model), sync_on_compute=False).to(device())
        except Exception as err:  # missing files, no network: the metric is unavailable, the rest still runs
            raise MetricUnavailable(f"could not load CLIP model {self.cfg.clip_model}: {err}") from err

    def run(self, s: SampleSet, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """``({name: result}, {name: why it was skipped})`` for the metrics in ``names`` (SAMPLE_METRICS); the
        set is read a batch at a time, each rank reading its share when ``collective``."""
        observations = self.observations(names, s.labels is not None, bool(s.prompts))
        share = distributed.shard(len(s.images)) if self.collective else slice(0, len(s.images))
        for start in range(share.start, share.stop, self.batch_size):
            stop = min(share.stop, start + self.batch_size)
            observations.update(s.images[start:stop], None if s.labels is None else s.labels[start:stop],
                                None if s.prompts is None else s.prompts[start:stop])
        return self.finish(observations)

    def finish(self, observations: Observations) -> tuple[dict[str, Any], dict[str, str]]:
        """The metrics of everything observed on every rank (a collective when ``collective``); every rank
        returns rank 0's numbers."""
        seen = observations.gather(self.collective)
        skipped = dict(observations.skipped)
        wants = [n for n in observations.names if n not in skipped]
        if self.stats_file is not None:
            for name in ("kid", "pr"):
                if name in wants:
                    wants.remove(name)
                    skipped[name] = "reference_stats holds only mu/sigma; kid and pr need the reference images"
        stats = reference = None
        if "fid" in wants:
            stats = self.reference_stats()
        if "kid" in wants or "pr" in wants:
            reference = reference_features(self.key, self.resolution, self.extractor, self.images_fn,
                                           self.cache_dir, self.batch_size, self.collective)

        def compute() -> dict[str, Any]:
            return {name: self._compute(name, seen, stats, reference) for name in wants}

        results = distributed.on_rank_zero(compute, "measuring the samples") if self.collective else compute()
        return results, skipped

    def reference_stats(self) -> FeatureStats:
        """The reference's Gaussian: from ``reference_stats=<npz>`` when given, else computed (and cached)."""
        if self.stats_file is None:
            return reference_stats(self.key, self.resolution, self.extractor, self.images_fn, self.cache_dir,
                                   self.batch_size, self.collective)
        if not self.stats_file.is_file():
            raise ConfigError(f"reference_stats={self.stats_file} does not exist")
        stats = FeatureStats.load(self.stats_file, feature_name=self.extractor.name)
        dim = self.extractor.num_features
        if len(stats.mu) != dim:
            raise ConfigError(f"reference_stats={self.stats_file} holds {len(stats.mu)}-d statistics but "
                              f"features={self.cfg.features} gives {dim}-d features ({self.extractor.name}): use stats "
                              "written with the same features (ldm-evaluate write_reference_stats=...)")
        if stats.feature_name != self.extractor.name:
            raise ConfigError(f"reference_stats={self.stats_file} was written with {stats.feature_name}, these "
                              f"features are {self.extractor.name}: write them again with the same features")
        return stats

    def _compute(self, name: str, seen: dict[str, torch.Tensor], stats: FeatureStats | None,
                 reference: np.ndarray | None) -> dict[str, Any]:
        count = int(seen["count"])
        if name in ("fid", "kid", "pr"):
            fake, feature_name = seen["features"].double().numpy(), self.extractor.name
        if name == "fid":
            r = fid_from_stats(stats, FeatureStats.from_features(fake, feature_name))
            return {"value": r["fid"], "n": r["fid_n"], "ref_n": r["fid_ref_n"], "features": r["features"]}
        if name == "kid":
            kid = self.cfg.kid
            r = kid_torchmetrics_features(self.extractor, fake, reference, int(kid.subsets), int(kid.subset_size))
            return {"value": r["kid_mean"], "std": r["kid_std"], "n": r["kid_n"], "ref_n": r["kid_ref_n"],
                    "subsets": r["kid_subsets"], "subset_size": r["kid_subset_size"], "features": r["features"]}
        if name == "pr":
            r = precision_recall(reference, fake, feature_name, k=int(self.cfg.pr_k))
            return {"precision": r["precision"], "recall": r["recall"], "n": r["pr_n"], "ref_n": r["pr_ref_n"],
                    "k": r["pr_k"], "features": r["features"]}
        if name == "accuracy":
            predictions, labels = seen["predictions"], seen["labels"]
            result = {"value": float((predictions == labels).double().mean()), "n": len(labels),
                      "features": f"digit-judge-{module_fingerprint(self.judge)}"}
            return {**result, "judge_val_acc": getattr(self.judge, "val_accuracy", None)}
        if name == "is":
            return self._inception_score(seen["logits"])
        if name == "clip_score":
            total, n = seen["clip"].tolist()
            return {"value": total / max(n, 1.0), "n": int(n), "features": str(self.cfg.clip_model)}
        raise ValueError(f"unknown metric {name!r}; choose from {list(SAMPLE_METRICS)} ({count} samples)")

    def _inception_score(self, logits: torch.Tensor, splits: int = 10) -> dict[str, Any]:
        from torchmetrics.image.inception import InceptionScore

        metric = InceptionScore(feature=torch.nn.Identity(), splits=splits, sync_on_compute=False)
        metric.features.append(logits)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # compute() shuffles before splitting
            mean, std = metric.compute()
        return {"value": float(mean), "std": float(std), "n": len(logits), "splits": splits,
                "features": "inception-v3-logits"}


def evaluation_config(cache_dir: str, reference: str = "mnist5k", features: str = "judge", batch_size: int = 256) -> DictConfig:
    """The subset of ldm-evaluate's config (conf/evaluate.yaml) that :class:`SampleMetrics` reads, for
    measurements made inside training with ldm-evaluate's defaults (same reference split and cache keys)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "reference": reference, "reference_split": "train", "reference_val_fraction": 0.1, "reference_seed": 0,
        "features": features, "inception_weights": None, "clip_model": None, "pr_k": 3,
        "kid": {"subsets": 100, "subset_size": 1000}, "batch_size": batch_size, "paths": {"cache_dir": str(cache_dir)},
    })


def flat_metrics(metrics: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """``{fid: {value, n, ...}}`` -> ``{eval/fid, eval/fid_n, ...}`` (numbers only), for wandb summaries."""
    return {
        prefix + name + ("" if key == "value" else f"_{key}"): value
        for name, entry in metrics.items()
        for key, value in entry.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
