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
