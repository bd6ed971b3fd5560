"""What the sample metrics need from each image, taken batch by batch as the images arrive, on the rank that
drew or read them: features (FID, KID, precision/recall), the judge's predictions (accuracy), Inception logits
(IS) and CLIP score sums. Ranks then exchange these (a few KB per image), never the images themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldm.metrics.classifier import judge_input
from ldm.metrics.features import FeatureExtractor, gather_rows


class MetricUnavailable(Exception):
    """A metric that cannot run here (weights or inputs missing): reported under ``skipped``, not raised."""


class Observations:
    """One set's per-image observations for the metrics ``names``, on this rank; :meth:`gather` joins the ranks'.

    ``extractor``, ``judge``, ``logits`` and ``clip`` are zero-argument factories, called once and only for the
    metrics that need them (a judge trains on a cache miss; the Inception and CLIP networks are large).
    """

    def __init__(self, names: list[str], extractor: Callable[[], FeatureExtractor], judge: Callable[[], Any],
                 logits: Callable[[], torch.nn.Module], clip: Callable[[], Any], device: torch.device) -> None:
        self.names, self.device, self.skipped = list(names), device, {}
        self.parts: dict[str, list[torch.Tensor]] = {"features": [], "predictions": [], "labels": [], "logits": []}
        self.nets: dict[str, Any] = {}
        wanted = {"features": {"fid", "kid", "pr"}, "judge": {"accuracy"}, "logits": {"is"}, "clip": {"clip_score"}}
        for key, factory in (("features", extractor), ("judge", judge), ("logits", logits), ("clip", clip)):
            users = [n for n in self.names if n in wanted[key]]
            if not users:
                continue
            try:
                self.nets[key] = factory()
            except MetricUnavailable as err:
                self.skipped.update({n: str(err) for n in users})
        self.count = 0

    def wants(self, name: str) -> bool:
        return name in self.names and name not in self.skipped

    def update(self, images: np.ndarray, labels: Any = None, prompts: list[str] | None = None) -> None:
        """Observe a batch of uint8 (B, H, W, C) images (with the labels/prompts they were generated for)."""
        # A copy: a slice of a read-only memory map cannot back a tensor.
        images = np.array(images[..., None] if images.ndim == 3 else images)
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
        self.count += len(images)
        with torch.no_grad():
            if "features" in self.nets:
                self.parts["features"].append(self.nets["features"](batch.to(self.device)).float().cpu())
            if "judge" in self.nets and labels is not None:
                self.parts["predictions"].append(self.nets["judge"].predict(judge_input(images).to(self.device)).cpu())
                self.parts["labels"].append(torch.as_tensor(labels).long().flatten().cpu())
            if "logits" in self.nets:
                self.parts["logits"].append(self.nets["logits"](batch.to(self.device)).float().cpu())
            if "clip" in self.nets and prompts:
                pictures = batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch
                self.nets["clip"].update(pictures.to(self.device), list(prompts))

    def gather(self, collective: bool = True) -> dict[str, torch.Tensor]:
        """Every rank's observations joined in rank order (a collective: every rank calls it)."""
        keys = {"features": ["features"], "judge": ["predictions", "labels"], "logits": ["logits"]}
        joined = {"count": gather_rows(torch.tensor([self.count]), collective).sum()}
        for net, names in keys.items():
            for key in names if net in self.nets else []:
                parts = self.parts[key]
                width = (self.nets["features"].num_features,) if key == "features" else (1008,) if key == "logits" else ()
                dtype = torch.long if net == "judge" else parts[0].dtype if parts else torch.float32
                local = torch.cat(parts) if parts else torch.zeros((0, *width), dtype=dtype)
                joined[key] = gather_rows(local.to(dtype), collective)
        if "clip" in self.nets:  # torchmetrics keeps the sum of per-image scores and their count
            metric = self.nets["clip"]
            local = torch.tensor([[float(metric.score), float(metric.n_samples)]], dtype=torch.float64)
            joined["clip"] = gather_rows(local, collective).sum(0)
        return joined
