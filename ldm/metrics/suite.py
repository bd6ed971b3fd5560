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

from ldm.errors import ConfigError
from ldm.metrics import (
    FeatureExtractor,
    InceptionFeatures,
    JudgeFeatures,
    conditional_accuracy_report,
    fid_torchmetrics,
    kid_torchmetrics,
    load_or_train_judge,
    precision_recall,
    reference_features,
    reference_stats,
)

SAMPLE_METRICS = ("fid", "kid", "pr", "accuracy", "is", "clip_score")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MetricUnavailable(Exception):
    """A metric that cannot run here (weights or inputs missing): reported under ``skipped``, not raised."""


@dataclass
class SampleSet:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None = None  # (N,) int, the class each sample was generated for
    prompts: list[str] | None = None
    source: str = ""
    cost: dict[str, float] = field(default_factory=dict)  # generation cost (nfe, seconds) in model mode


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ConfigError(
            f"{what} has dtype {images.dtype}; samples must be uint8 (N, H, W, C) in [0, 255] (the ADM "
            "evaluator format): convert float (N, C, H, W) images in [-1, 1] with ldm.metrics.to_uint8_nhwc"
        )
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise ConfigError(f"{what} must be square (N, H, W, C) images with C in {{1, 3}}, got {images.shape}")
    if len(images) < 2:
        raise ConfigError(f"{what} holds {len(images)} image(s); the metrics need at least 2")
    return np.ascontiguousarray(images)


