"""DiffusionObjective: Monte-Carlo loss vs the Bayes-optimal closed form, noise, dtype and errors."""

import warnings

import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule, expand_as_batch

DATA_STD = 0.8


def _coefs(schedule, t, x):
    return expand_as_batch(schedule.alpha(t, x.dtype), x), expand_as_batch(schedule.sigma(t, x.dtype), x)


def optimal_model(schedule, prediction):
    """Bayes-optimal output for x0 ~ N(0, DATA_STD^2 I): E[x0 | x_t] = alpha s^2 / (alpha^2 s^2 + sigma^2) x_t."""

    def model(x_t, t, cond):
        a, s = _coefs(schedule, t, x_t)
        x0 = a * DATA_STD**2 / (a**2 * DATA_STD**2 + s**2) * x_t
        eps = (x_t - a * x0) / s
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[prediction]

    return model


def _bayes_error(schedule, t, prediction):
    """Per-dimension posterior variance of the target given x_t: the optimal model's expected l2 loss."""
    a2, s2 = schedule.alpha(t, torch.float64) ** 2, schedule.sigma(t, torch.float64) ** 2
    total = a2 * DATA_STD**2 + s2
    return {"x0": DATA_STD**2 * s2 / total, "eps": a2 * DATA_STD**2 / total, "v": DATA_STD**2 / total}[
        prediction
    ]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_loss_of_optimal_model_matches_closed_form(prediction):
    schedule = NoiseSchedule("linear")
    objective = DiffusionObjective(schedule, prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0 = DATA_STD * torch.randn(4096, 1, 4, 4, generator=gen)
    loss, t = objective.loss(optimal_model(schedule, prediction), x0, generator=gen)
    assert loss.shape == (4096,) and t.shape == (4096,) and t.dtype == torch.long
    assert 0 <= t.min() and t.max() <= 999 and t.float().std() > 250  # uniform on [0, 999]: std 289
    ratio = (loss.double() / _bayes_error(schedule, t, prediction)).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.03)  # standard error ~0.006


def test_weighting_multiplies_the_plain_loss():
    schedule = NoiseSchedule("scaled_linear")
    model = optimal_model(schedule, "eps")
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    plain, t = DiffusionObjective(schedule).loss(model, x0, generator=torch.Generator().manual_seed(2))
    weighted_obj = DiffusionObjective(schedule, weighting="min_snr", min_snr_gamma=5.0)
    weighted, t2 = weighted_obj.loss(model, x0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t, t2)
    snr = schedule.snr(t, torch.float64)
    torch.testing.assert_close(weighted, (plain.double() * (5.0 / snr).clamp(max=1)).float())


