"""Loss weightings against their papers' formulas and the x0-space derivation."""

import pytest
import torch

from ldm.diffusion.parameterization import EDMPreconditioner, Parameterization
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.weighting import edm_lambda, loss_weight, x0_error_scale

T = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_formulas(gamma):
    snr = NoiseSchedule("linear").snr(T, torch.float64)
    # eps as Hang et al.; v and x0 truncate SNR + 1 (v's own error scale) as diffusers' trainers do for v.
    expected = {
        "eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
        "v": torch.minimum(snr + 1, torch.tensor(gamma)) / (snr + 1),
        "x0": torch.minimum(snr + 1, torch.tensor(gamma)),
    }
    for prediction, w in expected.items():
        torch.testing.assert_close(loss_weight("min_snr", snr, prediction, gamma), w)
    # eps: 1 where SNR <= gamma (high noise), gamma / SNR below t where SNR > gamma.
    eps_w = loss_weight("min_snr", snr, "eps", gamma)
    assert torch.all(eps_w <= 1) and eps_w[-1] == 1 and eps_w[0] == pytest.approx(gamma / snr[0].item())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_error_scale_matches_the_parameterization(prediction):
    """|x0_hat - x0|^2 = k |out - target|^2 for any network output: the basis of every weight conversion."""
    schedule = NoiseSchedule("scaled_linear")
    param = Parameterization(schedule, prediction, EDMPreconditioner(0.7) if prediction == "edm" else None)
    gen = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(len(T), 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    x_t = schedule.q_sample(x0, T, eps)
    err_x0 = (param.to_x0(out, x_t, T) - x0).square().flatten(1).sum(1)
    err_out = (out - param.target(x0, eps, T)).square().flatten(1).sum(1)
    k = x0_error_scale(schedule.snr(T, torch.float64), prediction, sigma_data=0.7)
    torch.testing.assert_close(err_x0, k * err_out)


def test_edm_weighting():
    snr = NoiseSchedule("cosine").snr(T[:-1], torch.float64)
    sigma = snr.rsqrt()  # VE sigma
    sd = 0.5
    torch.testing.assert_close(edm_lambda(snr, sd), (sigma**2 + sd**2) / (sigma * sd) ** 2)
    # With EDM preconditioning lambda(sigma) c_out(sigma)^2 = 1: the F-space loss is unweighted.
    torch.testing.assert_close(loss_weight("edm", snr, "edm", sigma_data=sd), torch.ones_like(snr))
    torch.testing.assert_close(loss_weight("edm", snr, "x0", sigma_data=sd), edm_lambda(snr, sd))
    torch.testing.assert_close(loss_weight("edm", snr, "eps", sigma_data=sd), edm_lambda(snr, sd) / snr)


def test_weights_are_finite_at_zero_terminal_snr():
    snr = NoiseSchedule("linear", zero_terminal_snr=True).snr(T, torch.float64)
    assert snr[-1] == 0
    for prediction in ["v", "x0", "edm"]:
        for weighting in ["none", "min_snr", "edm"]:
            assert torch.isfinite(loss_weight(weighting, snr, prediction)).all(), (prediction, weighting)
    assert loss_weight("min_snr", snr, "eps")[-1] == 1.0  # min(SNR, gamma)/SNR -> 1 as SNR -> 0


def test_none_and_errors():
    snr = torch.tensor([0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight("none", snr, "v"), torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown weighting"):
        loss_weight("p2", snr, "eps")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        loss_weight("min_snr", snr, "eps", min_snr_gamma=0.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_min_snr_trains_the_terminal_step_of_zero_terminal_snr(kind):
    # SNR = 0 at T-1 is the step zero terminal SNR exists to train (Lin et al. 2023); min(SNR, gamma) is 0 there.
    snr = NoiseSchedule(kind, zero_terminal_snr=True).snr(T, torch.float64)
    assert snr[-1] == 0
    assert loss_weight("min_snr", snr, "v")[-1] == 1.0
    assert loss_weight("min_snr", snr, "x0")[-1] == 1.0
    assert loss_weight("min_snr", snr, "edm", sigma_data=0.5)[-1] == pytest.approx(0.25)  # x0 weight 1 x c_out^2
    # gamma < 1 still caps every weight in x0 space
    assert loss_weight("min_snr", snr, "v", min_snr_gamma=0.5)[-1] == 0.5
    # the weight never exceeds 1 in v space, and the x0-space weight is min(SNR + 1, gamma) everywhere
    w_v = loss_weight("min_snr", snr, "v")
    assert (w_v <= 1).all() and (w_v > 0).all()
    torch.testing.assert_close(w_v * (snr + 1), torch.clamp(snr + 1, max=5.0))
