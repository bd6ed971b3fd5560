"""PatchGAN discriminator: patch-logit shapes, CompVis key layout, DCGAN initialisation."""

from __future__ import annotations

import pytest
import torch

from ldm.nets.discriminator import NLayerDiscriminator


@pytest.mark.parametrize("n_layers,size,out", [(1, 32, 14), (2, 32, 6), (3, 64, 6)])
def test_patch_logit_shape(n_layers, size, out):
    disc = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=n_layers)
    assert disc(torch.randn(2, 1, size, size)).shape == (2, 1, out, out)


def test_compvis_layout_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    state = disc.state_dict()
    # keys and shapes of CompVis's loss.discriminator.main.* (pix2pix NLayerDiscriminator)
    assert state["main.0.weight"].shape == (64, 3, 4, 4) and "main.0.bias" in state
    assert state["main.2.weight"].shape == (128, 64, 4, 4) and "main.2.bias" not in state
    assert state["main.3.running_mean"].shape == (128,)
    assert state["main.8.weight"].shape == (512, 256, 4, 4)
    assert state["main.11.weight"].shape == (1, 512, 4, 4)
    conv = state["main.8.weight"]
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    bn = state["main.9.weight"]
    assert abs(bn.mean().item() - 1.0) < 0.01 and torch.equal(state["main.9.bias"], torch.zeros(512))