def test_loss_is_float32_for_bf16_network_and_uses_l1():
    schedule = NoiseSchedule("linear")
    seen = {}

    def bf16_model(x_t, t, cond):
        seen["dtype"], seen["t"], seen["cond"] = x_t.dtype, t.dtype, cond
        return torch.zeros_like(x_t, dtype=torch.bfloat16)

    x0 = torch.randn(8, 2, 4, 4, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    objective = DiffusionObjective(schedule, prediction="x0", loss_type="l1")
    loss, _ = objective.loss(bf16_model, x0, cond={"y": 3}, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32
    assert seen == {"dtype": torch.bfloat16, "t": torch.float32, "cond": {"y": 3}}
    torch.testing.assert_close(loss, x0.float().abs().flatten(1).mean(1))  # l1 of a zero x0 prediction


def test_offset_noise_is_constant_per_channel():
    objective = DiffusionObjective(NoiseSchedule(), offset_noise=0.1)
    x0 = torch.zeros(3, 2, 8, 8)
    noise = objective.sample_noise(x0, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 2, 8, 8, generator=gen)
    offset = torch.randn(3, 2, 1, 1, generator=gen)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    plain = DiffusionObjective(NoiseSchedule()).sample_noise(x0, torch.Generator().manual_seed(4))
    torch.testing.assert_close(plain, base)


def test_denoiser_returns_x0_of_the_prediction():
    schedule = NoiseSchedule("cosine")
    for prediction in ["eps", "v", "x0"]:
        objective = DiffusionObjective(schedule, prediction=prediction)
        denoise = objective.denoiser(optimal_model(schedule, prediction))
        # float64: at t=999 the cosine alpha is 5e-5 and eps -> x0 amplifies float32 rounding 2e4-fold.
        x_t = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        t = torch.tensor([0.0, 10.5, 500.0, 999.0])
        a, s = _coefs(schedule, t, x_t)
        expected = a * DATA_STD**2 / (a**2 * DATA_STD**2 + s**2) * x_t
        torch.testing.assert_close(denoise(x_t, t, None), expected)


def test_edm_objective_targets_preconditioned_output():
    schedule = NoiseSchedule("linear")
    objective = DiffusionObjective(schedule, prediction="edm", weighting="edm", sigma_data=0.5)
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    captured = {}

    def model(net_in, t, cond):
        captured["in"], captured["t"] = net_in, t
        return torch.zeros_like(net_in)

    loss, t = objective.loss(model, x0, generator=torch.Generator().manual_seed(7))
    # Zero output means D = c_skip x: loss = |x0 - c_skip x|^2 / c_out^2, lambda c_out^2 = 1 makes weights 1.
    noise = DiffusionObjective(schedule).sample_noise(x0, _after_timesteps(7, 6))
    x_t = schedule.q_sample(x0, t, noise)
    param = objective.parameterization
    c_skip, c_out, c_in = param.preconditioner.vp_coefficients(*_coefs(schedule, t, x0))
    torch.testing.assert_close(captured["in"], c_in * x_t)
    expected = ((x0 - c_skip * x_t) / c_out).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def _after_timesteps(seed, batch):
    gen = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (batch,), generator=gen)
    return gen


def test_bad_configurations_raise():
    ztsnr = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="use prediction='v'"):
        DiffusionObjective(ztsnr, prediction="eps")
    DiffusionObjective(ztsnr, prediction="v")
    for kwargs, match in [
        (dict(prediction="score"), "unknown prediction"),
        (dict(loss_type="huber"), "unknown loss_type"),
        (dict(weighting="p2"), "unknown weighting"),
        (dict(offset_noise=-0.1), "offset_noise"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffusionObjective(NoiseSchedule(), **kwargs)


@pytest.mark.parametrize("kind", ["cosine", "sigmoid"])
def test_eps_on_a_schedule_that_ends_near_pure_noise_warns(kind):
    # alpha(T-1) is 4.9e-5 (cosine) and 5.5e-4 (sigmoid): x0 = (x_t - sigma eps) / alpha multiplies the eps
    # error by ~20,000 and ~1,800 at the first step (experiments/prediction: eps + cosine, FID 1199).
    schedule = NoiseSchedule(kind)
    with pytest.warns(UserWarning, match=r"objective=v") as record:
        DiffusionObjective(schedule, prediction="eps")
    assert kind in str(record[0].message) and "alpha(T-1)" in str(record[0].message)
    with pytest.warns(UserWarning, match=r"objective=v"):
        DiffusionObjective(schedule, prediction="eps").denoiser(lambda x, t, c: x)


@pytest.mark.parametrize("kind,prediction", [("linear", "eps"), ("scaled_linear", "eps"), ("cosine", "v"),
                                             ("sigmoid", "x0"), ("cosine", "edm")])
def test_no_warning_where_the_first_step_is_well_conditioned(kind, prediction):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffusionObjective(NoiseSchedule(kind), prediction=prediction)


def test_offset_noise_with_zero_terminal_snr_warns():
    # At SNR = 0, x_T = noise, whose variance is 1 + offset^2 in training, but sampling starts from N(0, I).
    schedule = NoiseSchedule("linear", zero_terminal_snr=True)
    with pytest.warns(UserWarning, match=r"1 \+ offset_noise\^2 = 1.01"):
        DiffusionObjective(schedule, prediction="v", offset_noise=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiffusionObjective(schedule, prediction="v")
        DiffusionObjective(NoiseSchedule("linear"), prediction="v", offset_noise=0.1)
