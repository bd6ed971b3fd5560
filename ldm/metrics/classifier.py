"""A small digit classifier: the "judge" of class-conditional samples and the MNIST feature extractor.

Conditional accuracy (the share of samples generated for class c that the judge labels c) measures how
well a class-conditional model follows its label, the classifier-based check of Dhariwal & Nichol 2021
(classifier guidance) and of CFG ablations (Ho & Salimans 2022). The judge's penultimate layer also serves
as the feature space for FID/KID/precision-recall on MNIST, where no Inception network is available
offline and ImageNet features say little about grey digits.

The judge is trained on the MNIST-5k train split only, so its accuracy on the val split is an honest
estimate of how often it is right about a real digit; that accuracy is stored with the cached weights.

The MNIST-5k judge is shipped trained (``ldm/metrics/judges``), as Inception's weights are for ImageNet FID:
its features are the unit of every FID/precision/recall on digits, and training is deterministic only on one
CPU. The same code on another CPU (other float kernels) lands on other weights whose FIDs differ (the
default model's CFG 1.75 samples: 12.0 under one machine's judge, 23-28 under another's), so figures from two
machines could not be compared. Other data, another architecture or schedule trains its own and caches it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.metrics.features import module_fingerprint, to_uint8_nhwc

_CACHE_FORMAT = "digit-judge-v1"  # bump when training code changes in a way the hyper-parameters do not show
SHIPPED_JUDGES = Path(__file__).with_name("judges")  # judge-<key[:16]>.safetensors, used when the key matches


@dataclass(frozen=True)
class JudgeArch:
    """Network shape; part of the cache key."""

    channels: tuple[int, ...] = (16, 32, 64)
    feature_dim: int = 128
    dropout: float = 0.3
    num_classes: int = 10


@dataclass(frozen=True)
class JudgeTrainConfig:
    """Optimisation and augmentation; part of the cache key."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift_px: float = 2.0
    max_rotation_deg: float = 10.0
    seed: int = 0
    # Intra-op threads while training: for convs this small, extra threads cost more in synchronisation than
    # they save (measured ~5x more CPU time with 2 threads than with 1 on a loaded 2-core machine).
    num_threads: int = 1


class DigitJudge(nn.Module):
    """Conv(3x3)-BN-ReLU-MaxPool blocks on a 32x32 grey digit, then a ``feature_dim`` embedding and a
    linear classifier. Input (B, 1, 32, 32) or (B, 1, 28, 28) in [-1, 1]; 28x28 is padded with background.
    """

    def __init__(
        self,
        channels: tuple[int, ...] | list[int] = (16, 32, 64),
        feature_dim: int = 128,
        dropout: float = 0.3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not 1 <= len(channels) <= 5:
            raise ValueError(f"channels needs 1..5 conv widths (each halves 32x32), got {channels}")
        blocks, in_channels = [], 1
        for width in channels:
            blocks += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = width
        self.conv = nn.Sequential(*blocks)
        side = 32 // 2 ** len(channels)
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels * side * side, feature_dim)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        # Filled by train_judge / load_or_train_judge: held-out accuracy and how it was obtained.
        self.val_accuracy: float | None = None
        self.train_info: dict[str, float | int | str] = {}

    @staticmethod
    def _to_32(x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-2:] not in ((28, 28), (32, 32)):
            raise ValueError(f"the judge takes (B, 1, 28|32, 28|32) images in [-1, 1], got {tuple(x.shape)}")
        if x.shape[-1] == 28:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # -1 is the black background
        return x

    def features(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, feature_dim)
        # Pre-activation embedding: after a ReLU some units are exactly 0 for all digits, which makes the
        # feature covariance singular for FID; the linear output keeps every dimension informative.
        return self.embed(self.conv(self._to_32(x)))

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, H, W) -> (B, num_classes) logits
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:  # (B,) long
        was_training = self.training
        self.eval()
        predictions = [self(chunk).argmax(dim=1) for chunk in x.split(batch_size)]
        self.train(was_training)
        return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def judge_input(images: np.ndarray | Tensor) -> Tensor:
    """Any accepted image format (see :func:`~ldm.metrics.features.to_uint8_nhwc`) -> float (B, 1, H, W) in
    [-1, 1], quantised to 8 bits as the feature extractors see it."""
    pixels = to_uint8_nhwc(images)
    if pixels.shape[-1] != 1:
        raise ValueError(f"the digit judge takes single-channel images, got {pixels.shape[-1]} channels")
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _labels_tensor(labels: np.ndarray | Tensor, count: int) -> Tensor:
    labels = torch.as_tensor(labels).long().flatten()
    if len(labels) != count:
        raise ValueError(f"got {count} images but {len(labels)} labels")
    return labels


