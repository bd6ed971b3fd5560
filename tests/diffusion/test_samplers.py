"""Samplers against diffusers' schedulers (same model, same noise) and against closed-form Gaussian flows."""

import math

import pytest
import torch

from ldm.diffusion import samplers as S
from ldm.diffusion.objective import denoiser
from ldm.diffusion.parameterization import Parameterization
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

diffusers = pytest.importorskip("diffusers")

DATA_STD = 0.5
BETA_RANGE = {"linear": (1e-4, 2e-2), "scaled_linear": (0.00085, 0.012)}
# Relative tolerance (max abs error / max abs value) per sampler vs diffusers; observed errors are ~1e-6.
TOLERANCE = {"ddim": 1e-4, "ddpm": 1e-4, "dpmpp_2m": 1e-4, "euler": 1e-4, "heun": 1e-4}


def _data_mean(shape=(1, 4, 8, 8)):
    return 0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _as_batch_time(t, x):
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.float()


def gaussian_model(schedule, prediction="eps", wiggle=0.05):
    """Bayes-optimal network for data N(mu, DATA_STD^2 I), plus a smooth x- and t-dependent perturbation of its
    x0 (so the ODE is not linear), returning eps, v or x0; finite at alpha = 0. Ours and diffusers share it."""
    mu = _data_mean()

    def model(x, t):
        t = _as_batch_time(t, x)
        a = expand_as_batch(schedule.alpha(t, x.dtype), x)
        s = expand_as_batch(schedule.sigma(t, x.dtype), x)
        x0 = mu + a * DATA_STD**2 / (a**2 * DATA_STD**2 + s**2) * (x - a * mu)
        x0 = x0 + wiggle * torch.sin(3 * x) * expand_as_batch(torch.cos(t / 200), x)
        eps = (x - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]

    return model


def _ours(schedule, prediction="eps", wiggle=0.05):
    model = gaussian_model(schedule, prediction, wiggle)
    return denoiser(lambda x, t, cond: model(x, t), Parameterization(schedule, prediction))


def _noise(seed=0):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _run_diffusers(scheduler, model, noise, steps=None, timesteps=None, init_scale=1.0, **step_kwargs):
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = noise * init_scale
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def _assert_rel_close(ours, ref, rtol):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err < rtol, f"relative error {err:.3e} >= {rtol}"


def _diffusers_kwargs(kind):
    start, end = BETA_RANGE[kind]
    return dict(num_train_timesteps=1000, beta_schedule=kind, beta_start=start, beta_end=end)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize(
    "spacing,steps", [("leading", 50), ("trailing", 50), ("trailing", 10), ("leading", 7)]
)
def test_ddim_matches_diffusers(kind, spacing, steps):
    schedule = NoiseSchedule(kind)
    ref_sched = diffusers.DDIMScheduler(
        **_diffusers_kwargs(kind), clip_sample=False, timestep_spacing=spacing
    )
    ref = _run_diffusers(ref_sched, gaussian_model(schedule), _noise(), steps, eta=0.0)
    ours = S.sample_ddim(_ours(schedule), _noise(), schedule, steps, timestep_spacing=spacing)
    _assert_rel_close(ours, ref, TOLERANCE["ddim"])


def test_ddim_eta_matches_diffusers_with_same_generator():
    schedule = NoiseSchedule("scaled_linear")
    ref_sched = diffusers.DDIMScheduler(
        **_diffusers_kwargs("scaled_linear"), clip_sample=False, timestep_spacing="trailing"
    )
    gen = torch.Generator().manual_seed(7)
    ref = _run_diffusers(ref_sched, gaussian_model(schedule), _noise(), 20, eta=0.7, generator=gen)
    gen = torch.Generator().manual_seed(7)
    ours = S.sample_ddim(_ours(schedule), _noise(), schedule, 20, eta=0.7, generator=gen)
    _assert_rel_close(ours, ref, TOLERANCE["ddim"])


def test_ddim_v_prediction_zero_terminal_snr_matches_diffusers():
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    ref_sched = diffusers.DDIMScheduler(
        **_diffusers_kwargs("scaled_linear"),
        clip_sample=False,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    )
    model = gaussian_model(schedule, "v")
    ref = _run_diffusers(ref_sched, model, _noise(), 25, eta=0.0)
    ours = S.sample_ddim(_ours(schedule, "v"), _noise(), schedule, 25, timestep_spacing="trailing")
    assert torch.isfinite(ours).all()
    _assert_rel_close(ours, ref, TOLERANCE["ddim"])


