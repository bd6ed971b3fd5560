"""Noise schedules against their defining formulas, Bayes' rule and diffusers."""

import math

import numpy as np
import pytest
import torch

from ldm.diffusion.schedules import (
    NoiseSchedule,
    cosine_alpha_bar,
    karras_sigmas,
    rescale_zero_terminal_snr,
    sampling_timesteps,
    sigmoid_alpha_bar,
    ve_to_vp,
    vp_to_ve,
)


@pytest.mark.parametrize(
    "kind,start,end,sqrt_spaced",
    [("linear", 1e-4, 2e-2, False), ("scaled_linear", 0.00085, 0.012, True), ("linear", 5e-4, 1e-2, False)],
)
def test_linear_families_closed_form(kind, start, end, sqrt_spaced):
    schedule = NoiseSchedule(kind, 1000, beta_start=start, beta_end=end)
    if sqrt_spaced:
        expected = np.linspace(math.sqrt(start), math.sqrt(end), 1000) ** 2
    else:
        expected = np.linspace(start, end, 1000)
    np.testing.assert_allclose(schedule.betas.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - expected), rtol=1e-10)


def test_cosine_matches_nichol_dhariwal_formula():
    T, s = 1000, 0.008
    schedule = NoiseSchedule("cosine", T)

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = schedule.betas.numpy()
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)
    unclipped = np.flatnonzero(np.cumsum(betas >= 0.999) == 0)  # steps before the first clipped beta
    assert len(unclipped) > 990
    expected = np.array([f((i + 1) / T) / f(0) for i in unclipped])
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[unclipped], expected, rtol=1e-9)
    torch.testing.assert_close(
        cosine_alpha_bar(torch.tensor([0.5], dtype=torch.float64)),
        torch.tensor([f(0.5)], dtype=torch.float64),
    )


def test_sigmoid_matches_chen_formula():
    T = 1000
    schedule = NoiseSchedule("sigmoid", T)

    def gamma(u, start=-3.0, end=3.0):
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        return (sig(end) - sig(u * (end - start) + start)) / (sig(end) - sig(start))

    ac = schedule.alphas_cumprod.numpy()
    idx = np.arange(0, 990, 37)
    np.testing.assert_allclose(ac[idx], [gamma((i + 1) / T) for i in idx], rtol=1e-9)
    assert sigmoid_alpha_bar(torch.tensor([0.0], dtype=torch.float64)).item() == pytest.approx(1.0)
    assert np.all(np.diff(ac) < 0)


@pytest.mark.parametrize(
    "kind,name,kwargs",
    [
        ("linear", "linear", dict(beta_start=1e-4, beta_end=2e-2)),
        ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
        ("cosine", "squaredcos_cap_v2", {}),
    ],
)
def test_schedules_match_diffusers_betas(kind, name, kwargs):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule=name, **kwargs).betas.double()  # float32 there
    torch.testing.assert_close(NoiseSchedule(kind).betas, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_zero_terminal_snr(kind):
    base = NoiseSchedule(kind)
    ztsnr = NoiseSchedule(kind, zero_terminal_snr=True)
    T = base.num_train_timesteps
    assert ztsnr.snr(T - 1).item() == 0.0
    assert ztsnr.alpha(T - 1).item() == 0.0 and ztsnr.sigma(T - 1).item() == 1.0
    assert ztsnr.snr(0, torch.float64).item() == pytest.approx(base.snr(0, torch.float64).item(), rel=1e-9)
    # Algorithm 1 is an affine map of sqrt(alphas_cumprod): shift the last value to 0, keep the first.
    old, new = base.alphas_cumprod.sqrt(), ztsnr.alphas_cumprod.sqrt()
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-12)
    assert torch.all(ztsnr.snr(torch.arange(T - 1)) > 0)


def test_zero_terminal_snr_matches_diffusers():
    ddim = pytest.importorskip("diffusers.schedulers.scheduling_ddim")
    betas = NoiseSchedule("scaled_linear").betas.float()
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), ddim.rescale_zero_terminal_snr(betas))


def test_q_sample_moments_match_closed_form():
    schedule = NoiseSchedule("linear")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 1.5)
    t = torch.full((20000,), 300)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    abar = float(torch.prod(1 - schedule.betas[:301]))  # the Markov chain's marginal, DDPM eq. 4
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 1.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.03)


