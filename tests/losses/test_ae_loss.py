"""AutoencoderLoss: adaptive GAN weight by hand, term composition, GAN switch-on, discriminator losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.losses.autoencoder import AutoencoderLoss, adaptive_gan_weight, hinge_d_loss, vanilla_d_loss
from ldm.nets.autoencoder import DiagonalGaussianDistribution
from ldm.nets.discriminator import NLayerDiscriminator


class MeanLogitDiscriminator(nn.Module):
    """Logit = scale * per-pixel value, with a call counter; simple enough to compute losses by hand."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.scale * x


def test_adaptive_weight_matches_hand_computation_on_linear_model():
    torch.manual_seed(0)
    weight = torch.randn(3, 4, requires_grad=True)  # the "last layer"
    x, target, v = torch.randn(5, 4), torch.randn(5, 3), torch.randn(5, 3)
    y = x @ weight.t()  # (5, 3)
    rec_loss = ((y - target) ** 2).mean()
    g_loss = -(v * y).mean()
    # d rec / dW = 2/N (y - t)^T x ;  d g / dW = -1/N v^T x   (N = 15 output elements)
    rec_grad = 2.0 / 15 * (y - target).t() @ x
    g_grad = -1.0 / 15 * v.t() @ x
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    got = adaptive_gan_weight(rec_loss, g_loss, weight)
    torch.testing.assert_close(got, expected.detach())
    assert not got.requires_grad
    # the graph is kept: the caller can still backpropagate the total loss
    (rec_loss + got * g_loss).backward()
    assert weight.grad is not None


def test_adaptive_weight_is_clamped():
    weight = torch.ones(2, 2, requires_grad=True)
    rec_loss = (weight * 10.0).sum()
    g_loss = (weight * 1e-12).sum()  # vanishing adversarial gradient
    assert adaptive_gan_weight(rec_loss, g_loss, weight).item() == pytest.approx(1e4)
    assert adaptive_gan_weight(rec_loss, g_loss, weight, max_weight=7.0).item() == pytest.approx(7.0)


def test_generator_loss_terms_without_gan():
    torch.manual_seed(0)
    x, rec = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    posterior = DiagonalGaussianDistribution(torch.randn(2, 6, 2, 2))
    loss_fn = AutoencoderLoss(reconstruction_loss="l1", kl_weight=0.5, disc_weight=0.0)
    loss, logs = loss_fn.generator_loss(x, rec, step=10**6, posterior=posterior)
    expected = (x - rec).abs().mean() + 0.5 * posterior.kl().mean() / 64
    torch.testing.assert_close(loss, expected)
    assert set(logs) == {"rec_loss", "kl_loss", "total_loss"}
    l2 = AutoencoderLoss(reconstruction_loss="l2", kl_weight=0.0, disc_weight=0.0)
    loss, _ = l2.generator_loss(x, rec, step=0, codebook_loss=torch.tensor(0.3))
    torch.testing.assert_close(loss, ((x - rec) ** 2).mean() + 0.3)


def test_gan_switches_on_at_disc_start_with_adaptive_weight():
    torch.manual_seed(0)
    disc = MeanLogitDiscriminator()
    loss_fn = AutoencoderLoss(kl_weight=0.0, discriminator=disc, disc_weight=0.5, disc_start=100)
    last = torch.randn(1, 1, 3, 3, requires_grad=True)
    x = torch.rand(2, 1, 6, 6) * 2 - 1
    rec = F.conv2d(torch.randn(2, 1, 6, 6), last, padding=1)

    before, logs = loss_fn.generator_loss(x, rec, step=99, last_layer=last)
    assert disc.calls == 0 and "g_loss" not in logs
    assert not loss_fn.gan_active(99) and loss_fn.gan_active(100)

    after, logs = loss_fn.generator_loss(x, rec, step=100, last_layer=last)
    g_loss = -(0.7 * rec).mean()
    d_weight = 0.5 * adaptive_gan_weight((x - rec).abs().mean(), g_loss, last)
    torch.testing.assert_close(after, before + d_weight * g_loss)
    torch.testing.assert_close(logs["d_weight"], d_weight)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, rec, step=100)


def test_discriminator_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    hinge = 0.5 * (torch.tensor([0.0, 0.5, 2.0]).mean() + torch.tensor([0.0, 1.0, 2.5]).mean())
    torch.testing.assert_close(hinge_d_loss(real, fake), hinge)
    vanilla = 0.5 * (-torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean())
    torch.testing.assert_close(vanilla_d_loss(real, fake), vanilla)

    disc = MeanLogitDiscriminator()
    loss_fn = AutoencoderLoss(discriminator=disc, disc_weight=1.0, disc_start=0, disc_loss="vanilla")
    x, rec = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4, requires_grad=True)
    loss, logs = loss_fn.discriminator_loss(x, rec, step=0)
    torch.testing.assert_close(loss, vanilla_d_loss(0.7 * x, 0.7 * rec.detach()))
    loss.backward()
    assert rec.grad is None and disc.scale.grad is not None
    assert {"disc_loss", "logits_real", "logits_fake"} <= set(logs)


def test_discriminator_loss_refuses_before_disc_start():
    loss_fn = AutoencoderLoss(discriminator=NLayerDiscriminator(1, 8, 1), disc_weight=0.5, disc_start=5)
    with pytest.raises(ValueError, match="not active"):
        loss_fn.discriminator_loss(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), step=4)


def test_zero_weights_drop_the_networks_and_missing_networks_fail():
    loss_fn = AutoencoderLoss(discriminator=NLayerDiscriminator(1, 8, 1), disc_weight=0.0)
    assert loss_fn.discriminator is None and not loss_fn.uses_gan
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        AutoencoderLoss(perceptual_weight=1.0, disc_weight=0.0)
    with pytest.raises(ValueError, match="disc_weight=0"):
        AutoencoderLoss(disc_weight=0.5)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        AutoencoderLoss(reconstruction_loss="huber", disc_weight=0.0)


def test_perceptual_term_is_weighted_in():
    class Distance(nn.Module):
        def forward(self, a, b):
            return (a - b).pow(2).sum(dim=(1, 2, 3))

    x, rec = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    loss_fn = AutoencoderLoss(kl_weight=0.0, perceptual_weight=0.25, perceptual=Distance(), disc_weight=0.0)
    loss, logs = loss_fn.generator_loss(x, rec, step=0)
    torch.testing.assert_close(loss, torch.tensor(1.0 + 0.25 * 4.0))
    torch.testing.assert_close(logs["perceptual_loss"], torch.tensor(4.0))
