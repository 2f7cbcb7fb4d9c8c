"""Data-parallel training: two real processes under torchrun (gloo on CPU) on a tiny data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python
from training.checkpoint import load_checkpoint

PER_CLASS, BATCH = 24, 8  # 240 images: each of 2 processes takes 120 per epoch, 15 steps of 8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from training.shapes import ShapesConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("ddp") / "data", ShapesConfig(size=64, train_per_class=PER_CLASS,
                            val_per_class=2, test_per_class=2), progress=False)


def torchrun(data: Path, out: Path, *flags: str):
    return run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training",
                      "--data", str(data), "--out", str(out), "--width", "0.125",
                      "--image-size", "64", "--resize", "64",
                      "--batch-size", str(BATCH), "--workers", "0", "--lr", "0.01", *flags,
                      env={"OMP_NUM_THREADS": "1"}, timeout=240)


def steps_of(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow  # trains
def test_two_processes_train_one_model_and_resume(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = torchrun(tiny_data, run, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 processes (gloo)" in first.stderr
    assert first.stderr.count("epoch 2/2  loss") == 1  # only the first process reports
    summary = json.loads((run / "summary.json").read_text())
    digests = summary["rank_weight_digests"]
    assert summary["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]  # the ranks agree
    # the steps are the global ones, each logged once by the first process: 2 epochs of 240 / (2 x 8)
    assert steps_of(run) == list(range(1, 2 * PER_CLASS * 10 // (2 * BATCH) + 1))
    last = load_checkpoint(run / "last.pt")
    assert last["world_size"] == 2 and len(last["rng_ranks"]) == 2 and last["epoch"] == 2
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"] and not list(run.glob(".*.tmp"))
    trained_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    assert 0 < trained_loss < 2.5  # ln(10) = 2.30 at chance: finite, and not blowing up

    resumed = torchrun(tiny_data, run, "--epochs", "3", "--resume", str(run / "last.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "after epoch 2" in resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert steps_of(run) == list(range(1, 3 * 15 + 1))
    digests = json.loads((run / "summary.json").read_text())["rank_weight_digests"]
    assert digests[0] == digests[1]

    # one process cannot go on from two processes' data order
    alone = run_python("-m", "training", "--data", str(tiny_data), "--out", str(run), "--width", "0.125",
                       "--image-size", "64", "--resize", "64", "--epochs", "4", "--workers", "0",
                       "--resume", str(run / "last.pt"))
    assert alone.returncode == 2 and "was trained by 2 processes, not 1" in alone.stderr