def read_image_folder(path: Path, size: int | None = None) -> np.ndarray:
    """A folder of images (recursive) -> uint8 (N, H, W, C); grey only when every file is grey.
    With ``size``: shorter side resized to it, then a centre crop (the data modules' geometry)."""
    from PIL import Image, ImageOps

    from ldm.data.folder import scan_image_files

    files, _ = scan_image_files(path, IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    grey = True
    for f in files:  # headers only: one file open at a time
        with Image.open(f) as image:
            grey &= len(image.getbands()) == 1 and image.mode != "P"
    arrays = []
    for f in files:
        with Image.open(f) as image:
            image = image.convert("L" if grey else "RGB")
            arrays.append(np.asarray(image if size is None else ImageOps.fit(image, (size, size), Image.BICUBIC)))
    if len({a.shape for a in arrays}) > 1:
        raise ConfigError(f"images under {path} differ in size ({sorted({a.shape for a in arrays})[:4]}...)")
    return check_images(np.stack(arrays), f"images under {path}")


def load_samples(path: str | Path) -> SampleSet:
    """A ``samples.npz`` (``arr_0`` uint8 NHWC, optional ``labels``/``prompts``) or a folder of images."""
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
        images = check_images(stored["arr_0"], f"{path}: arr_0")
        labels = stored["labels"] if "labels" in stored.files else None
        prompts = [str(p) for p in stored["prompts"].tolist()] if "prompts" in stored.files else None
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
    """Measures sample sets against one reference (cached) under one feature extractor."""

    def __init__(self, cfg: DictConfig, resolution: int, channels: int, split: str | None = None) -> None:
        self.cfg, self.resolution, self.channels = cfg, resolution, channels
        self.key, self.images_fn = reference_source(cfg, resolution, split or str(cfg.reference_split))
        self.cache_dir = str(cfg.paths.cache_dir)
        self.batch_size = int(cfg.batch_size)

    @functools.cached_property
    def judge(self) -> torch.nn.Module:
        if self.channels != 1 or self.resolution not in (28, 32):
            raise MetricUnavailable(
                f"the digit judge takes 1-channel 28/32 px digits, these are {self.channels}-channel {self.resolution} px"
            )
        with torch.enable_grad():  # a cache miss trains the judge, possibly called from a no_grad context
            return load_or_train_judge(self.cache_dir).to(device())

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

    def _reference(self, fn: Callable) -> Any:
        return fn(self.key, self.resolution, self.extractor, self.images_fn, self.cache_dir, self.batch_size)

    def fid(self, s: SampleSet) -> dict[str, Any]:
        r = fid_torchmetrics(self.extractor, s.images, self._reference(reference_stats), self.batch_size)
        return {"value": r["fid"], "n": r["fid_n"], "ref_n": r["fid_ref_n"], "features": r["features"]}

    def kid(self, s: SampleSet) -> dict[str, Any]:
        kid = self.cfg.kid
        r = kid_torchmetrics(self.extractor, s.images, self._reference(reference_features), int(kid.subsets),
                             int(kid.subset_size), batch_size=self.batch_size)
        return {"value": r["kid_mean"], "std": r["kid_std"], "n": r["kid_n"], "ref_n": r["kid_ref_n"],
                "subsets": r["kid_subsets"], "subset_size": r["kid_subset_size"], "features": r["features"]}

    def pr(self, s: SampleSet) -> dict[str, Any]:
        fake = self.extractor.extract(s.images, self.batch_size)
        r = precision_recall(self._reference(reference_features), fake, self.extractor.name, k=int(self.cfg.pr_k))
        return {"precision": r["precision"], "recall": r["recall"], "n": r["pr_n"], "ref_n": r["pr_ref_n"],
                "k": r["pr_k"], "features": r["features"]}

    def accuracy(self, s: SampleSet) -> dict[str, Any]:
        if s.labels is None:
            raise MetricUnavailable("the samples carry no labels (the class each one was generated for)")
        r = conditional_accuracy_report(self.judge, s.images, s.labels)
        return {"value": r["cond_acc"], "n": r["cond_acc_n"], "features": r["judge"],
                "judge_val_acc": r.get("judge_val_acc")}

    def inception_score(self, s: SampleSet, splits: int = 10) -> dict[str, Any]:
        from torchmetrics.image.inception import InceptionScore

        metric = InceptionScore(feature=_InceptionLogits(self.cfg.inception_weights), splits=splits,
                                sync_on_compute=False).to(device())
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # compute() shuffles before splitting
            for batch in np.array_split(s.images, max(1, len(s.images) // self.batch_size)):
                metric.update(torch.from_numpy(batch).permute(0, 3, 1, 2).to(device()))
            mean, std = metric.compute()
        return {"value": float(mean), "std": float(std), "n": len(s.images), "splits": splits,
                "features": "inception-v3-logits"}

    def clip_score(self, s: SampleSet) -> dict[str, Any]:
        if not s.prompts:
            raise MetricUnavailable("the samples carry no prompts")
        if self.cfg.clip_model is None:
            raise MetricUnavailable("no CLIP model: set clip_model=<local Hugging Face CLIP folder>")
        from torchmetrics.multimodal.clip_score import CLIPScore

        try:
            metric = CLIPScore(model_name_or_path=str(self.cfg.clip_model), sync_on_compute=False).to(device())
        except Exception as err:  # missing files, no network: the metric is unavailable, the rest still runs
            raise MetricUnavailable(f"could not load CLIP model {self.cfg.clip_model}: {err}") from err
        with torch.no_grad():
            for start in range(0, len(s.images), self.batch_size):
                batch = torch.from_numpy(s.images[start : start + self.batch_size]).permute(0, 3, 1, 2)
                batch = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
                metric.update(batch.to(device()), s.prompts[start : start + self.batch_size])
            value = metric.compute()
        return {"value": float(value), "n": len(s.images), "features": str(self.cfg.clip_model)}

    def run(self, s: SampleSet, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """``({name: result}, {name: why it was skipped})`` for the metrics in ``names`` (SAMPLE_METRICS)."""
        results, skipped = {}, {}
        for name in names:
            method = self.inception_score if name == "is" else getattr(self, name)
            try:
                results[name] = method(s)
            except MetricUnavailable as err:
                skipped[name] = str(err)
        return results, skipped


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
