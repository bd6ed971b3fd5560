"""PatchGAN discriminator (Isola et al. 2017, pix2pix), as used by VQGAN / CompVis first stages.

The layers live in one ``nn.Sequential`` called ``main`` so that CompVis's ``loss.discriminator.main.*``
keys load unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016): conv ~ N(0, 0.02), norm scale ~ N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """Fully convolutional classifier of overlapping patches: (B, C, H, W) -> logits (B, 1, h, w).

    ``n_layers`` stride-2 convs (widths ndf * min(2**n, 8)), then a stride-1 conv and a 1-channel
    stride-1 conv; each output logit sees a 70x70 patch for n_layers=3 (16x16 for n_layers=1).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"need n_layers >= 1 and ndf >= 1, got n_layers={n_layers}, ndf={ndf}")
        kernel, pad = 4, 1
        # BatchNorm follows every inner conv, so those convs need no bias.
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, kernel, 2, pad), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel, 2, pad, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel, 1, pad, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kernel, 1, pad),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