# Not ("large", "trailing"): diffusers adds beta-sized noise on the last step into the clean sample when that
# step starts at t > 0; ours adds none there.
@pytest.mark.parametrize(
    "variance,diffusers_variance,spacing",
    [
        ("small", "fixed_small", "leading"),
        ("small", "fixed_small", "trailing"),
        ("large", "fixed_large", "leading"),
    ],
)
def test_ddpm_matches_diffusers_with_same_generator(variance, diffusers_variance, spacing):
    schedule = NoiseSchedule("linear")
    ref_sched = diffusers.DDPMScheduler(
        **_diffusers_kwargs("linear"),
        clip_sample=False,
        variance_type=diffusers_variance,
        timestep_spacing=spacing,
    )
    ref = _run_diffusers(
        ref_sched, gaussian_model(schedule), _noise(), 40, generator=torch.Generator().manual_seed(3)
    )
    ours = S.sample_ddpm(
        _ours(schedule),
        _noise(),
        schedule,
        40,
        timestep_spacing=spacing,
        variance=variance,
        generator=torch.Generator().manual_seed(3),
    )
    _assert_rel_close(ours, ref, TOLERANCE["ddpm"])


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [20, 8])
def test_dpmpp_2m_matches_diffusers_trailing(kind, steps):
    schedule = NoiseSchedule(kind)
    ref_sched = diffusers.DPMSolverMultistepScheduler(
        **_diffusers_kwargs(kind), algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )
    ref = _run_diffusers(ref_sched, gaussian_model(schedule), _noise(), steps)
    ours = S.sample_dpmpp_2m(_ours(schedule), _noise(), schedule, steps, timestep_spacing="trailing")
    _assert_rel_close(ours, ref, TOLERANCE["dpmpp_2m"])


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_dpmpp_2m_matches_diffusers_on_our_timesteps(spacing):
    # diffusers' DPM-Solver defines linspace/leading on steps+1 points (unlike its DDIM/Euler); compare the
    # algorithm on one shared timestep list.
    schedule = NoiseSchedule("scaled_linear")
    ts = S.sampling_timesteps(1000, 15, spacing).tolist()
    ref_sched = diffusers.DPMSolverMultistepScheduler(
        **_diffusers_kwargs("scaled_linear"), algorithm_type="dpmsolver++", solver_order=2
    )
    ref = _run_diffusers(ref_sched, gaussian_model(schedule), _noise(), timesteps=ts)
    ours = S.sample_dpmpp_2m(_ours(schedule), _noise(), schedule, timesteps=ts)
    _assert_rel_close(ours, ref, TOLERANCE["dpmpp_2m"])


def _ve_start(scheduler, steps):
    scheduler.set_timesteps(steps)
    return math.sqrt(1.0 + float(scheduler.sigmas[0]) ** 2)


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("heun", "HeunDiscreteScheduler")])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
def test_euler_heun_match_diffusers(name, cls, kind, spacing):
    schedule = NoiseSchedule(kind)
    karras = spacing == "karras"
    # diffusers takes the Karras sigma range from its spaced sigmas: with "linspace" that is sigma(0)..sigma(T-1),
    # the schedule's range that ours uses.
    ref_sched = getattr(diffusers, cls)(
        **_diffusers_kwargs(kind),
        timestep_spacing="linspace" if karras else spacing,
        use_karras_sigmas=karras,
    )
    steps = 12
    # diffusers starts trailing/linspace Euler at sigma_max * noise; ours at sqrt(1 + sigma_max^2) * noise (the VE
    # image of the VP noise); feed diffusers the same start.
    ref = _run_diffusers(
        ref_sched, gaussian_model(schedule), _noise(), steps, init_scale=_ve_start(ref_sched, steps)
    )
    ours = S.SAMPLERS[name](
        _ours(schedule),
        _noise(),
        schedule,
        steps,
        timestep_spacing="linspace" if karras else spacing,
        karras=karras,
    )
    _assert_rel_close(ours, ref, TOLERANCE[name])


def _gaussian_flow_endpoint(schedule, noise, t_start):
    """Exact probability-flow ODE solution for N(mu, s^2) data: (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is
    invariant along the flow, so x0 = mu + s * noise-standardised value."""
    mu = _data_mean()
    a, s = float(schedule.alpha(t_start, torch.float64)), float(schedule.sigma(t_start, torch.float64))
    return mu + DATA_STD * (noise - a * mu) / math.sqrt(a**2 * DATA_STD**2 + s**2)


def _flow_error(name, steps, **kwargs):
    schedule = NoiseSchedule("scaled_linear")
    noise = _noise(5)
    ours = S.SAMPLERS[name](_ours(schedule, wiggle=0.0), noise, schedule, steps, **kwargs)
    return (ours - _gaussian_flow_endpoint(schedule, noise, 999)).abs().max().item()


