"""The moving average of the weights (training/ema.py)."""

from __future__ import annotations

import pytest
import torch

from training.ema import ModelEma
from training.models import build_model


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("alexnet_bn", num_classes=10, width=0.125, dropout=0.0)
    model.train()(torch.randn(4, 3, 64, 64))  # batch-norm statistics and step counts that are not the initial ones
    return model


def test_decay_zero_is_the_model_itself():
    model, ema = small_model(0), ModelEma(small_model(1), decay=0.0)
    ema.update(model)
    for (name, average), current in zip(ema.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(average, current), name


def test_each_update_moves_the_average_by_one_minus_the_decay_ramped_up_at_first():
    start, model = small_model(0), small_model(1)
    ema = ModelEma(start, decay=0.99)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the random start barely counts
    ema.update(model)
    for name, average in ema.module.state_dict().items():
        if average.is_floating_point():
            expected = 0.1 * before[name] + 0.9 * model.state_dict()[name]
            assert torch.allclose(average, expected, atol=1e-6), name
        else:
            assert torch.equal(average, model.state_dict()[name]), name  # e.g. num_batches_tracked
    ema.updates = 10_000
    assert ema.current_decay() == 0.99


def test_the_average_is_not_trained_and_survives_a_state_round_trip():
    ema = ModelEma(small_model(0), decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    for seed in (1, 2, 3):
        ema.update(small_model(seed))
    copy = ModelEma(small_model(4), decay=0.5)
    copy.load_state_dict(ema.state_dict())
    assert (copy.decay, copy.updates) == (0.9, 3)
    for (name, a), b in zip(copy.module.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        ModelEma(small_model(0), decay=1.0)
