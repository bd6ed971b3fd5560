"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018, "The Unreasonable Effectiveness...").

d(x, y) = sum_l mean_hw || w_l * (phi_l(x)/|phi_l(x)| - phi_l(y)/|phi_l(y)|) ||^2 over the five VGG16
stages (relu1_2 ... relu5_3), with per-channel weights w_l calibrated on human judgements.

Both weight sets are needed and neither ships with this package:
- VGG16: a torchvision ``vgg16`` state dict (``features.*`` keys; .safetensors or a torch file read with
  ``weights_only=True``), or torchvision's own download where a network exists (``download_vgg=true``);
- the calibrated linear layers: the ``vgg.pth`` file of the ``lpips`` package (``lin0.model.1.weight`` ...).
A perceptual loss on random features would silently train towards noise, so missing weights are an
error; tests opt in to random weights explicitly with ``allow_random_weights_for_tests=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import vgg16
from torchvision.models.vgg import cfgs, make_layers

# Where each LPIPS stage ends inside torchvision's ``vgg16().features`` (after relu1_2 ... relu5_3).
_VGG_STAGE_ENDS = (4, 9, 16, 23, 30)
_VGG_STAGE_CHANNELS = (64, 128, 256, 512, 512)

_DISABLE_HINT = (
    "or turn the perceptual term off with model.vae.loss.perceptual_weight=0 model.vae.loss.perceptual=null"
)


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same keys) without allocating the 120M-parameter classifier."""
    return make_layers(cfgs["D"], batch_norm=False)


class _LinearHead(nn.Module):
    """Non-negative 1x1 channel weighting of one stage; ``model.1`` matches the lpips key layout."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Frozen LPIPS(VGG16) distance between images in [-1, 1]; returns one value per sample, shape (B,).

    Single-channel images are repeated to RGB, since VGG16 was trained on colour images.
    """

    def __init__(
        self,
        vgg_weights_path: str | None = None,
        lpips_weights_path: str | None = None,
        download_vgg: bool = False,
        allow_random_weights_for_tests: bool = False,
    ):
        super().__init__()
        features = self._build_vgg(vgg_weights_path, download_vgg, allow_random_weights_for_tests)
        starts = (0, *_VGG_STAGE_ENDS[:-1])
        self.slices = nn.ModuleList(
            nn.Sequential(*features[start:end]) for start, end in zip(starts, _VGG_STAGE_ENDS, strict=True)
        )
        for i, channels in enumerate(_VGG_STAGE_CHANNELS):
            setattr(self, f"lin{i}", _LinearHead(channels))
        self._load_linear_heads(lpips_weights_path, allow_random_weights_for_tests)
        # ImageNet statistics expressed for inputs in [-1, 1] (the lpips "ScalingLayer").
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _build_vgg(path: str | None, download: bool, allow_random: bool) -> nn.Sequential:
        if path is not None:
            state = load_state_file(path)
            # Accept a whole torchvision VGG16 state dict or only its ``features`` part.
            if any(k.startswith("features.") for k in state):
                state = {
                    k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
                }
            features = _vgg16_features()
            try:
                features.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise ValueError(
                    f"{path} is not a torchvision VGG16 state dict (model.vae.loss.perceptual.vgg_weights_path): {err}"
                ) from err
            return features
        if download:
            from torchvision.models import VGG16_Weights

            try:
                return vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features
            except Exception as err:  # no network, proxy, full disk: all end the same way
                raise RuntimeError(
                    f"could not download the torchvision VGG16 weights ({err}); save them elsewhere and set "
                    f"model.vae.loss.perceptual.vgg_weights_path=/path/to/vgg16.safetensors, {_DISABLE_HINT}"
                ) from err
        if allow_random:
            return _vgg16_features()
        raise ValueError(
            "the LPIPS perceptual loss needs pretrained VGG16 weights: set "
            "model.vae.loss.perceptual.vgg_weights_path=/path/to/vgg16.safetensors (a torchvision vgg16 "
            "state dict), or model.vae.loss.perceptual.download_vgg=true where a network exists, "
            + _DISABLE_HINT
        )

    def _load_linear_heads(self, path: str | None, allow_random: bool) -> None:
        heads = {f"lin{i}": getattr(self, f"lin{i}") for i in range(len(_VGG_STAGE_CHANNELS))}
        if path is None:
            if not allow_random:
                raise ValueError(
                    "the LPIPS perceptual loss needs its calibrated linear layers: set "
                    "model.vae.loss.perceptual.lpips_weights_path=/path/to/vgg.pth (the weights file shipped "
                    "in the `lpips` package, lpips/weights/v0.1/vgg.pth), " + _DISABLE_HINT
                )
            for head in heads.values():  # uniform channel average: the uncalibrated LPIPS baseline
                conv = head.model[1]
                nn.init.constant_(conv.weight, 1.0 / conv.in_channels)
            return
        state = load_state_file(path)
        expected = {f"{name}.model.1.weight" for name in heads}
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(
                f"{path} is not an LPIPS vgg.pth (model.vae.loss.perceptual.lpips_weights_path): missing {missing}"
            )
        with torch.no_grad():
            for name, head in heads.items():
                head.model[1].weight.copy_(state[f"{name}.model.1.weight"])

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen metric: dropout in the heads must stay off even inside a training loop.
        return super().train(False)

    @staticmethod
    def _unit_normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
        return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] not in (1, 3):
            raise ValueError(
                f"LPIPS needs two (B, 1 or 3, H, W) images of equal shape, got {input.shape} and {target.shape}"
            )
        if input.shape[1] == 1:
            input, target = input.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        h_in = (input - self.shift) / self.scale
        h_tg = (target - self.shift) / self.scale
        distance = input.new_zeros(input.shape[0])
        for i, stage in enumerate(self.slices):
            h_in, h_tg = stage(h_in), stage(h_tg)
            diff = (self._unit_normalize(h_in) - self._unit_normalize(h_tg)).pow(2)
            distance = distance + getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3))
        return distance
