"""DiT backbone: shapes, adaLN-Zero initialisation, conditioning paths, gradient checkpointing, the official
facebookresearch/DiT state-dict layout, and numerical equality with diffusers' DiTTransformer2DModel."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.io.convert.common import ConversionError
from ldm.io.convert.dit import (
    dit_from_diffusers_config,
    dit_from_diffusers_state_dict,
    dit_kwargs,
    dit_to_diffusers_config,
    dit_to_diffusers_state_dict,
)
from ldm.nets.backbone import check_backbone
from ldm.nets.conditioners import ClassEmbedder, Conditioner
from ldm.nets.dit import DiT, dit_b_2, dit_l_2, dit_s_2, dit_tiny, dit_xl_2


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Overwrite every parameter (the zero-initialised ones included) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _tiny(**overrides) -> DiT:
    return dit_tiny(**{"input_size": 8, "in_channels": 4, **overrides})


def _inputs(batch: int = 2, size: int = 8, channels: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.tensor([3.0, 741.5])[:batch]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------------------------------------
# shapes and initialisation


@pytest.mark.parametrize(
    "kwargs, out_channels",
    [({}, 4), ({"learn_sigma": True}, 8), ({"in_channels": 9, "out_channels": 4}, 4), ({"num_classes": 11}, 4)],
)
def test_output_shape(kwargs, out_channels):
    model = _tiny(**kwargs)
    x, t = _inputs(channels=model.in_channels)
    y = torch.tensor([0, 10]) if model.num_classes else None
    assert model.out_channels == out_channels
    assert model(x, t, y=y).shape == (2, out_channels, 8, 8)


def test_other_and_non_square_latent_sizes():
    model = _tiny()
    _randomize(model)
    for shape in [(8, 8), (12, 12), (8, 12)]:
        x = torch.randn(1, 4, *shape)
        assert model(x, torch.tensor([5.0])).shape == x.shape


def test_adaln_zero_init_output_is_exactly_zero_and_blocks_are_identity():
    model = _tiny(num_classes=11, context_dim=16)
    x, t = _inputs()
    context, y = torch.randn(2, 5, 16), torch.tensor([1, 10])
    assert torch.count_nonzero(model(x, t, context=context, y=y)) == 0
    tokens, c = torch.randn(2, 16, 128), torch.randn(2, 128)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, context), tokens)


def test_unpatchify_inverts_patch_layout():
    """Token values are laid out (p, p, C) per patch, as the official final layer was trained with."""
    model = _tiny()
    x = torch.randn(2, 4, 8, 12)
    p = model.patch_size
    tokens = x.unflatten(2, (4, p)).unflatten(4, (6, p)).permute(0, 2, 4, 3, 5, 1).reshape(2, 24, -1)
    assert torch.equal(model.unpatchify(tokens, 4, 6), x)


def test_gradient_checkpointing_gives_same_gradients():
    plain, ckpt = _tiny(num_classes=11, context_dim=16), _tiny(num_classes=11, context_dim=16, gradient_checkpointing=True)
    _randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.blocks[0].gradient_checkpointing and not plain.blocks[0].gradient_checkpointing
    x, t = _inputs()
    context, y = torch.randn(2, 5, 16), torch.tensor([1, 10])
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        model(x, t, context=context, y=y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# conditioning


def test_context_changes_output_and_mask_hides_tokens():
    model = _tiny(context_dim=16)
    _randomize(model)
    x, t = _inputs()
    context = torch.randn(2, 5, 16)
    out = model(x, t, context=context)
    assert _rel_err(model(x, t, context=torch.randn(2, 5, 16)), out) > 1e-2
    # tokens the mask hides cannot matter
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    changed = context.clone()
    changed[:, 3:] = torch.randn(2, 2, 16)
    torch.testing.assert_close(model(x, t, context=changed, context_mask=mask), model(x, t, context=context, context_mask=mask))


def test_class_and_vector_y_change_output():
    for kwargs, y1, y2 in [({"num_classes": 11}, torch.tensor([1, 2]), torch.tensor([10, 10])),
                           ({"adm_in_channels": 6}, torch.randn(2, 6), torch.randn(2, 6))]:
        model = _tiny(**kwargs)
        _randomize(model)
        x, t = _inputs()
        assert _rel_err(model(x, t, y=y1), model(x, t, y=y2)) > 1e-2


def test_conditioner_contract_matches_unet_conventions():
    """num_classes counts the null class exactly like the UNet's label_emb: the backbone check passes."""
    labels = Conditioner([ClassEmbedder(num_classes=10, output="vector")])
    check_backbone(_tiny(num_classes=11), labels.spec, latent_channels=4)
    with pytest.raises(ValueError, match="num_classes=10 but the conditioning needs 11"):
        check_backbone(_tiny(num_classes=10), labels.spec, latent_channels=4)
    tokens = Conditioner([ClassEmbedder(num_classes=10, embed_dim=16, output="context")])
    check_backbone(_tiny(context_dim=16), tokens.spec, latent_channels=4)
    labels.eval()
    y = labels.unconditional(2)["y"]  # the null id the DiT must be able to embed
    model = _tiny(num_classes=labels.spec.num_classes)
    assert model(*_inputs(), y=y).shape == (2, 4, 8, 8)


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({}, {"x": torch.randn(1, 4, 8, 9)}, "patch size 2"),
        ({"patch_size": 4, "input_size": 8}, {"x": torch.randn(1, 4, 10, 8)}, "patch size 4"),
        ({"context_dim": 16}, {}, "context is missing"),
        ({}, {"context": torch.randn(1, 3, 16)}, "context_dim=None"),
        ({"num_classes": 11}, {}, "y must be given"),
        ({"num_classes": 11}, {"y": torch.randn(1)}, "integer labels"),
    ],
)
def test_bad_inputs_fail_clearly(kwargs, call, match):
    model = _tiny(**kwargs)
    x = call.pop("x", torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=match):
        model(x, torch.tensor([1.0]), **call)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="patch size 4"):
        DiT(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not both"):
        _tiny(num_classes=11, adm_in_channels=4)


# ---------------------------------------------------------------------------------------------
# official checkpoint layout


def _official_shapes(depth: int, hidden: int, patch: int, in_ch: int, classes: int, tokens: int) -> dict:
    """Keys and shapes of facebookresearch/DiT `models.DiT(learn_sigma=True)` state dicts."""
    shapes = {
        "pos_embed": (1, tokens, hidden),
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch), "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * 2 * in_ch, hidden),
        "final_layer.linear.bias": (patch * patch * 2 * in_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for name, (rows, cols) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                                   "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden),
                                   "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            shapes[f"blocks.{i}.{name}.weight"], shapes[f"blocks.{i}.{name}.bias"] = (rows, cols), (rows,)
    return shapes


def test_official_dit_state_dict_loads_strictly():
    shapes = _official_shapes(depth=4, hidden=128, patch=2, in_ch=4, classes=1000, tokens=16)
    official = {k: torch.randn(s) for k, s in shapes.items()}
    model = _tiny(num_classes=1001, learn_sigma=True)  # 1000 ImageNet classes + the null row
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.pos_embed, official["pos_embed"])


def test_pos_embed_is_official_sincos_layout():
    """Token r*w + c: channels [sin(c w_k) | cos(c w_k) | sin(r w_k) | cos(r w_k)], w_k = 10000^(-k/(D/4))."""
    model = _tiny(input_size=8)  # 4 x 4 tokens, D = 128
    quarter = 128 // 4
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        k = torch.arange(quarter, dtype=torch.float64)
        omega = 10000.0 ** (-k / quarter)
        expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
        torch.testing.assert_close(model.pos_embed[0, r * 4 + c].double(), expected, rtol=0, atol=1e-6)


def test_presets_have_the_papers_sizes():
    """Parameter counts of the paper's Table 1 (ImageNet-256 setting: 32x32 latents, 1000 classes, learn_sigma)."""
    expected = {dit_s_2: 33e6, dit_b_2: 130e6, dit_l_2: 458e6, dit_xl_2: 675e6}
    for factory, count in expected.items():
        with torch.device("meta"):
            model = factory(input_size=32, num_classes=1001, learn_sigma=True)
        assert math.isclose(sum(p.numel() for p in model.parameters()), count, rel_tol=0.01), factory.__name__


# ---------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel


def _diffusers_pair(seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    ours = _tiny(num_classes=11, learn_sigma=True, timestep_freq_shift=1)
    _randomize(ours, seed)
    kwargs = dit_kwargs(ours)
    theirs = diffusers.DiTTransformer2DModel.from_config(dit_to_diffusers_config(kwargs))
    theirs.load_state_dict(dit_to_diffusers_state_dict(ours.state_dict(), kwargs), strict=True)
    return ours.eval(), theirs.eval(), kwargs  # eval: diffusers' label embedder drops labels while training


def test_diffusers_dit_gives_equal_outputs():
    ours, theirs, _ = _diffusers_pair()
    x, t = _inputs()
    y = torch.tensor([4, 10])  # 10: the null class
    with torch.no_grad():
        for size in (8, 12):  # the trained grid, and a larger one whose positions both stretch onto it
            x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(size))
            expected = theirs(x, timestep=t, class_labels=y).sample
            err = _rel_err(ours(x, t, y=y), expected)
            print(f"diffusers DiT rel err at {size}x{size}: {err:.2e}")
            assert err < 1e-4


def test_diffusers_round_trip_and_config():
    ours, theirs, kwargs = _diffusers_pair()
    config = dict(theirs.config)
    assert dit_from_diffusers_config(config) == kwargs
    back = dit_from_diffusers_state_dict(theirs.state_dict(), kwargs)
    ref = ours.state_dict()
    assert back.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-6 if key == "pos_embed" else 0, msg=key)


def test_diffusers_conversion_refuses_what_it_cannot_hold():
    for kwargs, match in [({"num_classes": 11}, "timestep_freq_shift=1"),
                          ({"timestep_freq_shift": 1}, "set num_classes"),
                          ({"num_classes": 11, "context_dim": 8, "timestep_freq_shift": 1}, "cross-attention")]:
        model = _tiny(**kwargs)
        with pytest.raises(ConversionError, match=match):
            dit_to_diffusers_config(dit_kwargs(model))
    _, theirs, kwargs = _diffusers_pair()
    state = dict(theirs.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1
    with pytest.raises(ConversionError, match="share"):
        dit_from_diffusers_state_dict(state, kwargs)
