"""Zero terminal SNR (Lin et al. 2023) with every schedule and every sampler: the VE sigma of the last step is
infinite, so samplers in VE space start from a capped sigma; that cap must stay above sigma(T-2), and the
sampler's and the denoiser's notion of a fractional t near T-1 must agree."""

import math
import warnings

import pytest
import torch

from ldm.diffusion import samplers as S
from ldm.diffusion.objective import denoiser
from ldm.diffusion.parameterization import Parameterization
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

KINDS = ["linear", "scaled_linear", "cosine", "sigmoid"]
# (sampler, karras) for every sampler, with Karras sigmas on and off where the sampler takes them.
RUNS = [("ddpm", None), ("ddim", None)] + [(n, k) for n in ("dpmpp_2m", "euler", "heun") for k in (False, True)]
DATA_MEAN, DATA_STD = 0.3, 0.5


def _schedule(kind):
    return NoiseSchedule(kind, zero_terminal_snr=True)


def _recording_v_denoiser(schedule, seen):
    """The Bayes-optimal v-prediction for data N(DATA_MEAN, DATA_STD^2), through the real Parameterization, so
    the schedule is queried at exactly the t the sampler asks for; every t is recorded."""

    def model(x, t, cond):
        seen.append(t.clone())
        a = expand_as_batch(schedule.alpha(t, x.dtype), x)
        s = expand_as_batch(schedule.sigma(t, x.dtype), x)
        x0 = DATA_MEAN + a * DATA_STD**2 / (a**2 * DATA_STD**2 + s**2) * (x - a * DATA_MEAN)
        eps = (x - a * x0) / s.clamp(min=1e-12)
        return a * eps - s * x0

    return denoiser(model, Parameterization(schedule, "v"))


@pytest.mark.parametrize("kind", KINDS)
def test_terminal_cap_stays_above_the_previous_level(kind):
    schedule = _schedule(kind)
    before_last = schedule.ve_sigma(schedule.num_train_timesteps - 2, torch.float64).item()
    assert math.isfinite(schedule.ve_sigma_max) and schedule.ve_sigma_max > before_last
    # diffusers' cap (alphas_cumprod = 2**-24) wherever it already lies above sigma(T-2)
    if before_last < 4096:
        assert schedule.ve_sigma_max == pytest.approx(math.sqrt(2**24 - 1))


@pytest.mark.parametrize("kind", KINDS)
def test_fractional_t_near_the_end_is_the_same_for_sampler_and_denoiser(kind):
    schedule = _schedule(kind)
    last = schedule.num_train_timesteps - 1
    assert schedule.t_from_ve_sigma(schedule.ve_sigma_max, torch.float64).item() == pytest.approx(last)
    lo = schedule.ve_sigma(last - 1, torch.float64).item()
    sigmas = torch.tensor([lo * 1.001, math.sqrt(lo * schedule.ve_sigma_max), schedule.ve_sigma_max * 0.999],
                          dtype=torch.float64)
    t = schedule.t_from_ve_sigma(sigmas, torch.float64)
    assert torch.isfinite(t).all() and (t > last - 1).all() and (t < last).all()
    # the denoiser sees the noise level the sampler meant: alpha > 0 strictly before T-1
    torch.testing.assert_close(schedule.ve_sigma(t, torch.float64), sigmas)
    assert (schedule.alpha(t, torch.float64) > 0).all()
    assert schedule.alpha(torch.tensor([float(last)])).item() == 0.0  # exactly pure noise at T-1 itself


def test_nan_timesteps_are_rejected():
    schedule = NoiseSchedule("linear")
    with pytest.raises(ValueError, match="timesteps must lie in"):
        schedule.alpha(torch.tensor([5.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        schedule.t_from_ve_sigma(torch.tensor([float("nan")]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [10, 290, 300, 1000])
@pytest.mark.parametrize("karras", [False, True])
def test_sampler_levels_are_strictly_monotone(kind, steps, karras):
    schedule = _schedule(kind)
    t, sigmas = S._ve_levels(schedule, steps, "trailing", None, karras, 7.0)
    t, sigmas = torch.tensor(t), torch.tensor(sigmas)
    assert torch.isfinite(t).all() and torch.isfinite(sigmas).all()
    assert (t.diff() < 0).all() and (sigmas.diff() < 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,karras", RUNS)
def test_every_sampler_runs_on_every_zero_snr_schedule(kind, name, karras):
    schedule = _schedule(kind)
    seen = []
    kwargs = {} if karras is None else {"karras": karras}
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = S.sample(name, _recording_v_denoiser(schedule, seen), noise, schedule, steps=12,
                   generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.isfinite(out).all()
    # a sample of the data distribution, not a blow-up (the Bayes-optimal model makes every sampler accurate)
    assert abs(out.mean().item() - DATA_MEAN) < 0.6 and out.abs().max() < 3.0
    ts = torch.stack([t[0] for t in seen]).double()
    assert torch.isfinite(ts).all() and ts[0] == pytest.approx(schedule.num_train_timesteps - 1)
    assert (ts.diff() <= 0).all()  # Heun evaluates each level twice: non-increasing


@pytest.mark.parametrize("karras", [False, True])
def test_heun_takes_the_euler_step_out_of_pure_noise(karras):
    # The trapezoid over (sigma_next, cap) would weight the slope at sigma_next by half an interval that is
    # really infinite: on sigmoid + trailing 12 steps that tripled the sample std. The first step is Euler (DDIM).
    schedule = _schedule("sigmoid")
    seen = []
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = S.sample_heun(_recording_v_denoiser(schedule, seen), noise, schedule, 12, karras=karras)
    assert len(seen) == 2 * 12 - 2
    assert seen[0][0] == schedule.num_train_timesteps - 1 and seen[1][0] < seen[0][0]
    assert out.std().item() == pytest.approx(DATA_STD, rel=0.7 if karras else 0.15)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "heun"])
def test_leading_spacing_warns_that_it_never_starts_from_pure_noise(name):
    schedule = _schedule("scaled_linear")
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="timestep_spacing=trailing"):
        S.sample(name, _recording_v_denoiser(schedule, []), noise, schedule, steps=5, timestep_spacing="leading")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        S.sample(name, _recording_v_denoiser(schedule, []), noise, schedule, steps=5, timestep_spacing="trailing")
        S.sample(name, _recording_v_denoiser(NoiseSchedule("scaled_linear"), []), noise, NoiseSchedule("scaled_linear"),
                 steps=5, timestep_spacing="leading")
