"""SDXL's size and crop micro-conditioning (Podell et al. 2023, sec. 2.2-2.3): the model is told each training
image's original size, where it was cropped and the bucket it was shaped to, so it can learn from small and
cropped images without copying their blur or cut-off framing, and be asked for clean, centred ones at sampling.

Each scalar is embedded with the sinusoidal (Fourier) features of the timestep embedding, ``dim`` per scalar
(SDXL: 256), and the features are concatenated into one vector (B, 2 * len(keys) * dim) that the backbone adds
to its timestep embedding through its ``label_emb`` MLP (``UNetModel(adm_in_channels=...)``), as sgm's
``ConcatTimestepEmbedderND``. The batch keys are those :mod:`ldm.data.buckets` writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.nets.conditioners import Embedder
from ldm.nets.unet import timestep_embedding

DEFAULT_KEYS = ("original_size", "crop_coords", "target_size")


class SizeEmbedder(Embedder):
    """Pairs of integers read from the batch -> (B, 2 * len(keys) * dim) Fourier features, output kind 'vector'.

    keys: batch keys holding (B, 2) pairs, in the order their features are concatenated (SDXL's order:
        original_size (h, w), crop_coords (top, left), target_size (h, w)).
    dim: features per scalar (even; SDXL 256).
    default_size: (h, w) of the conditioning a dropped or unconditional sample gets, and what to ask for at
        sampling: original_size = target_size = default_size and crop (0, 0), i.e. a full, uncropped image
        (SDXL's recommended inference conditioning).
    Not guided by default (drop_rate 0): SDXL keeps the sizes in both branches of guidance, like concat inputs.
    Sampling may leave all the keys out (prompts or labels only): in eval mode that asks for the default
    conditioning; while training a missing key is an error (the data is not bucketed).
    """

    output = "vector"

    def __init__(
        self, dim: int = 256, keys: Sequence[str] = DEFAULT_KEYS, default_size: Sequence[int] = (256, 256),
        drop_rate: float = 0.0, guided: bool = False,
    ):
        keys = tuple(keys)
        if not keys or len(set(keys)) != len(keys):
            raise ValueError(f"SizeEmbedder needs distinct batch keys, got {list(keys)}.")
        super().__init__(keys[0], drop_rate, guided)
        if dim < 2 or dim % 2:
            raise ValueError(f"dim is the number of sin/cos features per scalar, so a positive even number; got {dim}.")
        if len(default_size) != 2 or min(default_size) < 1:
            raise ValueError(f"default_size is (height, width) in pixels, got {list(default_size)}.")
        self.keys, self.dim = keys, int(dim)
        self.output_dim = 2 * len(keys) * self.dim
        height, width = (int(v) for v in default_size)
        defaults = {"original_size": (height, width), "crop_coords": (0, 0), "target_size": (height, width)}
        # A key outside SDXL's three has no natural default; zeros are its "no information" value.
        self.register_buffer(
            "default_values", torch.tensor([v for key in keys for v in defaults.get(key, (0, 0))], dtype=torch.float32),
            persistent=False,
        )

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.keys  # what collation (and the latent cache) must carry for this embedder

    def forward(
        self, batch: Mapping[str, Any], force_unconditional: bool = False, generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        missing = [key for key in self.keys if key not in batch]
        if len(missing) == len(self.keys) and not self.training:
            batch_size = len(next(iter(batch.values()))) if batch else 1
            return self.unconditional(batch_size, self.default_values.device)
        if missing:
            raise KeyError(f"SizeEmbedder reads batch keys {list(self.keys)}, but {missing} are missing (the batch has "
                           f"{sorted(batch)}); train on aspect-ratio buckets (data.buckets) or set keys.")
        pairs = []
        for key in self.keys:
            value = torch.as_tensor(batch[key])
            if value.ndim != 2 or value.shape[1] != 2:
                raise ValueError(f"batch['{key}'] must be (B, 2) pairs, got {tuple(value.shape)}.")
            pairs.append(value.to(self.default_values.device, torch.float32))
        # The base class handles dropout and the unconditional branch on the joined (B, 2 * len(keys)) values.
        return super().forward({self.input_key: torch.cat(pairs, dim=1)}, force_unconditional, generator, drop)

    def encode(self, values: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        values = torch.where(drop.to(values.device)[:, None], self.default_values, values)
        return self._embed(values)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        values = self.default_values.expand(batch_size, -1)
        return self._embed(values if device is None else values.to(device))

    def _embed(self, values: torch.Tensor) -> torch.Tensor:
        batch_size, count = values.shape
        features = timestep_embedding(values.reshape(-1), self.dim)  # (B * count, dim), [cos | sin]
        return features.reshape(batch_size, count * self.dim)  # (B, 2 * len(keys) * dim)
