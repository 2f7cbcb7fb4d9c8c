"""Running the study's jobs: one Keel training run (or one causes run) per job, `jobs` at a time.

Each job runs in a worker process on one thread, so a result does not depend on how many run
beside it; a training run goes through `training.train.train` itself, with the study's
`StepProbe` as its step hook, and comes back as a small dict (`summarize_run`) for the results
JSON. Run directories are deleted once summarised unless the study was given a --work folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import itertools
import json
import math
import multiprocessing
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig
from training.study.causes import round4
from training.study.faults import Fault, StepProbe

CURVE_POINTS = 100  # a run's loss and gradient-norm curves are kept at this many points at most


@dataclass(frozen=True)
class RunSpec:
    config: TrainConfig
    faults: tuple[Fault, ...] = ()
    update_every: int = 10
    keep: bool = False  # leave the run directory (checkpoints, logs, plots) in place


def run_training(spec: RunSpec) -> dict:
    """Train `spec.config` with a probe (faults, update sizes); returns the run's summary."""
    from training.stability import TrainingDiverged
    from training.train import train

    out = Path(spec.config.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    probe = StepProbe(spec.faults, spec.update_every, num_classes=10)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary, error = {}, None
    # the run's own progress lines go to its log: many runs share the terminal
    with open(out / "train.log", "w") as log, contextlib.redirect_stderr(log):
        try:
            summary = train(spec.config, step_hook=probe)
        except TrainingDiverged as exc:
            error = str(exc).split("; ")[0]
    result = summarize_run(out, summary, error, probe, spec.config)
    result["final_test_acc"] = final_test_accuracy(spec.config) if error is None else None
    result.update(seconds=round(time.perf_counter() - started, 1),
                  cpu_seconds=round(time.process_time() - cpu_started, 1))
    if not spec.keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def final_test_accuracy(config: TrainConfig) -> float | None:
    """The final weights' (last.pt) test accuracy, when the data has a test split. Keel's summary
    scores best.pt, the best checkpoint by validation accuracy, which can predate a blow-up or an
    injected fault and so hide it; the study judges how a run ended."""
    import torch

    from service.preprocessing import PreprocessSpec, find_images
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.data import DeviceBatches, ImageFolder, UnreadableImages, make_loader
    from training.evaluation import evaluate

    test = Path(config.data) / "test"
    if not find_images(test):
        return None
    checkpoint = load_checkpoint(Path(config.out) / "last.pt")
    spec = PreprocessSpec.from_dict(checkpoint["preprocessing"])
    device = torch.device("cpu")
    batches = DeviceBatches(make_loader(ImageFolder(test, checkpoint["labels"], spec), config.batch_size, 0), spec,
                            device, UnreadableImages("skip", None), "test")
    return evaluate(model_from_checkpoint(checkpoint), batches, device, checkpoint["labels"])["acc"]


def summarize_run(out: Path, summary: dict, error: str | None, probe: StepProbe, config: TrainConfig) -> dict:
    """What the study keeps of a run: outcome, accuracy, and how its steps went."""
    steps = read_jsonl(out / "steps.jsonl")
    metrics = read_jsonl(out / "metrics.jsonl")
    applied = [r for r in steps if not r["skipped"] and "rollback" not in r and "diverged" not in r]
    norms = [r["grad_norm"] for r in steps if r["grad_norm"] is not None]
    updates = [probe.updates[r["step"]] for r in applied if r["step"] in probe.updates]
    blew_up = blowup_step(steps, config)
    return {
        "stopped": error is not None,  # no model at the end: non-finite without the guard, or the guard gave up
        "error": error,
        "blowup_step": blew_up,
        "steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,  # at initialisation: how large the forward pass starts
        "test_acc": summary.get("test_acc"),
        "best_val_acc": summary.get("best_val_acc") if error is None else None,
        "final_val_acc": metrics[-1]["val_acc"] if metrics and error is None else None,
        "val_acc": [r["val_acc"] for r in metrics],
        "skipped_steps": sum(bool(r["skipped"]) for r in steps),
        "rollbacks": sum("rollback" in r for r in steps),
        "rollback_steps": [r["step"] for r in steps if "rollback" in r],
        "clip_rate": sum(bool(r["clipped"]) for r in applied) / len(applied) if applied else None,
        "update_median": statistics.median(updates) if updates else None,
        "grad_norm_median": statistics.median(norms) if norms else None,
        "grad_norm_max": max(norms) if norms else None,
        "lead_layer": lead_layer(steps, blew_up) if blew_up else None,
        "faulty_steps": probe.faulty_steps,
        "curve": curve(steps),
    }


def blowup_step(steps: list[dict], config: TrainConfig) -> int | None:
    """The first step whose loss or gradient was not finite, or whose loss the guard's divergence test
    (above `rollback_loss_factor` x max(running median, ln 10), at TrainConfig's default factor) flags.
    Without the guard nothing acts on it, so it is applied here after the fact; with it, it is the
    step the guard rolled back at."""
    from training.stability import DivergenceMonitor

    monitor = DivergenceMonitor(config.rollback_skips, config.rollback_window, TrainConfig.rollback_loss_factor,
                                num_classes=10)
    for record in steps:
        if record["loss"] is None or record["grad_norm"] is None or "rollback" in record:
            return record["step"]
        if monitor.observe(record["step"], record["loss"]):
            return record["step"]
    return None


def lead_layer(steps: list[dict], trouble: int) -> dict | None:
    """The layer that led a blow-up: at the last step with per-layer norms before the blow-up (that
    step itself when it is the first), the largest gradient norm relative to the layer's weight
    norm. A raw norm would name whichever layer has the largest weights; the ratio is the step each
    layer is asked to take relative to its size."""
    layered = [r for r in steps if r.get("layers") and r.get("layer_weights") and r["step"] <= trouble]
    before = [r for r in layered if r["step"] < trouble] or layered
    if not before:
        return None
    record = before[-1]
    ratios = {name: g / max(record["layer_weights"][name], 1e-12) for name, g in record["layers"].items()
              if g is not None and math.isfinite(g)}
    if not ratios:
        return None
    ordered = sorted(ratios, key=ratios.get, reverse=True)
    return {"step": record["step"], "layer": ordered[0], "ratio": round4(ratios[ordered[0]]),
            "runner_up": ordered[1] if len(ordered) > 1 else None,
            "runner_up_ratio": round4(ratios[ordered[1]]) if len(ordered) > 1 else None,
            "largest_raw_norm": max(record["layers"], key=lambda name: record["layers"][name] or 0.0)}


def curve(steps: list[dict]) -> dict:
    """Loss and gradient norm per step, as the maximum over bins when the run is longer than CURVE_POINTS
    (a spike stays visible); None where a value was not finite."""
    size = max(1, math.ceil(len(steps) / CURVE_POINTS))
    points = {"step": [], "loss": [], "grad_norm": []}
    for i in range(0, len(steps), size):
        chunk = steps[i:i + size]
        points["step"].append(chunk[-1]["step"])
        for key in ("loss", "grad_norm"):
            values = [r[key] for r in chunk if r[key] is not None]
            points[key].append(round4(max(values)) if len(values) == len(chunk) else None)
    return points


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def torch_threads(count: int) -> int:
    """Sets torch's intra-op threads; returns the count before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    return before


class Scheduler:
    """Runs jobs `jobs` at a time in worker processes (in this process when jobs is 1), lowest priority
    number first among those ready; a job's callback may submit the jobs that depend on it."""

    def __init__(self, jobs: int, progress: Callable[[str], None] | None = None):
        self.jobs, self.ready, self.order = jobs, [], itertools.count()
        self.progress = progress or (lambda line: print(line, file=sys.stderr))
        self.done, self.started = 0, time.perf_counter()

    def submit(self, priority: int, label: str, function: Callable, argument, callback: Callable[[dict], None]):
        heapq.heappush(self.ready, (priority, next(self.order), label, function, argument, callback))

    def run(self) -> None:
        if self.jobs == 1:
            threads = torch_threads(1)
            try:
                while self.ready:
                    _, _, label, function, argument, callback = heapq.heappop(self.ready)
                    self.finish(label, function(argument), callback)
            finally:
                torch_threads(threads)
            return
        with concurrent.futures.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch_threads, initargs=(1,)) as pool:
            running = {}
            while self.ready or running:
                while self.ready and len(running) < self.jobs:
                    _, _, label, function, argument, callback = heapq.heappop(self.ready)
                    running[pool.submit(function, argument)] = (label, callback)
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    label, callback = running.pop(future)
                    self.finish(label, future.result(), callback)

    def finish(self, label: str, result: dict, callback: Callable[[dict], None]) -> None:
        self.done += 1
        minutes = (time.perf_counter() - self.started) / 60
        self.progress(f"[{self.done} done, {len(self.ready)} queued, {minutes:.1f} min] {label}: {outcome(result)}")
        callback(result)


def outcome(result: dict) -> str:
    if "setting" in result:  # a causes run
        return f"diverged at step {result['blowup_step']}" if result["blowup_step"] else "finished"
    text = f"stopped at step {result['steps']}" if result["stopped"] else (
        f"final val {result['final_val_acc']:.1%}" + (f", final test {result['final_test_acc']:.1%}"
                                                       if result["final_test_acc"] is not None else ""))
    extra = [f"{result[k]} {k.replace('_', ' ')}" for k in ("skipped_steps", "rollbacks") if result[k]]
    if result["blowup_step"] and not result["stopped"]:
        extra.insert(0, f"blew up at step {result['blowup_step']}")
    return ", ".join([text, *extra, f"{result['steps']} steps, {result['seconds']} s"])
