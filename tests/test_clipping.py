"""Gradient clipping modes: each bounds what it promises and reports the norm before clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.clipping import agc_parameters, clip_gradients
from training.config import TrainConfig


def model_with_gradients(scale: float = 100.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    loss = model(torch.randn(4, 3, 8, 8)).pow(2).sum() * scale
    loss.backward()
    return model


def global_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def test_norm_mode_bounds_the_global_norm_and_keeps_direction():
    model = model_with_gradients()
    before = [p.grad.clone() for p in model.parameters()]
    norm, clipped = clip_gradients(model, "norm", 1.0, num_classes=10)
    assert clipped and norm == pytest.approx(torch.linalg.vector_norm(torch.stack([g.norm() for g in before])).item())
    assert global_norm(model) == pytest.approx(1.0, rel=1e-4)
    for old, p in zip(before, model.parameters()):
        assert torch.allclose(p.grad, old / norm, rtol=1e-3, atol=1e-8)  # same direction, scaled


def test_norm_mode_leaves_small_gradients_alone():
    model = model_with_gradients(scale=1e-6)
    before = [p.grad.clone() for p in model.parameters()]
    _, clipped = clip_gradients(model, "norm", 1.0, num_classes=10)
    assert not clipped and all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


def test_value_mode_bounds_every_element():
    model = model_with_gradients()
    _, clipped = clip_gradients(model, "value", 0.5, num_classes=10)
    assert clipped and max(p.grad.abs().max().item() for p in model.parameters()) <= 0.5


def test_agc_bounds_the_unit_wise_ratio_and_spares_the_classifier():
    model = model_with_gradients()
    classifier = model[-1]
    classifier_grad = classifier.weight.grad.clone()
    _, clipped = clip_gradients(model, "agc", 0.01, num_classes=10)
    assert clipped
    assert torch.equal(classifier.weight.grad, classifier_grad)
    assert {id(p) for p in agc_parameters(model, 10)}.isdisjoint({id(p) for p in classifier.parameters()})
    conv = model[0].weight
    ratio = conv.grad.reshape(8, -1).norm(dim=1) / conv.reshape(8, -1).norm(dim=1).clamp_min(1e-3)
    assert ratio.max().item() <= 0.01 * (1 + 1e-4)


def test_none_mode_measures_only_and_non_finite_norms_come_back_as_such():
    model = model_with_gradients()
    before = global_norm(model)
    norm, clipped = clip_gradients(model, "none", 1.0, num_classes=10)
    assert not clipped and norm == pytest.approx(before) and global_norm(model) == pytest.approx(before)
    next(model.parameters()).grad[0] = float("nan")
    norm, _ = clip_gradients(model, "norm", 1.0, num_classes=10)
    assert norm != norm  # NaN: the training loop's guard skips such a step


def test_config_rejects_unknown_modes_and_bad_thresholds():
    with pytest.raises(ValueError, match="clip must be one of"):
        TrainConfig(data="d", out="o", clip="sometimes")
    with pytest.raises(ValueError, match="clip_threshold must be positive"):
        TrainConfig(data="d", out="o", clip="agc", clip_threshold=0)


def test_agc_clips_a_vector_by_its_norm_as_the_paper_does():
    """Brock et al. 2021 (and timm's adaptive_clip_grad): a bias or batch-norm vector is one unit. Its
    gradient keeps its direction and is scaled to threshold x ||w||, not clamped element by element."""
    from training.clipping import adaptive_clip_

    bias = nn.Parameter(torch.tensor([1.0, 0.001, -2.0, 0.5]))
    bias.grad = torch.tensor([0.3, 0.2, -0.1, 0.0])
    direction = bias.grad / bias.grad.norm()
    assert adaptive_clip_([bias], 0.01)
    assert bias.grad.norm().item() == pytest.approx(0.01 * bias.detach().norm().item(), rel=1e-5)
    assert torch.allclose(bias.grad / bias.grad.norm(), direction)  # element-wise clipping would turn it
    # a matrix is clipped row by row (one row per output unit), each by its own row's norm
    weight = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    weight.grad = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adaptive_clip_([weight], 0.1)
    assert weight.grad[0].norm().item() == pytest.approx(0.5)  # 0.1 x ||(3, 4)||
    assert weight.grad[1].norm().item() == pytest.approx(0.1 * 1e-3)  # a zero row moves at most threshold x eps


def test_agc_leaves_units_under_the_threshold_alone():
    from training.clipping import adaptive_clip_

    weight = nn.Parameter(torch.ones(3, 4))
    weight.grad = torch.full((3, 4), 1e-4)
    assert not adaptive_clip_([weight], 0.01)
    assert torch.equal(weight.grad, torch.full((3, 4), 1e-4))
