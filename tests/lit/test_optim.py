import math

import pytest
import torch

from ldm.lit.optim import warmup_schedule


def _lrs(**kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, **kwargs)
    out = []
    for _ in range(12):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_constant():
    lrs = _lrs(warmup_steps=4, kind="constant")
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert lrs[-1] == 1.0


def test_warmup_then_cosine_reaches_min():
    lrs = _lrs(warmup_steps=2, kind="cosine", total_steps=12, min_lr_ratio=0.1)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    mid = 2 + 5
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="constant' or 'cosine"):
        _lrs(kind="linear")
