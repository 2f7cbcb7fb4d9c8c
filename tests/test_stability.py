"""Divergence detection, rollback and the stability gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from training.stability import DivergenceMonitor, TrainingDiverged, passes_gate, stability_report


def test_skipped_steps_within_the_window_mean_divergence():
    monitor = DivergenceMonitor(max_skips=3, window=10, loss_factor=5.0, num_classes=10)
    assert monitor.observe(1, None) is None and monitor.observe(5, None) is None
    assert monitor.observe(20, None) is None  # the first two fell out of the window
    assert monitor.observe(21, None) is None
    assert "3 skipped steps (non-finite, or corrupt inputs) within 10 steps" in monitor.observe(22, None)


def test_a_loss_far_above_its_running_median_means_divergence_but_noise_does_not():
    monitor = DivergenceMonitor(max_skips=5, window=50, loss_factor=5.0, num_classes=10)
    for step in range(1, 41):
        assert monitor.observe(step, 2.3 + 0.2 * (-1) ** step) is None
    assert monitor.observe(41, 9.0) is None  # bad batch, below 5 x 2.3
    assert "above 5x" in monitor.observe(42, 50.0)


def test_late_in_training_a_hard_batch_is_not_a_divergence():
    monitor = DivergenceMonitor(max_skips=5, window=50, loss_factor=5.0, num_classes=10)
    for step in range(1, 101):
        monitor.observe(step, 0.05)  # the median is tiny ...
    assert monitor.observe(101, 1.5) is None  # ... but 30x it is still far below chance level x 5


def test_stability_report_and_gate():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    report = stability_report([1.0, 2.0, 3.0, 10.0], clipped=1, skipped=2, rollbacks=1, model=model)
    assert report["grad_norm_max"] == 10.0 and report["grad_norm_p50"] == 2.0 and report["clip_rate"] == 0.25
    assert report["skipped_steps"] == 2 and report["rollbacks"] == 1 and passes_gate(report)
    model[1].running_var.fill_(float("nan"))
    assert not passes_gate(stability_report([1.0], 0, 0, 0, model))


@pytest.mark.slow  # trains
def test_a_run_that_keeps_diverging_gives_up_with_a_clear_error(tmp_path):
    """Every loss NaN (zero std): skips, then rollbacks at a lower learning rate, then an error."""
    from training.config import TrainConfig
    from training.shapes import ShapesConfig, generate_dataset
    from training.train import train

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=8, val_per_class=1,
                                                            test_per_class=0), progress=False)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), arch="alexnet_bn", width=0.125, image_size=64,
                         resize=64, std=(0.0, 0.0, 0.0), epochs=3, batch_size=8, workers=0, rollback_skips=2,
                         max_rollbacks=3)
    with pytest.raises(TrainingDiverged, match="after 3 rollbacks"), np.errstate(all="ignore"):
        train(config)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    rollbacks = [r for r in steps if "rollback" in r]
    assert len(rollbacks) == 4 and all("non-finite" in r["rollback"] for r in rollbacks)
    lrs = [r["lr"] for r in steps]
    assert lrs[2] < lrs[1] and lrs[4] < lrs[3]  # each rollback halves the learning rate



def test_without_the_guard_a_non_finite_step_ends_the_run(tmp_path):
    """--no-guard (the study's set-ups a-c): nothing is skipped or rolled back; the first NaN loss stops
    the run with a clear error, and the step log says where."""
    from training.config import TrainConfig
    from training.shapes import ShapesConfig, generate_dataset
    from training.train import train

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=2, val_per_class=1,
                                                            test_per_class=0), progress=False)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), arch="alexnet_bn", width=0.125, image_size=64,
                         resize=64, std=(0.0, 0.0, 0.0), epochs=1, batch_size=4, workers=0, guard=False)
    with pytest.raises(TrainingDiverged, match="at step 1: non-finite loss or gradient, with the guard off"), \
            np.errstate(all="ignore"):
        train(config)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 1 and steps[0]["loss"] is None and "diverged" in steps[0]


def test_an_explosion_in_the_first_steps_is_caught_against_chance_level():
    monitor = DivergenceMonitor(max_skips=5, window=50, loss_factor=5.0, num_classes=10)
    assert monitor.observe(1, 2.30) is None and monitor.observe(2, 2.23) is None
    assert monitor.observe(3, 9.0) is None  # below 5 x ln(10) = 11.5
    # a first-steps blow-up, as in docs/stability.md (losses of 1e2-1e5 by step 5-6)
    assert "above 5x" in monitor.observe(4, 2748.0)


def test_the_guard_skips_a_batch_of_corrupt_inputs_and_leaves_batch_norm_untouched(tmp_path):
    """Pixel values x1e4 (a batch that skipped normalisation): batch norm after the first conv hides
    them from the loss, so only the inputs show it. With the guard the step is skipped and BN's running
    statistics stay as they were; without it the step is taken and the running variance is poisoned."""
    from service.preprocessing import PreprocessSpec
    from training.config import TrainConfig
    from training.data import input_limit
    from training.monitor import StepLog
    from training.precision import Precision
    from training.train import Trainer, make_optimizer

    spec = PreprocessSpec(resize=16, crop=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    limit = input_limit(spec)
    assert 10.0 <= limit < 20.0  # 4 x the largest |(0 or 1 - mean) / std| = 4 x 2.64
    generator = torch.Generator().manual_seed(0)
    images, targets = torch.randn(8, 3, 16, 16, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    variances = {}
    for guard in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(1568, 10))
        config = TrainConfig(data="d", out="o", optimizer="sgd", guard=guard)
        trainer = Trainer(model, make_optimizer(model, config), config, 10, Precision.create("fp32", "cpu"),
                          StepLog(tmp_path / f"steps-{guard}.jsonl", 0), guard=guard, input_limit=limit)
        assert trainer.train_step(images, targets, lr=0.01) is not None  # clean inputs train in both
        before = model[1].running_var.clone()
        loss = trainer.train_step(images * 1e4, targets, lr=0.01)
        assert (loss is None) == guard and trainer.skipped == int(guard)
        variances[guard] = model[1].running_var / before
        trainer.steps_log.flush()
    assert torch.equal(variances[True], torch.ones(8))
    assert variances[False].min() > 1e6  # 0.9 x old + 0.1 x (1e4)^2 x new
    record = json.loads((tmp_path / "steps-True.jsonl").read_text().splitlines()[-1])
    assert record["skipped"] and record["bad_inputs"] > limit
