"""VectorQuantizer and VQModel: nearest-code lookup, loss, straight-through gradient, perplexity, keys."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.nets.vq import DeterministicPosterior, VectorQuantizer, VQModel


def tiny_vq(n_embed=16, embed_dim=3):
    ddconfig = dict(
        ch=16,
        ch_mult=[1, 2, 2],
        num_res_blocks=1,
        z_channels=4,
        attn_resolutions=[],
        in_channels=1,
        out_ch=1,
        resolution=32,
        double_z=False,
        use_mid_attn=False,
        norm_num_groups=8,
    )
    return VQModel(ddconfig, n_embed=n_embed, embed_dim=embed_dim)


def test_quantizer_picks_nearest_code_and_computes_loss():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=8, embed_dim=2, beta=0.25)
    z = torch.randn(2, 2, 3, 3)
    z_q, loss, info = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    expected_idx = torch.cdist(flat, quantizer.embedding.weight).argmin(dim=1)
    assert torch.equal(info["indices"].flatten(), expected_idx)
    expected_q = quantizer.embedding.weight[expected_idx].reshape(2, 3, 3, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected_q)
    mse = ((expected_q - z) ** 2).mean()
    torch.testing.assert_close(loss, (1.0 + 0.25) * mse)


def test_straight_through_gradient_and_loss_gradients():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=8, embed_dim=2, beta=0.5)
    z = torch.randn(1, 2, 2, 2, requires_grad=True)
    upstream = torch.randn(1, 2, 2, 2)
    z_q, _, _ = quantizer(z)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity Jacobian through the quantiser
    assert quantizer.embedding.weight.grad is None  # the reconstruction path does not move the codebook

    z.grad = None
    z_q, loss, info = quantizer(z)
    loss.backward()
    e = quantizer.lookup(info["indices"]).detach()
    # d/dz of beta * mean((z - sg[e])^2) ; the codebook term has no gradient w.r.t. z
    torch.testing.assert_close(z.grad, 0.5 * 2 * (z.detach() - e) / z.numel())
    assert quantizer.embedding.weight.grad.abs().sum() > 0


def test_perplexity_and_usage():
    quantizer = VectorQuantizer(n_embed=4, embed_dim=1)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.0], [10.0], [20.0], [30.0]]))
    all_four = torch.tensor([0.1, 9.9, 20.2, 29.0]).view(1, 1, 2, 2)
    _, _, info = quantizer(all_four)
    torch.testing.assert_close(info["perplexity"], torch.tensor(4.0))
    torch.testing.assert_close(info["usage"], torch.tensor(1.0))
    one_code = torch.zeros(1, 1, 2, 2)
    _, _, info = quantizer(one_code)
    torch.testing.assert_close(info["perplexity"], torch.tensor(1.0))
    torch.testing.assert_close(info["usage"], torch.tensor(0.25))
    # two codes used 3:1 -> exp(entropy)
    _, _, info = quantizer(torch.tensor([0.0, 0.0, 0.0, 10.0]).view(1, 1, 2, 2))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(info["perplexity"], torch.tensor(math.exp(entropy)))


def test_vq_model_interface_and_keys():
    torch.manual_seed(0)
    model = tiny_vq()
    assert model.downsample_factor == 4 and model.embed_dim == 3
    x = torch.randn(2, 1, 32, 32)
    posterior = model.encode(x)
    assert isinstance(posterior, DeterministicPosterior)
    assert posterior.mean.shape == (2, 3, 8, 8)
    assert torch.equal(posterior.sample(), posterior.mode())
    assert torch.equal(posterior.std, torch.zeros_like(posterior.mean))
    assert torch.equal(posterior.kl(), torch.zeros(2))
    reconstruction, vq_loss, info = model(x)
    assert reconstruction.shape == x.shape and vq_loss.dim() == 0 and "perplexity" in info
    # decode quantises first: decoding z and decoding its quantised version agree
    z = posterior.mode()
    quantized = model.quantize.lookup(model.quantize.codes(z))
    torch.testing.assert_close(model.decode(z), model.decode(quantized, force_not_quantize=True))
    keys = set(model.state_dict())
    for key in (
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "encoder.conv_out.weight",
        "decoder.up.0.block.1.conv1.weight",
    ):
        assert key in keys
    assert model.state_dict()["encoder.conv_out.weight"].shape[0] == 4  # z_channels, no double_z


def test_vq_model_rejects_double_z():
    with pytest.raises(ValueError, match="double_z=false"):
        VQModel(dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_num_groups=8), 16, 3)
