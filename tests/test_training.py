"""A real (tiny) training run: it learns, and what it writes is complete and safe to load."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_python
from training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.train import learning_rate

# TINY_TRAINING (conftest), 12 epochs on 500 images per class, measured 0.6-0.7 test accuracy;
# chance is 0.1 and a linear model on the pixels reaches ~0.13 (tests/test_shapes.py).
REQUIRED_TEST_ACCURACY = 0.5


def test_tiny_run_learns_the_shapes(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_acc"] >= REQUIRED_TEST_ACCURACY, summary
    assert summary["stability"]["skipped_steps"] == 0 and summary["stability"]["rollbacks"] == 0


def test_test_split_report_is_consistent(trained_run):
    """Top-5 >= top-1, per-class accuracies and the confusion matrix agree with the overall number."""
    summary = json.loads((trained_run / "summary.json").read_text())
    confusion = summary["test_confusion"]
    assert len(confusion) == 10 and all(len(row) == 10 for row in confusion)
    total = sum(map(sum, confusion))
    assert total == 200  # 20 test images per class
    assert summary["test_acc"] == pytest.approx(sum(confusion[i][i] for i in range(10)) / total)
    assert summary["test_top5"] >= summary["test_acc"]
    for i, (label, accuracy) in enumerate(summary["test_per_class_acc"].items()):
        assert accuracy == pytest.approx(confusion[i][i] / sum(confusion[i]), abs=1e-4), label


def test_run_directory_holds_everything(trained_run):
    for name in ("best.pt", "last.pt", "config.json", "metrics.jsonl", "summary.json", "training.png",
                 "confusion_test.png", "steps.jsonl", "steps.png"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["clip_rate"] <= 1 for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_every_step_is_monitored_with_per_layer_norms_at_the_interval(trained_run):
    steps = [json.loads(line) for line in (trained_run / "steps.jsonl").read_text().splitlines()]
    last_epoch = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert [r["step"] for r in steps] == list(range(1, last_epoch["step"] + 1))
    assert all(r["grad_norm"] > 0 and r["lr"] > 0 and not r["skipped"] for r in steps)
    layered = [r for r in steps if "layers" in r]
    assert [r["step"] for r in layered] == [s for s in range(1, len(steps) + 1) if s % 25 == 0]
    layers = list(layered[0]["layers"])
    assert layers[0] == "features.conv1" and layers[-1] == "classifier.fc3"  # input first; conv+BN as one
    # the per-layer norms are the pieces of the global norm measured at the same step
    assert (math.sqrt(sum(v * v for v in layered[0]["layers"].values()))
            == pytest.approx(layered[0]["grad_norm"], rel=1e-4))
    # and each layer's weight norm beside it, so a blow-up's lead layer is judged by ||g|| / ||w||
    assert list(layered[0]["layer_weights"]) == layers and all(v > 0 for v in layered[0]["layer_weights"].values())


def test_checkpoint_is_self_describing(trained_run, shapes_data):
    checkpoint = load_checkpoint(trained_run / "best.pt")
    assert checkpoint["arch"] == "alexnet_bn"
    assert checkpoint["model_args"] == {"num_classes": 10, "width": 0.25, "dropout": 0.0}
    assert checkpoint["labels"] == sorted(p.name for p in (shapes_data / "train").iterdir())
    assert checkpoint["preprocessing"]["crop"] == 64
    assert checkpoint["config"]["clip"] == "norm" and checkpoint["config"]["clip_threshold"] > 0
    assert 0 <= checkpoint["metrics"]["val_acc"] <= 1
    # rebuilt from the checkpoint alone, the model gives the logits the training run evaluated
    model = model_from_checkpoint(checkpoint)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_best_checkpoint_has_the_best_validation_accuracy(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert load_checkpoint(trained_run / "best.pt")["metrics"]["val_acc"] == max(r["val_acc"] for r in records)
    assert load_checkpoint(trained_run / "last.pt")["epoch"] == len(records)


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint file"),
    (b"", "not a readable checkpoint"),
    (b"\x80\x04garbage", "not a readable checkpoint"),
])
def test_bad_checkpoints_are_refused_with_their_path(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path, trained_run):
    data = (trained_run / "best.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a Keel checkpoint"):
        load_checkpoint(foreign)


def test_checkpoints_never_execute_code_when_loaded(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "keel-checkpoint/1", "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_checkpoint_write_is_atomic(tmp_path, trained_run):
    """A failing write leaves the previous file intact and no temporary file behind."""
    target = tmp_path / "last.pt"
    good = load_checkpoint(trained_run / "last.pt")
    save_checkpoint(target, good)
    before = target.read_bytes()
    with pytest.raises(pickle.PicklingError):
        save_checkpoint(target, {**good, "unpicklable": lambda: None})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [learning_rate(step, total_steps=100, warmup_steps=10, peak=0.1) for step in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001


def test_step_schedule_decays_by_gamma_every_interval():
    lrs = [learning_rate(step, 100, 10, 0.1, schedule="step", step_every=30, gamma=0.1) for step in range(100)]
    assert lrs[9] == pytest.approx(0.1) and lrs[39] == pytest.approx(0.1)
    assert lrs[40] == pytest.approx(0.01) and lrs[70] == pytest.approx(0.001)


def test_cli_trains_inception_and_reports_bad_data(shapes_data, tmp_path):
    result = run_python("-m", "training", "--arch", "inception_v1_bn", "--data", str(shapes_data),
                        "--out", str(tmp_path / "run"), "--width", "0.125", "--image-size", "64", "--resize", "64",
                        "--epochs", "1", "--batch-size", "64", "--workers", "0", "--model-args", '{"aux_logits": true}',
                        "--clip", "agc", "--clip-threshold", "0.05")
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1" in result.stderr
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["arch"] == "inception_v1_bn" and checkpoint["model_args"]["aux_logits"] is True
    assert checkpoint["config"]["clip"] == "agc" and 0 <= checkpoint["metrics"]["clip_rate"] <= 1

    missing = run_python("-m", "training", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_non_finite_steps_are_skipped_and_leave_the_weights_untouched(tmp_path):
    """A zero std turns every input into inf, so every loss is NaN: no step may touch the model."""
    from training.config import TrainConfig
    from training.models import build_model
    from training.shapes import ShapesConfig, generate_dataset
    from training.train import train

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=4, val_per_class=1,
                                                            test_per_class=0), progress=False)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), arch="alexnet_bn", width=0.125, image_size=64,
                         resize=64, std=(0.0, 0.0, 0.0), epochs=2, batch_size=8, workers=0, seed=3)
    with np.errstate(divide="ignore", invalid="ignore"):
        summary = train(config)
    # 40 images, batches of 8, 2 epochs: 10 steps, each skipped; every 5 skips in a row roll back
    assert summary["stability"]["skipped_steps"] == 10 and summary["stability"]["rollbacks"] == 2
    torch.manual_seed(3)
    untouched = build_model("alexnet_bn", num_classes=10, width=0.125).state_dict()
    trained = load_checkpoint(tmp_path / "run" / "last.pt")
    for name, tensor in untouched.items():
        assert torch.equal(trained["state_dict"][name], tensor), name
    assert trained["optimizer"]["state"] == {}  # no momentum was ever accumulated


def test_a_run_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    """kill -9 during training, resume from last.pt: the final weights equal an uninterrupted run's."""
    import signal
    import subprocess
    import sys
    import time

    from training.shapes import ShapesConfig, generate_dataset

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=24, val_per_class=2,
                                                            test_per_class=0), progress=False)
    args = ["-m", "training", "--data", str(data), "--width", "0.125", "--image-size", "64", "--resize", "64",
            "--epochs", "4", "--batch-size", "16", "--workers", "1", "--seed", "7"]
    assert run_python(*args, "--out", str(tmp_path / "straight")).returncode == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, *args, "--out", str(interrupted)], cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (interrupted / "last.pt").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_after = load_checkpoint(interrupted / "last.pt")["epoch"]
    assert stopped_after < 4, "the run finished before it could be interrupted"

    resumed = run_python(*args, "--out", str(interrupted), "--resume", str(interrupted / "last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {interrupted / 'last.pt'} after epoch {stopped_after}" in resumed.stderr
    straight, again = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(interrupted / "last.pt")
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(again["state_dict"][name], tensor), name
    wrong = run_python(*args, "--out", str(interrupted), "--resume", str(interrupted / "best.pt"))
    assert wrong.returncode == 2 and "use the run's last.pt" in wrong.stderr
    log = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2, 3, 4]
    steps = [json.loads(line)["step"] for line in (interrupted / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, log[-1]["step"] + 1))  # the killed epoch's steps are not counted twice
