"""Mixed precision: which precision runs where, and the AMP step order (unscale -> measure/clip ->
guard -> step) exercised for real through CPU autocast and a CPU GradScaler (explicit opt-in)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.monitor import StepLog
from training.precision import Precision, resolve_channels_last, resolve_precision
from training.train import Trainer, make_optimizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_precision_is_fp32_on_cpu_and_bf16_or_fp16_on_cuda():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", CUDA, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", CUDA, bf16_supported=False) == "fp16"  # pre-Ampere: loss scaling
    assert resolve_precision("fp16", CPU) == "fp16" and resolve_precision("fp32", CUDA) == "fp32"  # named: as asked
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(data="d", out="o", precision="half")
    assert Precision.create("bf16", CPU).scaler is None and Precision.create("fp16", CPU).scaler is not None


def test_channels_last_is_on_for_cuda_only_unless_asked():
    assert resolve_channels_last("auto", CUDA) and not resolve_channels_last("auto", CPU)
    assert resolve_channels_last("on", CPU) and not resolve_channels_last("off", CUDA)
    with pytest.raises(ValueError, match="channels_last must be"):
        TrainConfig(data="d", out="o", channels_last="yes")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))


def make_trainer(tmp_path, precision: Precision, **config) -> Trainer:
    model = small_model()
    config = TrainConfig(data="d", out="o", optimizer="sgd", label_smoothing=0.0, **config)
    return Trainer(model, make_optimizer(model, config), config, 10, precision, StepLog(tmp_path / "steps.jsonl", 1))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, 16, 16, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def fp32_grad_norm(images, targets) -> float:
    model = small_model()
    nn.functional.cross_entropy(model(images), targets).backward()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def logged(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]


def test_fp16_gradients_are_unscaled_before_they_are_measured_and_clipped(tmp_path):
    """At loss scale 2^12 the scaled gradients are 4096x too large; clipping them (or logging their
    norm) before unscaling would be off by that factor. The step must see the true gradients."""
    trainer = make_trainer(tmp_path, Precision.create("fp16", CPU, init_scale=2.0**12), clip="norm",
                           clip_threshold=0.05)
    images, targets = batch()
    assert trainer.train_step(images, targets, lr=0.01) is not None
    trainer.steps_log.flush()
    record = logged(tmp_path)[0]
    true_norm = fp32_grad_norm(images, targets)
    assert record["grad_norm"] == pytest.approx(true_norm, rel=0.05)  # the fp32 model's norm, not 4096x it
    assert record["clipped"] and not record["skipped"]
    # the gradients the optimizer used were clipped after unscaling: their norm is the threshold
    applied = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()])).item()
    assert applied == pytest.approx(0.05, rel=1e-3)
    assert set(record["layers"]) == {"0", "1", "4"}  # per-layer norms, also unscaled
    assert sum(v * v for v in record["layers"].values()) ** 0.5 == pytest.approx(record["grad_norm"], rel=1e-3)


def test_an_fp16_overflow_is_skipped_and_counted_without_touching_the_model(tmp_path):
    """A loss scale of 2^40 overflows fp16 gradients: the guard skips the step (weights, batch-norm
    statistics and optimizer state untouched), the scaler halves its scale, and the overflow is
    logged and counted, but overflows alone never roll back while the scale is still >= 1."""
    trainer = make_trainer(tmp_path, Precision.create("fp16", CPU, init_scale=2.0**40), rollback_skips=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for seed in range(5):
        assert trainer.train_step(*batch(seed), lr=0.01) is None
    assert trainer.skipped == 5 and trainer.overflows == 5 and trainer.rollbacks == 0
    assert trainer.precision.scale == 2.0**35
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert trainer.optimizer.state_dict()["state"] == {}
    trainer.steps_log.flush()
    records = logged(tmp_path)
    assert all(r["skipped"] and r["overflow"] and r["loss"] is not None and "rollback" not in r for r in records)
    assert [r["loss_scale"] for r in records] == [2.0**40 / 2**i for i in range(5)]  # the scale that overflowed


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_non_finite_loss_under_amp_is_guarded_like_fp32(tmp_path, precision):
    """NaN inputs: the loss itself is NaN. Under autocast it is skipped, counted toward divergence
    (not as a loss-scale overflow) and, repeated, rolls back."""
    trainer = make_trainer(tmp_path, Precision.create(precision, CPU), rollback_skips=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    images, targets = batch()
    images[0, 0, 0, 0] = float("nan")
    assert trainer.train_step(images, targets, lr=0.01) is None
    assert trainer.train_step(images, targets, lr=0.01) is None
    assert trainer.skipped == 2 and trainer.overflows == 0 and trainer.rollbacks == 1
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    # and a clean batch afterwards trains under autocast as usual
    assert trainer.train_step(*batch(), lr=0.01) is not None
    assert not torch.equal(trainer.model[0].weight, before["0.weight"])
