"""Guidance beyond plain CFG at the denoiser contract: a band of noise levels (Kynkäänniemi et al. 2024) and
autoguidance (Karras et al. 2024), under every sampler."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.guidance import Autoguidance, ClassifierFreeGuidance, GuidanceInterval
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

B = 3
STEPS = {"ddpm": 12, "ddim": 12, "dpmpp_2m": 12, "euler": 12, "heun": 7}


class Net:
    """x0_hat that depends on x, t and the condition (so guidance changes the result); records every call's
    batch size and timesteps."""

    def __init__(self, gain: float = 0.5):
        self.gain = gain
        self.calls: list[tuple[int, list[float]]] = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], t.tolist()))
        level = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (self.gain + 0.3 * level) * x + level + expand_as_batch(t / 1000, x)


def _cond(batch=B):
    gen = torch.Generator().manual_seed(0)
    return {"context": torch.randn(batch, 5, 8, generator=gen) + 1.0}, {"context": torch.zeros(1, 5, 8)}


def _sample(name, denoise, schedule):
    noise = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    return sample(name, denoise, noise, schedule, steps=STEPS[name], cond=_cond()[0],
                  generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_band_covering_every_step_is_plain_cfg_and_one_covering_none_is_no_guidance(name):
    schedule = NoiseSchedule("scaled_linear")
    cond, uncond = _cond()
    plain = _sample(name, ClassifierFreeGuidance(Net(), uncond, 3.0, schedule=schedule), schedule)
    every = GuidanceInterval(0.0, math.inf, unit="sigma")
    assert torch.equal(_sample(name, ClassifierFreeGuidance(Net(), uncond, 3.0, schedule=schedule, interval=every),
                               schedule), plain)
    unguided = _sample(name, ClassifierFreeGuidance(Net(), uncond, 1.0, schedule=schedule), schedule)
    none = GuidanceInterval(1e6, 1e7, unit="sigma")  # above every sigma the schedule reaches
    assert torch.equal(_sample(name, ClassifierFreeGuidance(Net(), uncond, 3.0, schedule=schedule, interval=none),
                               schedule), unguided)
    assert not torch.allclose(plain, unguided)  # so the two equalities above say something


@pytest.mark.parametrize("unit", ["t", "sigma"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_guides_exactly_the_network_calls_inside_the_band(name, unit):
    schedule = NoiseSchedule("scaled_linear")
    low, high = (200.0, 700.0) if unit == "t" else (0.5, 3.0)
    interval = GuidanceInterval(low, high, unit=unit)
    net = Net()
    _sample(name, ClassifierFreeGuidance(net, _cond()[1], 3.0, schedule=schedule, interval=interval), schedule)
    guided = []
    for batch, ts in net.calls:
        t = ts[0]
        level = t if unit == "t" else float(schedule.ve_sigma(torch.tensor([t]), torch.float64))
        assert batch == (2 * B if low <= level <= high else B), (t, level, batch)
        guided.append(batch == 2 * B)
    assert any(guided) and not all(guided)  # the band splits this sampler's steps


def test_a_batch_straddling_the_band_is_guided_only_inside_it():
    x = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 10.0])
    cond, uncond = _cond()
    out = ClassifierFreeGuidance(Net(), uncond, 4.0, interval=GuidanceInterval(100, 600, unit="t"))(x, t, cond)
    guided = ClassifierFreeGuidance(Net(), uncond, 4.0)(x, t, cond)
    plain = Net()(x, t, cond)
    torch.testing.assert_close(out[1], guided[1])
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]])


def test_autoguidance_extrapolates_from_the_guide_with_its_own_condition():
    x = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 10.0])
    cond, _ = _cond()
    guide_cond = {"context": cond["context"] * 0.5}
    model, guide = Net(0.5), Net(0.2)
    out = Autoguidance(model, guide, 2.5, guide_cond=guide_cond)(x, t, cond)
    expected_guide = Net(0.2)(x, t, guide_cond)
    torch.testing.assert_close(out, expected_guide + 2.5 * (Net(0.5)(x, t, cond) - expected_guide))
    assert [c[0] for c in model.calls] == [B] and [c[0] for c in guide.calls] == [B]


def test_autoguidance_by_the_model_itself_is_no_guidance():
    x = torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 10.0])
    cond, _ = _cond()
    net = Net()
    torch.testing.assert_close(Autoguidance(net, net, 3.0)(x, t, cond), Net()(x, t, cond), rtol=1e-6, atol=1e-6)


def test_autoguidance_honours_the_band_and_rescale():
    schedule = NoiseSchedule("scaled_linear")
    guide = Net(0.2)
    auto = Autoguidance(Net(), guide, 3.0, rescale=0.7, schedule=schedule,
                        interval=GuidanceInterval(0, 600, unit="t"))
    _sample("ddim", auto, schedule)
    assert guide.calls and all(ts[0] <= 600 for _, ts in guide.calls)
    assert len(guide.calls) < STEPS["ddim"]


@pytest.mark.parametrize("kwargs, match", [
    ({"unit": "snr"}, "unit must be one of"),
    ({"low": 5.0, "high": 1.0}, "low <= high"),
    ({"low": -1.0}, "low <= high"),
])
def test_a_bad_band_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceInterval(**kwargs)


def test_a_sigma_band_needs_the_schedule():
    with pytest.raises(ValueError, match="needs the NoiseSchedule"):
        ClassifierFreeGuidance(Net(), _cond()[1], 3.0, interval=GuidanceInterval(0.5, 3.0))