def conditional_accuracy(
    judge: DigitJudge, images: np.ndarray | Tensor, labels: np.ndarray | Tensor
) -> float:
    """Share of ``images`` the judge assigns to their intended ``labels``."""
    inputs = judge_input(images)
    targets = _labels_tensor(labels, len(inputs))
    if len(inputs) == 0:
        raise ValueError("conditional_accuracy needs at least one image")
    device = next(judge.parameters()).device
    predictions = judge.predict(inputs.to(device)).cpu()
    return float((predictions == targets).double().mean())


def conditional_accuracy_report(
    judge: DigitJudge,
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    judge_name: str | None = None,
) -> dict[str, float | int | str]:
    """:func:`conditional_accuracy` with the sample count and the judge's own val accuracy alongside."""
    report: dict[str, float | int | str] = {
        "cond_acc": conditional_accuracy(judge, images, labels),
        "cond_acc_n": len(images),
        "judge": judge_name or f"digit-judge-{module_fingerprint(judge)}",
    }
    if judge.val_accuracy is not None:
        report["judge_val_acc"] = judge.val_accuracy
    return report


def _augment(x: Tensor, config: JudgeTrainConfig, generator: torch.Generator) -> Tensor:
    """Random rotation and shift of each digit (B, 1, 32, 32), background kept at -1."""
    batch = len(x)
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(config.max_rotation_deg)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (2.0 * config.max_shift_px / x.shape[-1])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 so the zero padding grid_sample applies outside the image becomes background (-1) again.
    return F.grid_sample(x + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


@torch.enable_grad()  # callers may sit under no_grad (sampling, evaluation); training needs autograd
def train_judge(
    images: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    val_images: np.ndarray | Tensor | None = None,
    val_labels: np.ndarray | Tensor | None = None,
    arch: JudgeArch | None = None,
    config: JudgeTrainConfig | None = None,
) -> DigitJudge:
    """Train a :class:`DigitJudge` (AdamW + one-cycle LR, shift/rotation augmentation), deterministic in
    ``config.seed``. With a val set, ``judge.val_accuracy`` holds the held-out accuracy afterwards."""
    arch, config = arch or JudgeArch(), config or JudgeTrainConfig()
    inputs = DigitJudge._to_32(judge_input(images))
    targets = _labels_tensor(labels, len(inputs))
    if len(inputs) == 0 or targets.min() < 0 or targets.max() >= arch.num_classes:
        raise ValueError(f"need a non-empty training set with labels in [0, {arch.num_classes - 1}]")
    start_time = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        judge = _fit(inputs, targets, arch, config)
    finally:
        torch.set_num_threads(previous_threads)
    judge.train_info = {"train_n": len(inputs), "train_seconds": time.perf_counter() - start_time}
    if val_images is not None and len(val_images) > 0:
        if val_labels is None:
            raise ValueError("val_images were given without val_labels")
        judge.val_accuracy = conditional_accuracy(judge, val_images, val_labels)
        judge.train_info.update(val_accuracy=judge.val_accuracy, val_n=len(val_images))
    return judge


def _fit(inputs: Tensor, targets: Tensor, arch: JudgeArch, config: JudgeTrainConfig) -> DigitJudge:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # weight init and dropout masks
        generator = torch.Generator().manual_seed(config.seed)  # batch order and augmentation
        judge = DigitJudge(arch.channels, arch.feature_dim, arch.dropout, arch.num_classes)
        optimizer = torch.optim.AdamW(judge.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(inputs) / config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
        )
        judge.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for batch_indices in order.split(config.batch_size):
                batch = _augment(inputs[batch_indices], config, generator)
                loss = F.cross_entropy(judge(batch), targets[batch_indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return judge.eval()


def judge_cache_key(
    train_images: np.ndarray | Tensor,
    train_labels: np.ndarray | Tensor,
    val_images: np.ndarray | Tensor,
    val_labels: np.ndarray | Tensor,
    arch: JudgeArch,
    config: JudgeTrainConfig,
) -> str:
    """sha256 over the exact training/val data, architecture and hyper-parameters."""
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    for array in (train_images, train_labels, val_images, val_labels):
        array = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, Tensor) else array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({"arch": asdict(arch), "train": asdict(config)}, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class _Mnist5kSplit:
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    source: str = "mnist5k"


def _mnist5k_split(val_fraction: float, split_seed: int) -> _Mnist5kSplit:
    from ldm.data.mnist5k import load_mnist5k_arrays, stratified_split

    images, labels = load_mnist5k_arrays()
    train_idx, val_idx = stratified_split(labels, val_fraction, split_seed)
    return _Mnist5kSplit(images[train_idx], labels[train_idx], images[val_idx], labels[val_idx])


def _load_judge_file(path: Path, key: str, arch: JudgeArch) -> DigitJudge | None:
    """The judge stored at ``path`` if it holds ``key``'s weights, else None (absent, or another key)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("cache_key") != key:
            return None
        judge = DigitJudge(arch.channels, arch.feature_dim, arch.dropout, arch.num_classes)
        judge.load_state_dict({name: handle.get_tensor(name) for name in handle.keys()})
    judge.eval()
    judge.train_info = json.loads(metadata["train_info"])
    judge.val_accuracy = judge.train_info.get("val_accuracy")
    return judge


def load_or_train_judge(
    cache_dir: str | os.PathLike,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    arch: JudgeArch | None = None,
    config: JudgeTrainConfig | None = None,
    shipped: bool = True,
) -> DigitJudge:
    """The judge for a dataset, trained once and cached as safetensors keyed by :func:`judge_cache_key`.

    Defaults to MNIST-5k with the same stratified split as ``MNIST5kDataModule`` (val_fraction 0.1,
    seed 0), so the judge never trains on the digits the val accuracy is measured on. ``images``/``labels``
    replace the dataset (uint8 (N, 28|32, 28|32) digits, split the same way). A judge shipped with the
    package for the same key is used first (``shipped=False`` skips it: a test of training itself).
    """
    from safetensors.torch import save_file

    from ldm.data.mnist5k import stratified_split

    arch, config = arch or JudgeArch(), config or JudgeTrainConfig()
    if (images is None) != (labels is None):
        raise ValueError("pass both images and labels, or neither (MNIST-5k)")
    if images is None:
        split = _mnist5k_split(val_fraction, split_seed)
    else:
        train_idx, val_idx = stratified_split(np.asarray(labels), val_fraction, split_seed)
        split = _Mnist5kSplit(
            images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], "custom"
        )
    key = judge_cache_key(
        split.train_images, split.train_labels, split.val_images, split.val_labels, arch, config
    )
    name = f"judge-{key[:16]}.safetensors"
    path = Path(cache_dir) / name
    for candidate in ([SHIPPED_JUDGES / name] if shipped else []) + [path]:
        judge = _load_judge_file(candidate, key, arch)
        if judge is not None:
            return judge
    judge = train_judge(
        split.train_images, split.train_labels, split.val_images, split.val_labels, arch, config
    )
    judge.train_info["data"] = split.source
    metadata = {
        "cache_key": key,
        "train_info": json.dumps(judge.train_info),
        "arch": json.dumps(asdict(arch)),
        "train_config": json.dumps(asdict(config)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # Written then renamed, so concurrent runs or a crash never leave a half-written cache entry.
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return judge
