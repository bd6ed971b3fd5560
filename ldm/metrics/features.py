"""Feature extractors for FID / KID / precision-recall, and a disk cache for reference-set features.

Canonical image format: ``uint8`` NHWC numpy arrays in [0, 255], the convention of the ADM evaluator
(Dhariwal & Nichol 2021, ``guided-diffusion/evaluations``). Every extractor accepts that, and
:func:`to_uint8_nhwc` converts the other format in this project (float NCHW in [-1, 1], the DataModule
and sampler convention) with the same rounding the ADM evaluator uses, so real and generated images are
quantised identically before features are taken.

An extractor is an ``nn.Module`` whose ``forward`` takes a ``uint8`` NCHW tensor and returns ``(B, D)``
features, exactly what ``torchmetrics`` expects from a custom ``feature`` module, and whose ``name``
identifies the network and its weights in reports and cache keys.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ldm import distributed

# Where torch-fidelity's own downloader puts the FID Inception weights; reused so one download serves both.
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_ENV = "LDM_INCEPTION_WEIGHTS"


def to_uint8_nhwc(images: np.ndarray | Tensor) -> np.ndarray:
    """Convert images to the canonical ``uint8`` (N, H, W, C) numpy array.

    ``uint8`` input (numpy or torch) is taken as NHWC, or NHW for single-channel images.
    Floating input is taken as NCHW in [-1, 1]; it is mapped with ``round((x + 1) * 127.5)`` and clipped,
    as the ADM evaluator does with samples, so out-of-range generator outputs saturate instead of wrapping.
    """
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype == np.uint8:
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"uint8 images must be (N, H, W) or (N, H, W, C) with C in {{1, 3}}, got {images.shape}; "
                "float images are expected as (N, C, H, W) in [-1, 1]"
            )
        return np.ascontiguousarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"float images must be (N, C, H, W) with C in {{1, 3}}, got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf; the generator output is broken, not just out of range")
    out = np.empty((images.shape[0], *images.shape[2:], images.shape[1]), dtype=np.uint8)
    # In blocks: the float64 intermediate then costs a block, not a second copy of the whole set.
    for start in range(0, len(images), 256):
        block = images[start : start + 256].astype(np.float64)
        out[start : start + 256] = np.clip(np.round((block + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return out


def gather_rows(local: torch.Tensor, collective: bool = True) -> torch.Tensor:
    """The rows of ``local`` (N_r, ...) of every rank, in rank order, on the CPU (``local`` itself on a single
    process). Tensors travel through ``all_gather`` (padded to the longest share), never pickled."""
    if not collective or not distributed.is_distributed():
        return local.cpu()
    import torch.distributed as dist

    device = distributed.local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.to(device)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(distributed.world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=device))
    sizes = [int(c) for c in counts]
    if not max(sizes):
        return local.cpu()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def extract_features(extractor: FeatureExtractor, images: Any, rows: range, batch_size: int) -> torch.Tensor:
    """float32 (len(rows), D) features of ``images[rows]`` (uint8 NHWC, any sliceable array), a batch at a time."""
    chunks = [torch.zeros((0, extractor.num_features))]
    device = next(extractor.parameters()).device
    with torch.no_grad():
        for start in range(rows.start, rows.stop, batch_size):
            batch = np.array(images[start : min(rows.stop, start + batch_size)])  # a copy: memory maps are read-only
            batch = torch.from_numpy(batch[..., None] if batch.ndim == 3 else batch).permute(0, 3, 1, 2)
            chunks.append(extractor(batch.to(device)).float().cpu())
    return torch.cat(chunks)


def module_fingerprint(module: nn.Module, length: int = 12) -> str:
    """Short hash of a module's state dict, so a feature name changes whenever the weights do."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:length]


