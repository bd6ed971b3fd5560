import pytest
import torch
from torch import nn

from ldm.lit.ema import EMA, EMAConfig


def test_ema_follows_the_formula_with_warmup():
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.9, warmup_steps=10))
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decay = min(0.9, (1 + step) / (10 + step))
        expected = [e + (1 - decay) * (p.detach() - e) for e, p in zip(expected, model.parameters())]
        ema.update(model)
    for e, p in zip(expected, ema.model.parameters()):
        torch.testing.assert_close(p, e)
    assert int(ema.num_updates) == 30


def test_ema_copy_is_frozen_and_in_the_state_dict():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    ema = EMA(model, EMAConfig())
    assert not any(p.requires_grad for p in ema.model.parameters())
    ema.train()
    assert not ema.model.training
    assert "num_updates" in ema.state_dict() and "model.0.weight" in ema.state_dict()


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"warmup_steps": 0}])
def test_ema_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        EMAConfig(**kwargs)


def test_a_step_skipped_on_the_device_leaves_the_average_and_its_count():
    model = nn.Linear(3, 2)
    ema = EMA(model, EMAConfig(decay=0.9, warmup_steps=1))
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, skip=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters())) and int(ema.num_updates) == 0
    ema.update(model, skip=torch.tensor(0.0))
    for b, p, live in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, b + 0.1 * (live.detach() - b))
    assert int(ema.num_updates) == 1


class WithEMA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.live = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.live[0].requires_grad_(False)  # a frozen part (a LoRA base): shared with the EMA, not averaged
        self.ema = EMA(self.live, EMAConfig(decay=0.9999, warmup_steps=1))


def test_a_16_bit_cast_keeps_the_ema_in_fp32_so_it_still_moves():
    module = WithEMA().to(torch.bfloat16)  # what Lightning's precision=bf16-true does to the LightningModule
    assert {p.dtype for p in module.live.parameters()} == {torch.bfloat16}
    assert module.ema.model[1].weight.dtype == torch.float32
    assert module.ema.model[0].weight is module.live[0].weight  # the shared frozen part follows the live model
    with torch.no_grad():
        # |w| in [0.5, 1), where bf16's spacing is 2^-8: a step of 1e-4 of a gap of 1 is below its half
        module.live[1].weight.copy_(torch.linspace(0.5, 0.9, 16).reshape(4, 4))
        module.ema.model[1].weight.copy_(module.live[1].weight.float())
    start = module.ema.model[1].weight.clone()
    with torch.no_grad():
        module.live[1].weight.add_(1.0)
    bf16_copy = start.to(torch.bfloat16)
    for _ in range(5):
        module.ema.update(module.live)
        bf16_copy.lerp_(module.live[1].weight, 1e-4)
    # decay 0.9999 moves the average by 1e-4 of the gap per step: below bf16's resolution, above fp32's
    assert torch.equal(bf16_copy, start.to(torch.bfloat16))
    assert not torch.equal(module.ema.model[1].weight, start)
    torch.testing.assert_close(module.ema.model[1].weight - start,
                               5e-4 * (module.live[1].weight.float() - start), rtol=1e-2, atol=1e-6)
