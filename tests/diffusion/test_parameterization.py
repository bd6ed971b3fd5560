"""eps / x0 / v / EDM parameterizations: definitions and round trips."""

import pytest
import torch

from ldm.diffusion.parameterization import EDMPreconditioner, Parameterization
from ldm.diffusion.schedules import NoiseSchedule

PREDICTIONS = ["eps", "x0", "v", "edm"]


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    return x0, eps


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [[0, 1, 500, 998], [3.5, 250.25, 700.0, 998.9]])
def test_round_trips(prediction, t):
    schedule = NoiseSchedule("scaled_linear")
    param = Parameterization(schedule, prediction)
    t = torch.tensor(t)
    x0, eps = _batch()
    x_t = schedule.q_sample(x0, t, eps)
    target = param.target(x0, eps, t)
    torch.testing.assert_close(param.to_x0(target, x_t, t), x0)
    torch.testing.assert_close(param.to_eps(target, x_t, t), eps)
    out = torch.randn_like(x0)
    torch.testing.assert_close(param.from_x0(param.to_x0(out, x_t, t), x_t, t), out)


def test_v_definition_salimans_ho():
    schedule = NoiseSchedule("cosine")
    t = torch.tensor([10, 400, 800, 990])
    x0, eps = _batch(1)
    a = schedule.alpha(t, torch.float64).view(-1, 1, 1, 1)
    s = schedule.sigma(t, torch.float64).view(-1, 1, 1, 1)
    param = Parameterization(schedule, "v")
    v = param.target(x0, eps, t)
    torch.testing.assert_close(v, a * eps - s * x0)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(param.to_x0(v, x_t, t), a * x_t - s * v)
    torch.testing.assert_close(Parameterization(schedule, "eps").to_x0(eps, x_t, t), (x_t - s * eps) / a)


@pytest.mark.parametrize("prediction", ["v", "x0", "edm"])
def test_round_trip_at_zero_terminal_snr(prediction):
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    param = Parameterization(schedule, prediction)
    t = torch.tensor([999, 999, 0, 500])
    x0, eps = _batch(2)
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t[:2], eps[:2])  # pure noise
    target = param.target(x0, eps, t)
    assert torch.isfinite(target).all()
    torch.testing.assert_close(param.to_x0(target, x_t, t), x0)


def test_edm_vp_coefficients_equal_ve_ones():
    pre = EDMPreconditioner(sigma_data=0.5)
    sigma_ve = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=torch.float64)
    alpha = 1 / (1 + sigma_ve**2).sqrt()
    c = pre.coefficients(sigma_ve)
    c_skip_vp, c_out, c_in_vp = pre.vp_coefficients(alpha, alpha * sigma_ve)
    # x_ve = x_t / alpha, so coefficients on x_t are the VE ones divided by alpha.
    torch.testing.assert_close(c_skip_vp, c.c_skip / alpha)
    torch.testing.assert_close(c_in_vp, c.c_in / alpha)
    torch.testing.assert_close(c_out, c.c_out)
    torch.testing.assert_close(c.c_noise, sigma_ve.log() / 4)
    # Karras et al. 2022, Table 1.
    torch.testing.assert_close(c.c_skip, 0.25 / (sigma_ve**2 + 0.25))
    torch.testing.assert_close(c.c_out, sigma_ve * 0.5 / (sigma_ve**2 + 0.25).sqrt())
    torch.testing.assert_close(c.c_in, 1 / (sigma_ve**2 + 0.25).sqrt())


def test_edm_with_unit_sigma_data_is_negative_v():
    # sigma_data = 1: c_skip x_ve = alpha x_t, c_out = sigma_t, so D = alpha x_t + sigma_t F, i.e. F = -v; and the
    # EDM input c_in x_ve is x_t itself.
    schedule = NoiseSchedule("linear")
    edm = Parameterization(schedule, "edm", EDMPreconditioner(sigma_data=1.0))
    v = Parameterization(schedule, "v")
    t = torch.tensor([5, 300, 600, 999])
    x0, eps = _batch(3)
    x_t = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(edm.target(x0, eps, t), -v.target(x0, eps, t))
    torch.testing.assert_close(edm.model_input(x_t, t), x_t)


def test_model_time():
    schedule = NoiseSchedule("linear")
    t = torch.tensor([1, 500])
    assert Parameterization(schedule, "eps").model_time(t).dtype == torch.float32
    c_noise = Parameterization(schedule, "edm", EDMPreconditioner(0.5, time_input="c_noise")).model_time(t)
    torch.testing.assert_close(c_noise, schedule.ve_sigma(t).log() / 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown prediction"):
        Parameterization(NoiseSchedule(), "score")
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPreconditioner(sigma_data=0.0)
    with pytest.raises(ValueError, match="time_input"):
        EDMPreconditioner(time_input="sigma")
