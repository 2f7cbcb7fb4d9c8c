"""A real (tiny) training run: it learns, and what it writes is complete and safe to load."""

from __future__ import annotations

import dataclasses
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
                 "confusion_test.png", "steps.jsonl", "steps.png", "skipped.jsonl"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "skipped.jsonl").read_text() == ""  # every shapes image reads
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
    """Of the model's weights and (with EMA) their average, best.pt holds whichever validated best."""
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    best = load_checkpoint(trained_run / "best.pt")
    selected = best["metrics"]["ema_val_acc" if best["weights"] == "ema" else "val_acc"]
    assert selected == max(max(r["val_acc"], r.get("ema_val_acc", 0.0)) for r in records)
    assert load_checkpoint(trained_run / "last.pt")["epoch"] == len(records)
    assert load_checkpoint(trained_run / "last.pt")["weights"] == "model"


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
    with pytest.raises((pickle.PicklingError, AttributeError)):  # AttributeError: a local object, Python 3.11
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


@pytest.mark.slow  # trains
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


@pytest.mark.slow  # trains
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


def test_rng_state_is_per_device_kind_and_a_cross_device_resume_says_it_will_not_repeat(tmp_path, capsys):
    """A CPU run's checkpoint has no CUDA generator state (a CUDA run's has `rng["cuda"]`, its device's,
    restored on resume: dropout on the GPU draws from it); resuming a CUDA checkpoint on the CPU works,
    but says the run will not repeat bit for bit."""
    from training.config import TrainConfig
    from training.shapes import ShapesConfig, generate_dataset
    from training.train import train

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=4, val_per_class=1,
                                                            test_per_class=0), progress=False)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), width=0.125, image_size=64, resize=64, epochs=1,
                         batch_size=8, workers=0, device="cpu")
    train(config)
    last = tmp_path / "run" / "last.pt"
    checkpoint = load_checkpoint(last)
    assert set(checkpoint["rng"]) == {"torch"}
    checkpoint["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA run would have written it
    save_checkpoint(last, checkpoint)
    capsys.readouterr()
    train(dataclasses.replace(config, epochs=2, resume=str(last)))
    assert "was trained on another kind of device; the run will not repeat bit for bit" in capsys.readouterr().err
    assert load_checkpoint(last)["epoch"] == 2


def damaged_shapes(root: Path, train_per_class: int = 8) -> Path:
    """A tiny shapes data set with one unreadable image in train/ (not an image) and one in val/ (truncated)."""
    from training.shapes import ShapesConfig, generate_dataset

    data = generate_dataset(root, ShapesConfig(size=64, train_per_class=train_per_class, val_per_class=2,
                                               test_per_class=1), progress=False)
    (data / "train" / "circle" / "00002.png").write_bytes(b"not an image at all")
    good = (data / "val" / "star" / "00000.png").read_bytes()
    (data / "val" / "star" / "00000.png").write_bytes(good[: len(good) // 3])
    return data


@pytest.mark.slow
def test_a_resumed_run_with_augmentation_ema_and_bad_images_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    """Everything random in training (per-sample augmentation in persistent workers, erasing, mixup/cutmix)
    and the weight average continue exactly across an interruption; bad images are logged once."""
    import training.train as train_module
    from training.config import TrainConfig

    data = damaged_shapes(tmp_path / "data")
    settings = dict(data=str(data), arch="alexnet_bn", width=0.125, image_size=64, resize=64, epochs=3, batch_size=16,
                    workers=2, seed=11, min_crop_scale=0.3, color_jitter=(0.3, 0.3, 0.3, 0.05), auto_augment="ta_wide",
                    random_erase=0.5, mixup_alpha=0.4, cutmix_alpha=1.0, label_smoothing=0.1, ema_decay=0.9)
    straight = train_module.train(TrainConfig(out=str(tmp_path / "straight"), **settings))

    save = train_module.save_checkpoint

    def save_then_stop(path, payload):
        save(path, payload)
        if Path(path).name == "last.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt  # as if killed right after epoch 2's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train_module.train(TrainConfig(out=str(out), **settings))
    monkeypatch.undo()
    resumed = train_module.train(TrainConfig(out=str(out), resume=str(out / "last.pt"), **settings))

    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(out / "last.pt")
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
    assert a["ema"]["updates"] == b["ema"]["updates"] == 15
    for name, tensor in a["ema"]["state_dict"].items():
        assert torch.equal(b["ema"]["state_dict"][name], tensor), name
    assert straight["test_acc"] == resumed["test_acc"] and straight["best_weights"] == resumed["best_weights"]
    best = load_checkpoint(out / "best.pt")
    assert best["weights"] == best["metrics"]["weights"] == resumed["best_weights"] in ("model", "ema")
    selected = best["metrics"]["ema_val_acc" if best["weights"] == "ema" else "val_acc"]
    assert selected == resumed["best_val_acc"]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in records] == [2, 2, 2] and all("ema_val_acc" in r for r in records)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted((r["split"], Path(r["path"]).name) for r in skipped) == [("train", "00002.png"), ("val", "00000.png")]
    assert resumed["skipped_images"] == straight["skipped_images"] == 2


def test_bad_images_fail_stops_the_run_naming_the_file(tmp_path):
    data = damaged_shapes(tmp_path / "data", train_per_class=2)
    result = run_python("-m", "training", "--data", str(data), "--out", str(tmp_path / "run"), "--width", "0.125",
                        "--image-size", "64", "--resize", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                        "--bad-images", "fail")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: {data / 'train' / 'circle' / '00002.png'}: not a recognised image format" in result.stderr
