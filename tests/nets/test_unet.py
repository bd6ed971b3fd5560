"""UNetModel: shapes, conditioning paths, gradient checkpointing, the exact Stable Diffusion 1.5
state-dict layout, and numerical equality with diffusers' UNet2DConditionModel after diffusers'
own LDM->diffusers checkpoint conversion."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.nets.unet import ResBlock, TransformerSpec, UNetModel, timestep_embedding


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Overwrite every parameter (zero-initialised output layers included) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _tiny(**overrides) -> UNetModel:
    kwargs = dict(
        in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        transformer=TransformerSpec(attention_resolutions=(2,), num_heads=2, context_dim=16),
    )
    kwargs.update(overrides)
    return UNetModel(**kwargs)


# ---------------------------------------------------------------------------------------------
# timestep embedding


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    expected = torch.empty(3, 8)
    for row, step in enumerate([0.0, 7.0, 999.0]):
        for i in range(4):
            freq = 10000.0 ** (-i / 4)
            expected[row, i] = math.cos(step * freq)
            expected[row, 4 + i] = math.sin(step * freq)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    # float and long timesteps embed identically; odd widths are zero-padded
    torch.testing.assert_close(timestep_embedding(t.float(), 8), emb)
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.all(odd[:, -1] == 0)


# ---------------------------------------------------------------------------------------------
# shapes and conditioning paths


@pytest.mark.parametrize(
    "overrides, context_shape, y",
    [
        ({}, (2, 5, 16), None),
        ({"transformer": None}, None, None),
        ({"num_classes": 11}, (2, 1, 16), torch.tensor([0, 10])),
        ({"adm_in_channels": 6, "transformer": None}, None, torch.randn(2, 6)),
        ({"in_channels": 7, "out_channels": 3}, (2, 4, 16), None),  # concat conditioning: 3 latent + 4 extra
        ({"use_scale_shift_norm": True, "resblock_updown": True, "channel_mult": (1, 2, 2)}, (2, 3, 16), None),
        ({"transformer": TransformerSpec((1, 2), num_head_channels=16, transformer_depth=2, context_dim=16,
                                         use_linear_in_transformer=True), "num_res_blocks": 2}, (2, 3, 16), None),
    ],
    ids=["context", "unconditional", "class-label", "adm-vector", "concat", "scale-shift-updown", "sd2-linear"],
)
def test_forward_shapes_and_every_parameter_gets_gradient(overrides, context_shape, y):
    model = _tiny(**overrides)
    _randomize(model)
    in_channels = overrides.get("in_channels", 3)
    x = torch.randn(2, in_channels, 8, 12)
    context = None if context_shape is None else torch.randn(context_shape)
    out = model(x, torch.tensor([1, 500]), context=context, y=y)
    assert out.shape == (2, overrides.get("out_channels", 3), 8, 12)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def test_output_is_zero_at_init_and_depends_on_conditioning():
    model = _tiny(num_classes=4)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 3.0]), torch.randn(2, 2, 16)
    assert torch.count_nonzero(model(x, t, context=ctx, y=torch.tensor([0, 1]))) == 0  # zero-init out conv
    _randomize(model)
    base = model(x, t, context=ctx, y=torch.tensor([0, 1]))
    assert not torch.allclose(base, model(x, t, context=ctx, y=torch.tensor([2, 1])))
    assert not torch.allclose(base, model(x, torch.tensor([400.0, 3.0]), context=ctx, y=torch.tensor([0, 1])))
    assert not torch.allclose(base, model(x, t, context=ctx + 1, y=torch.tensor([0, 1])))
    # samples are independent: changing sample 0's label leaves sample 1 untouched
    torch.testing.assert_close(base[1], model(x, t, context=ctx, y=torch.tensor([2, 1]))[1])


def test_resblock_updown_resamples_both_paths():
    block = ResBlock(32, 16, out_channels=32, down=True)
    assert block(torch.randn(1, 32, 8, 8), torch.randn(1, 16)).shape == (1, 32, 4, 4)
    block = ResBlock(32, 16, out_channels=32, up=True)
    assert block(torch.randn(1, 32, 8, 8), torch.randn(1, 16)).shape == (1, 32, 16, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"context": None}, "context_dim=16"),
        ({"context": torch.randn(2, 5, 8)}, r"context must be \(B, L, 16\)"),
        ({"y": torch.tensor([1, 2])}, "y must be given exactly when"),
        ({"x": torch.randn(2, 4, 8, 8)}, r"\(B, 3, H, W\)"),
        ({"x": torch.randn(2, 3, 7, 8)}, "divisible by 2"),
        ({"timesteps": torch.tensor([1])}, "timesteps must have shape"),
    ],
)
def test_bad_inputs_fail_early(kwargs, match):
    model = _tiny()
    args = {"x": torch.randn(2, 3, 8, 8), "timesteps": torch.tensor([1, 2]), "context": torch.randn(2, 5, 16)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model(**args)


def test_bad_construction_fails_early():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        TransformerSpec((1,), num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        TransformerSpec((1,), num_heads=-1, num_head_channels=-1)
    with pytest.raises(ValueError, match="not both"):
        _tiny(num_classes=3, adm_in_channels=4)
    with pytest.raises(ValueError, match="multiples of 32"):
        _tiny(model_channels=48)
    # a plain mapping (e.g. a DictConfig without _target_) is accepted for the transformer spec
    model = _tiny(transformer={"attention_resolutions": [1], "num_heads": 4, "context_dim": 8})
    assert model.context_dim == 8 and model.transformer_spec.attention_resolutions == (1,)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def test_gradient_checkpointing_same_outputs_and_gradients_and_recomputes():
    spec = TransformerSpec((1, 2), num_heads=2, context_dim=16)
    plain, ckpt = (_tiny(transformer=spec, gradient_checkpointing=flag, num_classes=3) for flag in (False, True))
    _randomize(plain)
    ckpt.load_state_dict(plain.state_dict())
    x, ctx, y = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 16), torch.tensor([0, 2])
    t = torch.tensor([10, 900])

    calls = {"plain": 0, "ckpt": 0}
    plain.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.input_blocks[1][0].in_layers.register_forward_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    ckpt.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(
        lambda *_: calls.__setitem__("attn", calls.get("attn", 0) + 1)
    )

    out_plain, out_ckpt = plain(x, t, context=ctx, y=y), ckpt(x, t, context=ctx, y=y)
    torch.testing.assert_close(out_ckpt, out_plain)  # two modules' calls: fp32 rounding only
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    grads_plain = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads_plain[name].grad, rtol=1e-6, atol=1e-7, msg=name)
    # checkpointed blocks ran their forward a second time during backward
    assert calls == {"plain": 1, "ckpt": 2, "attn": 2}


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.5 state-dict layout


def _sd15_expected_shapes() -> dict[str, tuple[int, ...]]:
    """`model.diffusion_model.*` tensors of the SD-1.5 checkpoint (prefix stripped), written from the
    published layout: 320/640/1280/1280 channels, 2 ResBlocks per level, transformers (8 heads, 768-d
    CLIP context) at the first three levels and in the middle, conv downsamplers at input blocks 3/6/9,
    upsamplers at output blocks 2/5/8."""
    emb = 1280
    shapes: dict[str, tuple[int, ...]] = {
        "time_embed.0.weight": (emb, 320), "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,),
        "input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.0.0.bias": (320,),
        "out.0.weight": (320,), "out.0.bias": (320,), "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,),
    }

    def resblock(prefix, c_in, c_out):
        shapes.update({
            f"{prefix}.in_layers.0.weight": (c_in,), f"{prefix}.in_layers.0.bias": (c_in,),
            f"{prefix}.in_layers.2.weight": (c_out, c_in, 3, 3), f"{prefix}.in_layers.2.bias": (c_out,),
            f"{prefix}.emb_layers.1.weight": (c_out, emb), f"{prefix}.emb_layers.1.bias": (c_out,),
            f"{prefix}.out_layers.0.weight": (c_out,), f"{prefix}.out_layers.0.bias": (c_out,),
            f"{prefix}.out_layers.3.weight": (c_out, c_out, 3, 3), f"{prefix}.out_layers.3.bias": (c_out,),
        })
        if c_in != c_out:
            shapes.update({f"{prefix}.skip_connection.weight": (c_out, c_in, 1, 1),
                           f"{prefix}.skip_connection.bias": (c_out,)})

    def transformer(prefix, c):
        b = f"{prefix}.transformer_blocks.0"
        shapes.update({
            f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
            f"{prefix}.proj_in.weight": (c, c, 1, 1), f"{prefix}.proj_in.bias": (c,),
            f"{prefix}.proj_out.weight": (c, c, 1, 1), f"{prefix}.proj_out.bias": (c,),
            f"{b}.attn1.to_q.weight": (c, c), f"{b}.attn1.to_k.weight": (c, c), f"{b}.attn1.to_v.weight": (c, c),
            f"{b}.attn1.to_out.0.weight": (c, c), f"{b}.attn1.to_out.0.bias": (c,),
            f"{b}.attn2.to_q.weight": (c, c), f"{b}.attn2.to_k.weight": (c, 768), f"{b}.attn2.to_v.weight": (c, 768),
            f"{b}.attn2.to_out.0.weight": (c, c), f"{b}.attn2.to_out.0.bias": (c,),
            f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
            f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,),
        })
        for n in (1, 2, 3):
            shapes.update({f"{b}.norm{n}.weight": (c,), f"{b}.norm{n}.bias": (c,)})

    def conv(prefix, c):
        shapes.update({f"{prefix}.weight": (c, c, 3, 3), f"{prefix}.bias": (c,)})

    # input blocks: (index, in, out, has transformer)
    for i, c_in, c_out, attn in [(1, 320, 320, 1), (2, 320, 320, 1), (4, 320, 640, 1), (5, 640, 640, 1),
                                 (7, 640, 1280, 1), (8, 1280, 1280, 1), (10, 1280, 1280, 0), (11, 1280, 1280, 0)]:
        resblock(f"input_blocks.{i}.0", c_in, c_out)
        if attn:
            transformer(f"input_blocks.{i}.1", c_out)
    for i, c in [(3, 320), (6, 640), (9, 1280)]:
        conv(f"input_blocks.{i}.0.op", c)
    resblock("middle_block.0", 1280, 1280)
    transformer("middle_block.1", 1280)
    resblock("middle_block.2", 1280, 1280)
    # output blocks: (index, in = h + skip, out, has transformer); upsamplers after blocks 2, 5, 8
    for i, c_in, c_out, attn in [(0, 2560, 1280, 0), (1, 2560, 1280, 0), (2, 2560, 1280, 0),
                                 (3, 2560, 1280, 1), (4, 2560, 1280, 1), (5, 1920, 1280, 1),
                                 (6, 1920, 640, 1), (7, 1280, 640, 1), (8, 960, 640, 1),
                                 (9, 960, 320, 1), (10, 640, 320, 1), (11, 640, 320, 1)]:
        resblock(f"output_blocks.{i}.0", c_in, c_out)
        if attn:
            transformer(f"output_blocks.{i}.1", c_out)
    conv("output_blocks.2.1.conv", 1280)
    conv("output_blocks.5.2.conv", 1280)
    conv("output_blocks.8.2.conv", 640)
    return shapes


def _sd15_unet_on_meta() -> UNetModel:
    with torch.device("meta"):  # no memory: only names and shapes are needed
        return UNetModel(
            in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
            transformer=TransformerSpec(attention_resolutions=(4, 2, 1), num_heads=8, context_dim=768),
        )


def test_sd15_state_dict_layout_matches_checkpoint():
    model = _sd15_unet_on_meta()
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _sd15_expected_shapes()
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert actual == expected
    assert len(actual) == 686
    assert sum(p.numel() for p in model.parameters()) == 859_520_964
    for key, shape in {
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "time_embed.0.weight": (1280, 320),
        "out.2.weight": (4, 320, 3, 3),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "output_blocks.8.0.skip_connection.weight": (640, 960, 1, 1),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "input_blocks.7.1.transformer_blocks.0.attn1.to_out.0.bias": (1280,),
    }.items():
        assert actual[key] == shape, key


# ---------------------------------------------------------------------------------------------
# numerical equality with diffusers after diffusers' own checkpoint conversion


@pytest.mark.parametrize("variant", ["sd1-conv", "sd2-linear-scale-shift", "adm-vector", "class-labels"])
def test_matches_diffusers_unet_after_official_conversion(variant):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    # CompVis-style unet_config params, as found in SD yaml files
    params = dict(in_channels=5, out_channels=3, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[2], num_heads=2, transformer_depth=1, context_dim=24)
    unet_kwargs = {}
    if variant != "sd1-conv":
        params.update(channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[1, 2],
                      num_head_channels=16, transformer_depth=2, use_linear_in_transformer=True)
        del params["num_heads"]
    if variant == "adm-vector":
        params.update(num_classes="sequential", adm_in_channels=12)
        unet_kwargs["adm_in_channels"] = 12
    if variant == "class-labels":
        unet_kwargs["num_classes"] = 7
    scale_shift = variant == "sd2-linear-scale-shift"
    spec = TransformerSpec(
        params["attention_resolutions"], params.get("num_heads"), params.get("num_head_channels"),
        params["transformer_depth"], params["context_dim"], params.get("use_linear_in_transformer", False),
    )
    model = UNetModel(5, 3, 32, params["channel_mult"], params["num_res_blocks"], spec,
                      use_scale_shift_norm=scale_shift, **unet_kwargs).eval()
    _randomize(model, seed=3)

    original_config = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    if scale_shift:
        config["resnet_time_scale_shift"] = "scale_shift"
    if variant == "class-labels":
        config["num_class_embeds"] = 7
    reference = diffusers.UNet2DConditionModel(**config).eval()
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    reference.load_state_dict(converted, strict=True)  # every key converts, none left over

    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 5, 8, 8, generator=gen), torch.randn(2, 6, 24, generator=gen)
    t = torch.tensor([3, 700])
    y = {"adm-vector": torch.randn(2, 12, generator=gen), "class-labels": torch.tensor([1, 6])}.get(variant)
    with torch.no_grad():
        ours = model(x, t, context=ctx, y=y)
        theirs = reference(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert ours.abs().mean() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
