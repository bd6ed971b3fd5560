"""Classifier-free guidance wrapper: formula, one batched call, exact scale 1, rescale."""

import pytest
import torch

from ldm.diffusion.guidance import ClassifierFreeGuidance
from ldm.diffusion.samplers import sample
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch


class CountingDenoiser:
    """x0_hat depends on x, t and the conditioning so cond/uncond halves differ; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], {k: None if v is None else v.clone() for k, v in cond.items()}))
        level = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (0.5 + 0.3 * level) * x + level + expand_as_batch(t / 1000, x)


def _inputs(batch=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, generator=gen)
    t = torch.tensor([900.0, 500.0, 10.0])[:batch]
    cond = {"context": torch.randn(batch, 5, 8, generator=gen) + 1.0, "y": None}
    uncond = {"context": torch.zeros(1, 5, 8), "y": None}
    return x, t, cond, uncond


def test_scale_one_is_the_conditional_prediction_exactly():
    x, t, cond, uncond = _inputs()
    den = CountingDenoiser()
    out = ClassifierFreeGuidance(den, uncond, scale=1.0)(x, t, cond)
    assert torch.equal(out, CountingDenoiser()(x, t, cond))
    assert [c[0] for c in den.calls] == [3]


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_formula_with_one_batched_call(scale):
    x, t, cond, uncond = _inputs()
    den = CountingDenoiser()
    out = ClassifierFreeGuidance(den, uncond, scale=scale)(x, t, cond)
    assert len(den.calls) == 1 and den.calls[0][0] == 6
    batched = den.calls[0][1]
    assert batched["y"] is None
    torch.testing.assert_close(batched["context"][:3], cond["context"])
    torch.testing.assert_close(batched["context"][3:], uncond["context"].expand(3, 5, 8))
    x0_c = CountingDenoiser()(x, t, cond)
    x0_u = CountingDenoiser()(x, t, {"context": torch.zeros(3, 5, 8), "y": None})
    torch.testing.assert_close(out, x0_u + scale * (x0_c - x0_u))


def test_guidance_rescale_in_v_space():
    schedule = NoiseSchedule("scaled_linear")
    x, t, cond, uncond = _inputs()
    phi, scale = 0.7, 6.0
    out = ClassifierFreeGuidance(CountingDenoiser(), uncond, scale, rescale=phi, schedule=schedule)(
        x, t, cond
    )
    a, s = expand_as_batch(schedule.alpha(t), x), expand_as_batch(schedule.sigma(t), x)
    x0_c = CountingDenoiser()(x, t, cond)
    x0_u = CountingDenoiser()(x, t, {"context": torch.zeros(3, 5, 8), "y": None})
    v_c, v_u = (a * x - x0_c) / s, (a * x - x0_u) / s
    v_cfg = v_u + scale * (v_c - v_u)
    std = lambda v: v.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    v_final = phi * v_cfg * std(v_c) / std(v_cfg) + (1 - phi) * v_cfg  # Lin et al. 2023, eq. 15-17
    torch.testing.assert_close(out, a * x - s * v_final)
    plain = ClassifierFreeGuidance(CountingDenoiser(), uncond, scale)(x, t, cond)
    assert not torch.allclose(out, plain)


def test_bad_conditions_raise():
    x, t, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="must match"):
        ClassifierFreeGuidance(CountingDenoiser(), {"context": uncond["context"]}, 2.0)(x, t, cond)
    with pytest.raises(ValueError, match="both be tensors or both be None"):
        ClassifierFreeGuidance(CountingDenoiser(), {"context": uncond["context"], "y": torch.zeros(1)}, 2.0)(
            x, t, cond
        )
    with pytest.raises(ValueError, match="batch 3"):
        ClassifierFreeGuidance(CountingDenoiser(), {"context": torch.zeros(2, 5, 8), "y": None}, 2.0)(
            x, t, cond
        )
    with pytest.raises(ValueError, match="schedule="):
        ClassifierFreeGuidance(CountingDenoiser(), uncond, 2.0, rescale=0.5)


def test_guided_denoiser_plugs_into_a_sampler_with_one_call_per_step():
    x, t, cond, uncond = _inputs()
    den = CountingDenoiser()
    out = sample("dpmpp_2m", ClassifierFreeGuidance(den, uncond, 4.0), x, NoiseSchedule(), steps=5, cond=cond)
    assert [c[0] for c in den.calls] == [6] * 5 and torch.isfinite(out).all()