class FeatureExtractor(nn.Module):
    """Base class: ``forward(uint8 NCHW tensor) -> (B, D)``; :meth:`extract` batches canonical input."""

    name: str
    num_features: int  # torchmetrics reads this instead of probing the network with a dummy image

    @torch.no_grad()
    def extract(self, images: np.ndarray | Tensor, batch_size: int = 256) -> np.ndarray:
        """Features of ``images`` (canonical uint8 NHWC, or float NCHW in [-1, 1]) as float64 (N, D)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = to_uint8_nhwc(images)
        device = next(self.parameters()).device
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(device)
            chunks.append(self(batch).double().cpu().numpy())
        if not chunks:
            return np.zeros((0, self.num_features), dtype=np.float64)
        return np.concatenate(chunks)


def _check_uint8_nchw(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"feature extractors take uint8 (B, C, H, W) tensors, got {images.dtype} {tuple(images.shape)}; "
            "use .extract() or to_uint8_nhwc() for other formats"
        )


class JudgeFeatures(FeatureExtractor):
    """Penultimate-layer features of the digit judge (:class:`ldm.metrics.classifier.DigitJudge`).

    The Inception network has never seen 32x32 grey digits; a classifier trained on the data itself gives
    features that separate digit shapes, the usual substitute for FID on MNIST-like data.
    """

    def __init__(self, judge: nn.Module, name: str | None = None) -> None:
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.num_features = int(judge.feature_dim)
        self.name = name or f"judge{self.num_features}-{module_fingerprint(judge)}"

    def train(self, mode: bool = True) -> JudgeFeatures:
        # Dropout must stay off even when a parent module (e.g. a torchmetrics Metric) calls .train().
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:  # (B, 1, H, W) uint8 -> (B, D)
        _check_uint8_nchw(images)
        if images.shape[1] != 1:
            raise ValueError(f"the digit judge takes single-channel images, got {images.shape[1]} channels")
        return self.judge.features(images.float() / 127.5 - 1.0)


def resolve_inception_weights(weights_path: str | os.PathLike | None, allow_download: bool = False) -> Path:
    """Find the FID Inception-v3 weights: argument, ``$LDM_INCEPTION_WEIGHTS``, then the torch hub dir."""
    if weights_path is not None:  # an explicit path is never silently replaced by another file
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights not found at {weights_path}")
        return Path(weights_path)
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    from_env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if from_env:
        if not Path(from_env).is_file():
            raise FileNotFoundError(f"${INCEPTION_WEIGHTS_ENV} points to {from_env}, which does not exist")
        return Path(from_env)
    if hub_path.is_file():
        return hub_path
    if allow_download:
        hub_path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(hub_path))
        return hub_path
    raise FileNotFoundError(
        "FID Inception-v3 weights are not available offline. Download "
        f"{INCEPTION_WEIGHTS_URL} on a machine with network access and either pass "
        f"InceptionFeatures(weights_path=...), set ${INCEPTION_WEIGHTS_ENV}, or copy it to {hub_path}; "
        "or construct InceptionFeatures(allow_download=True) where a network exists. "
        "For MNIST without these weights use JudgeFeatures."
    )


def _load_state_dict_safely(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class InceptionFeatures(FeatureExtractor):
    """FID Inception-v3 (TF 2015-12-05 weights via torch-fidelity; Heusel et al. 2017) pool features.

    Grey images are repeated to 3 channels; torch-fidelity resizes to 299x299 with TF1-compatible bilinear
    interpolation, so values match the reference FID implementations.
    """

    def __init__(
        self, weights_path: str | None = None, feature_dim: int = 2048, allow_download: bool = False
    ) -> None:
        super().__init__()
        if feature_dim not in (64, 192, 768, 2048):
            raise ValueError(f"feature_dim must be one of 64, 192, 768, 2048, got {feature_dim}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity: `pip install torch-fidelity` "
                "(or use JudgeFeatures, which needs no extra package)"
            ) from error
        path = resolve_inception_weights(weights_path, allow_download)
        # torch-fidelity unpickles its weights file with weights_only=False; load it ourselves with the
        # tensor-only loader and hand torch-fidelity a copy we wrote, so nothing untrusted is unpickled.
        state_dict = _load_state_dict_safely(path)
        with tempfile.TemporaryDirectory() as tmp:
            trusted_copy = Path(tmp) / "inception.pth"
            torch.save(state_dict, trusted_copy)
            self.inception = FeatureExtractorInceptionV3(
                "inception-v3-compat", [str(feature_dim)], feature_extractor_weights_path=str(trusted_copy)
            )
        self.num_features = feature_dim
        self.name = f"inception-v3-fid{feature_dim}"

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W) uint8 -> (B, D)
        _check_uint8_nchw(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        return self.inception(images.contiguous())[0].reshape(images.shape[0], -1)


# ----------------------------------------------------------------------------------------- disk cache


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` via a temp file + rename, so an interrupted run never leaves a truncated cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def reference_cache_path(
    cache_dir: str | os.PathLike, dataset_key: str, resolution: int, feature_name: str, kind: str
) -> Path:
    """Cache file for ``kind`` ('features' or 'stats') of a dataset at a resolution under an extractor."""
    return Path(cache_dir) / f"{_slug(dataset_key)}-{int(resolution)}px-{_slug(feature_name)}-{kind}.npz"


def cache_identity(dataset_key: str, resolution: int, feature_name: str) -> dict[str, np.ndarray]:
    """Identity stored inside each cache file and compared on load (slugs can collide, these cannot)."""
    return {
        "dataset_key": np.array(dataset_key),
        "resolution": np.array(int(resolution)),
        "feature_name": np.array(feature_name),
    }


def identity_matches(stored: np.lib.npyio.NpzFile, identity: dict[str, np.ndarray]) -> bool:
    return all(key in stored and stored[key].item() == value.item() for key, value in identity.items())


def cache_hit(path: Path, identity: dict[str, Any], collective: bool) -> bool:
    """Whether the reference cache at ``path`` holds ``identity``. With ``collective`` (every rank calls it)
    rank 0 decides for all: ranks that disagreed about a hit would enter different collectives."""

    def cached() -> bool:
        if not path.is_file():
            return False
        with np.load(path, allow_pickle=False) as stored:
            return identity_matches(stored, identity)

    return distributed.broadcast_object(cached()) if collective else cached()


def reference_features(
    dataset_key: str,
    resolution: int,
    extractor: FeatureExtractor,
    images_fn: Callable[[], np.ndarray | Tensor],
    cache_dir: str | os.PathLike,
    batch_size: int = 256,
    collective: bool = True,
) -> np.ndarray:
    """Features of a real dataset, computed once and cached per (dataset, resolution, extractor name).

    ``images_fn`` is only called on a cache miss; it returns the dataset's images as uint8 NHWC, any sliceable
    array (a lazily read folder included), or float NCHW in [-1, 1]. They are read a batch at a time; in a
    distributed run (``collective``: every rank calls it) each rank extracts its share, rank 0 writes the cache.
    """
    path = reference_cache_path(cache_dir, dataset_key, resolution, extractor.name, "features")
    identity = cache_identity(dataset_key, resolution, extractor.name)
    if cache_hit(path, identity, collective):
        with np.load(path, allow_pickle=False) as stored:
            return stored["features"].astype(np.float64)
    images = images_fn()
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        images = to_uint8_nhwc(images) if isinstance(images, (np.ndarray, Tensor)) else images
    if images.shape[1] != resolution or images.shape[2] != resolution:
        raise ValueError(
            f"dataset {dataset_key!r} images are {images.shape[1]}x{images.shape[2]}, "
            f"but resolution={resolution} was requested"
        )
    share = distributed.shard(len(images)) if collective else slice(0, len(images))
    local = extract_features(extractor, images, range(share.start, share.stop), batch_size)
    # Stored as float32 to halve the file; return the stored values so a hit and a miss agree bit for bit.
    features = gather_rows(local, collective).numpy().astype(np.float32)
    if not collective or distributed.rank() == 0:
        atomic_save_npz(path, features=features, **identity)
    if collective:
        distributed.barrier()
    return features.astype(np.float64)