def test_ode_samplers_converge_to_exact_gaussian_flow_with_expected_order():
    # Karras sigmas end at sigma(0), so the last (Euler) step into sigma=0 is tiny and the solver's own order
    # shows: 4x the steps cuts the error ~4x for Euler, ~16x or more for the second-order solvers.
    euler_10, euler_40 = _flow_error("euler", 10, karras=True), _flow_error("euler", 40, karras=True)
    heun_10, heun_40 = _flow_error("heun", 10, karras=True), _flow_error("heun", 40, karras=True)
    dpm_10, dpm_40 = _flow_error("dpmpp_2m", 10, karras=True), _flow_error("dpmpp_2m", 40, karras=True)
    assert euler_10 / 6 < euler_40 < euler_10 / 3
    assert heun_40 < heun_10 / 16 and dpm_40 < dpm_10 / 16
    assert max(heun_40, dpm_40) < min(5e-3, euler_40 / 10)


def test_ddim_is_euler_in_ve_space_and_converges():
    # DDIM (eta=0) on an x0-denoiser is exactly Euler on the VE flow (Karras et al. 2022, sec. 3).
    assert _flow_error("ddim", 20) == pytest.approx(_flow_error("euler", 20), rel=1e-4)
    assert (
        _flow_error("ddim", 80, timestep_spacing="linspace")
        < _flow_error("ddim", 20, timestep_spacing="linspace") / 3
    )


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
def test_zero_terminal_snr_v_prediction_converges(name):
    # Starts from pure noise (alpha_T = 0; VE samplers from the capped sigma 4096) with a v-prediction model.
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    noise = _noise(5)
    exact = _gaussian_flow_endpoint(schedule, noise, 999)
    errors = [
        (S.SAMPLERS[name](_ours(schedule, "v", wiggle=0.0), noise, schedule, n, karras=True) - exact)
        .abs()
        .max()
        for n in (30, 60)
    ]
    assert errors[1] < errors[0] / 3 and errors[1] < 0.03


def test_karras_sigmas_help_heun():
    assert _flow_error("heun", 10, karras=True) < _flow_error("heun", 10)


def test_ddim_eta_one_equals_ddpm_posterior_sampling():
    schedule = NoiseSchedule("linear")
    ddim = S.sample_ddim(
        _ours(schedule), _noise(), schedule, 30, eta=1.0, generator=torch.Generator().manual_seed(2)
    )
    ddpm = S.sample_ddpm(_ours(schedule), _noise(), schedule, 30, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


def test_ddpm_samples_have_the_data_distribution():
    # Every step of a short (T=200) cosine chain: strided DDPM with the posterior mean in place of x0 is
    # under-dispersed (std 0.45 for 50 of 1000 steps), the full chain is not.
    schedule = NoiseSchedule("cosine", num_train_timesteps=200)
    mu, n = 0.7, 4096  # scalar data N(0.7, 0.5^2)

    def denoise(x, t, cond):
        a = expand_as_batch(schedule.alpha(t), x)
        s = expand_as_batch(schedule.sigma(t), x)
        return mu + a * DATA_STD**2 / (a**2 * DATA_STD**2 + s**2) * (x - a * mu)

    # One batch element holding n independent scalars: the schedule lookups stay (1,)-sized.
    noise = torch.randn(1, n, generator=torch.Generator().manual_seed(0))
    x = S.sample_ddpm(denoise, noise, schedule, generator=torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - mu) < 0.025  # standard error 0.008
    assert abs(x.std().item() - DATA_STD) < 0.02  # standard error 0.006


def test_callback_clip_and_registry():
    schedule = NoiseSchedule("linear")
    seen = []
    out = S.sample(
        "heun",
        _ours(schedule),
        _noise(),
        schedule,
        steps=4,
        callback=lambda i, x, x0: seen.append(i),
        clip_x0=0.1,
    )
    assert seen == [0, 1, 2, 3]
    assert out.abs().max() <= 0.1 + 1e-6  # the last step returns the (clipped) x0
    with pytest.raises(ValueError, match="does not take"):
        S.sample("euler", _ours(schedule), _noise(), schedule, eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sample("plms", _ours(schedule), _noise(), schedule)
    with pytest.raises(ValueError, match="strictly decreasing"):
        S.sample_ddim(_ours(schedule), _noise(), schedule, timesteps=[10, 10, 0])


def test_heun_uses_two_evaluations_per_step_but_last():
    schedule = NoiseSchedule("linear")
    calls = []
    base = _ours(schedule)
    S.sample_heun(lambda x, t, c: calls.append(t[0].item()) or base(x, t, c), _noise(), schedule, 5)
    assert len(calls) == 9


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_sampler_configs_match_signatures(name):
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "sampler" / f"{name}.yaml")
    )
    assert cfg.pop("name") == name
    schedule = NoiseSchedule("linear")
    cfg["steps"] = 3  # the configured defaults are for real sampling; only the keys are under test here
    out = S.sample(
        name, _ours(schedule), _noise(), schedule, **cfg, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == _noise().shape and torch.isfinite(out).all()