@pytest.mark.parametrize("t,s", [(500, 499), (1, 0), (700, 650), (37, -1), (999, 0)])
def test_posterior_matches_bayes_rule(t, s):
    """q(x_s | x_t, x0) ∝ q(x_t | x_s) q(x_s | x0) with Gaussian conjugacy, independently of DDPM eq. 7."""
    schedule = NoiseSchedule("scaled_linear")
    abar = schedule.alphas_cumprod
    abar_s = 1.0 if s < 0 else float(abar[s])
    a_ts = float(abar[t]) / abar_s  # x_t | x_s ~ N(sqrt(a_ts) x_s, 1 - a_ts)
    x0, x_t = torch.tensor([0.3, -1.2]), torch.tensor([1.1, 0.4])
    prior_var = 1 - abar_s  # x_s | x0 ~ N(sqrt(abar_s) x0, 1 - abar_s)
    if prior_var == 0:
        exp_mean, exp_var = x0.double(), 0.0
    else:
        precision = 1 / prior_var + a_ts / (1 - a_ts)
        exp_var = 1 / precision
        exp_mean = exp_var * (
            math.sqrt(abar_s) * x0.double() / prior_var + math.sqrt(a_ts) * x_t.double() / (1 - a_ts)
        )
    tt = torch.tensor([t, t])
    mean, var = schedule.posterior(
        x0.double(), x_t.double(), tt, None if s == t - 1 else torch.tensor([s, s])
    )
    torch.testing.assert_close(mean, exp_mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, torch.full((2,), exp_var, dtype=torch.float64), rtol=1e-9, atol=1e-15)


def test_fractional_timesteps_interpolate_log_sigma_and_invert():
    schedule = NoiseSchedule("scaled_linear")
    t_int = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(schedule.alpha(t_int.float()), schedule.alpha(t_int))
    frac = torch.tensor([10.25, 500.5, 998.75], dtype=torch.float64)
    lo, hi = frac.floor().long(), frac.floor().long() + 1
    w = frac - lo
    log_sig = (1 - w) * schedule.ve_sigma(lo, torch.float64).log() + w * schedule.ve_sigma(
        hi, torch.float64
    ).log()
    torch.testing.assert_close(schedule.ve_sigma(frac, torch.float64).log(), log_sig)
    sigmas = torch.tensor([0.05, 1.0, 7.3, schedule.ve_sigma_max], dtype=torch.float64)
    round_trip = schedule.ve_sigma(schedule.t_from_ve_sigma(sigmas, torch.float64), torch.float64)
    torch.testing.assert_close(round_trip, sigmas)
    alpha, sigma = schedule.alpha(frac, torch.float64), schedule.sigma(frac, torch.float64)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(vp_to_ve(alpha, sigma), schedule.ve_sigma(frac, torch.float64))
    torch.testing.assert_close(torch.stack(ve_to_vp(vp_to_ve(alpha, sigma))), torch.stack([alpha, sigma]))


def test_queries_follow_t_device_and_default_to_float32():
    schedule = NoiseSchedule("linear")
    t = torch.tensor([3, 4])
    assert schedule.alpha(t).dtype == torch.float32 and schedule.snr(t, torch.float64).dtype == torch.float64
    assert (
        schedule.q_sample(
            torch.zeros(2, 3, dtype=torch.bfloat16), t, torch.ones(2, 3, dtype=torch.bfloat16)
        ).dtype
        == torch.bfloat16
    )
    if torch.cuda.is_available():
        assert schedule.sigma(t.cuda()).device.type == "cuda"


def test_zero_terminal_snr_ve_range_is_capped_like_diffusers():
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    assert schedule.ve_sigma_max == pytest.approx(math.sqrt(2**24 - 1))
    assert schedule.t_from_ve_sigma(schedule.ve_sigma_max).item() == pytest.approx(999.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 30, 50, 1000])
def test_sampling_timesteps_match_diffusers(spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert sampling_timesteps(1000, steps, spacing).tolist() == ref.timesteps.tolist()


def test_karras_sigmas_formula():
    sigmas = karras_sigmas(5, 0.03, 14.6, rho=7.0)
    assert sigmas[0].item() == pytest.approx(14.6) and sigmas[-1].item() == pytest.approx(0.03)
    inv = sigmas ** (1 / 7)
    torch.testing.assert_close(inv.diff(), torch.full((4,), inv.diff()[0].item(), dtype=torch.float64))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="beta_start/beta_end to null"):
        NoiseSchedule("cosine", beta_start=1e-4)
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        NoiseSchedule("linear", beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        NoiseSchedule().alpha(torch.tensor([1000]))
    with pytest.raises(ValueError, match="timestep_spacing"):
        sampling_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps must be in"):
        sampling_timesteps(1000, 1001)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_schedule_configs_instantiate(kind):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "schedule" / f"{kind}.yaml"
    schedule = instantiate(OmegaConf.load(conf))
    assert isinstance(schedule, NoiseSchedule) and schedule.kind == kind
    assert schedule.num_train_timesteps == 1000 and not schedule.zero_terminal_snr
