"""Attention blocks against hand-written reference maths and the CompVis parameter names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.nets.attention import BasicTransformerBlock, CrossAttention, FeedForward, SpatialTransformer


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _reference_attention(attn: CrossAttention, x, context):
    """softmax(Q K^T / sqrt(d)) V per head, written out with einsum."""
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d) for t in (q, k, v))
    weights = torch.einsum("bihd,bjhd->bhij", q, k).mul(d**-0.5).softmax(dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(x.shape[0], x.shape[1], heads * d)
    return attn.to_out(out)


def test_cross_attention_matches_reference_and_parameter_names():
    attn = CrossAttention(query_dim=12, context_dim=7, heads=3, dim_head=5)
    assert {k: tuple(v.shape) for k, v in attn.state_dict().items()} == {
        "to_q.weight": (15, 12), "to_k.weight": (15, 7), "to_v.weight": (15, 7),
        "to_out.0.weight": (12, 15), "to_out.0.bias": (12,),
    }
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 4, 7)
    torch.testing.assert_close(attn(x, ctx), _reference_attention(attn, x, ctx), rtol=1e-5, atol=1e-5)
    self_attn = CrossAttention(query_dim=12, heads=2, dim_head=6)
    torch.testing.assert_close(self_attn(x), _reference_attention(self_attn, x, x), rtol=1e-5, atol=1e-5)


def test_key_padding_mask_equals_dropping_the_padded_tokens():
    attn = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 6, 6)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = attn(x, ctx, mask=mask)
    torch.testing.assert_close(out[0], attn(x[:1], ctx[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], attn(x[1:], ctx[1:, :3])[0], rtol=1e-5, atol=1e-5)
    # changing padded tokens changes nothing
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 100.0
    torch.testing.assert_close(attn(x, ctx2, mask=mask), out)
    with pytest.raises(ValueError, match="at least one True"):
        attn(x, ctx, mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        attn(x, ctx, mask=torch.ones(2, 5, dtype=torch.bool))


def test_feed_forward_is_geglu_mlp():
    ff = FeedForward(dim=6, mult=4)
    assert {k: tuple(v.shape) for k, v in ff.state_dict().items()} == {
        "net.0.proj.weight": (48, 6), "net.0.proj.bias": (48,), "net.2.weight": (6, 24), "net.2.bias": (6,),
    }
    x = torch.randn(3, 6)
    hidden = x @ ff.net[0].proj.weight.T + ff.net[0].proj.bias
    value, gate = hidden[:, :24], hidden[:, 24:]
    expected = (value * F.gelu(gate)) @ ff.net[2].weight.T + ff.net[2].bias
    torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-6)


def test_basic_transformer_block_is_prenorm_residual():
    block = BasicTransformerBlock(dim=8, heads=2, dim_head=4, context_dim=5)
    _randomize(block)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 4, 5)
    h = x + _reference_attention(block.attn1, block.norm1(x), block.norm1(x))
    h = h + _reference_attention(block.attn2, block.norm2(h), ctx)
    expected = h + block.ff(block.norm3(h))
    torch.testing.assert_close(block(x, ctx), expected, rtol=1e-5, atol=1e-5)


def test_block_gradient_checkpointing_same_values_and_gradients():
    plain = BasicTransformerBlock(dim=8, heads=2, dim_head=4, context_dim=5)
    _randomize(plain)
    ckpt = BasicTransformerBlock(dim=8, heads=2, dim_head=4, context_dim=5, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, ctx = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 4, 5)
    x2 = x.detach().clone().requires_grad_(True)
    out1, out2 = plain(x, ctx), ckpt(x2, ctx)
    torch.testing.assert_close(out1, out2)  # two modules' calls: fp32 rounding only
    out1.sum().backward()
    out2.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_spatial_transformer_starts_as_identity_and_names_match_compvis():
    st = SpatialTransformer(32, heads=4, dim_head=8, depth=2, context_dim=10)
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 7, 10)
    torch.testing.assert_close(st(x, ctx), x, rtol=0, atol=0)  # zero proj_out
    keys = set(st.state_dict())
    for key in ["norm.weight", "proj_in.weight", "proj_out.bias", "transformer_blocks.1.attn2.to_k.weight",
                "transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.1.norm3.bias"]:
        assert key in keys
    assert tuple(st.state_dict()["proj_in.weight"].shape) == (32, 32, 1, 1)


def test_linear_and_conv_projections_compute_the_same_function():
    conv = SpatialTransformer(32, heads=2, dim_head=16, context_dim=6)
    linear = SpatialTransformer(32, heads=2, dim_head=16, context_dim=6, use_linear=True)
    _randomize(conv)
    # SD-2 linear weights are the SD-1 1x1 conv weights without the trailing (1, 1)
    state = {k: (v[:, :, 0, 0] if k.startswith("proj_") and v.ndim == 4 else v) for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, ctx = torch.randn(2, 32, 4, 3), torch.randn(2, 5, 6)
    out = conv(x, ctx)
    assert not torch.allclose(out, x)
    torch.testing.assert_close(linear(x, ctx), out, rtol=1e-5, atol=1e-5)
