"""Rerun every benchmark and assemble docs/benchmarks.md: `make bench` (or `make bench QUICK=1`).

`python -m benchmarks [--quick] [--model artifacts/bench/model.onnx] [--checkpoint runs/bench/best.pt]
                     [--data data/shapes] [--only NAME ...]`

1. Prepares what the benchmarks need: the data set (data/shapes, as `make data` makes it), and
   unless --model/--checkpoint name others, the benchmark's own 64 px model: a one-epoch checkpoint
   of BENCH_TRAINING in runs/bench/ and its export in artifacts/bench/ (training and export CLIs),
   made once — speed does not depend on accuracy, every published number is for this model whatever
   the quick start's recipe becomes, and `make serve` never picks it up — and, for the service
   benchmark, a full-size model in artifacts/bench-large/ (LARGE_TRAINING).
2. Runs each benchmark module that exists, one after another, each in its own process
   (`python -m benchmarks.<name> [--quick] --out DIR`), so one failing does not stop the rest.
   The model, checkpoint and data set are passed on as KEEL_BENCH_MODEL, KEEL_BENCH_CHECKPOINT
   and KEEL_BENCH_DATA (and as --model to the modules that take it).
3. Writes docs/benchmarks.md from every module's DIR/<name>.json with its `render()`: machine,
   date, command, the load average when the run started, then each section.
A full run writes docs/benchmarks/ and docs/benchmarks.md (committed); --quick is a smoke check
and writes build/bench-quick/ instead, leaving the published numbers alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# In the order they run and appear; a module that does not exist (yet) is skipped.
MODULES = ("limit", "service_load", "replicas", "batch_job", "export_variants", "train_overhead", "data_loading",
           "quickstart")
TAKES_MODEL = ("limit", "service_load", "replicas")
# The benchmarks' model: the quick-start architecture (alexnet_bn at width 0.25) at the shapes' own 64 px,
# one epoch. The quick start trains it at 96 px since #16; the service, peer and replica numbers are for this.
BENCH_TRAINING = ["--arch", "alexnet_bn", "--image-size", "64", "--resize", "64", "--width", "0.25",
                  "--model-args", '{"dropout": 0.0}', "--epochs", "1", "--batch-size", "64", "--optimizer", "adamw",
                  "--lr", "0.003"]
# A full-size network for the service benchmark, where inference and not HTTP is the cost: AlexNet-BN
# at width 1 and 224 px (228 MB), one epoch on 4 images per class (about 30 s): speed does not
# depend on the weights.
LARGE_TRAINING = ["--arch", "alexnet_bn", "--image-size", "224", "--resize", "256", "--width", "1.0", "--epochs", "1",
                  "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.001", "--workers", "0"]
LARGE_DIR = REPO / "artifacts" / "bench-large"


def step(*args: str) -> None:
    print("+ python " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def prepare(model: Path, checkpoint: Path, data: Path) -> tuple[Path, Path, Path]:
    """(model, checkpoint, data) to benchmark: the given ones when they exist, else made here."""
    if not (data / "dataset.json").is_file():
        step("-m", "training.shapes", "--out", str(data))
    if not checkpoint.is_file():
        checkpoint = REPO / "runs" / "bench" / "best.pt"
        if not checkpoint.is_file():
            print(f"no benchmark checkpoint yet: training one epoch into {checkpoint.parent}", file=sys.stderr)
            step("-m", "training", "--data", str(data), "--out", str(checkpoint.parent), *BENCH_TRAINING)
    if not model.is_file():
        model = REPO / "artifacts" / "bench" / "model.onnx"
        if not model.is_file():
            print(f"no benchmark model yet: exporting {checkpoint} to {model}", file=sys.stderr)
            step("-m", "export", str(checkpoint), "--out", str(model), "--name", "keel-bench")
    return model, checkpoint, data


def prepare_large() -> Path:
    """The full-size model (LARGE_TRAINING), made once into artifacts/bench-large/."""
    model = LARGE_DIR / "model.onnx"
    if not model.is_file():
        print(f"making the full-size model {model} (LARGE_TRAINING)", file=sys.stderr)
        step("-m", "training.shapes", "--out", str(LARGE_DIR / "data"), "--train-per-class", "4",
             "--val-per-class", "2", "--test-per-class", "2", "--overwrite")
        step("-m", "training", "--data", str(LARGE_DIR / "data"), "--out", str(LARGE_DIR / "run"), *LARGE_TRAINING)
        step("-m", "export", str(LARGE_DIR / "run" / "best.pt"), "--out", str(model), "--name", "keel-bench-large")
    return model


def available(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(f"benchmarks.{name}") is not None]


def assemble(out: Path, doc: Path, run_info: dict) -> str:
    """docs/benchmarks.md from the JSON results in `out` (every module that has some)."""
    sections, machine = [], None
    for name in available(MODULES):
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        machine = machine or results.get("machine")
        try:
            sections.append(importlib.import_module(f"benchmarks.{name}").render(results))
        except Exception as exc:  # one module's renderer must not lose the others' sections
            sections.append(f"### {name}\n\nrendering {path.name} failed: {type(exc).__name__}: {exc}\n")
    lines = ["# Benchmarks", "",
             "Every number is the median of repeated runs, with min–max in brackets; the JSON beside each "
             "section's source (`docs/benchmarks/<name>.json`) also has the interquartile range.", ""]
    if machine:
        lines += [f"- **Machine**: {machine.get('cpu_model')}, {machine.get('cpus')} CPUs, "
                  f"{machine.get('memory_gib')} GiB, GPU: {machine.get('gpu')}; {machine.get('platform')}, "
                  f"Python {machine.get('python')}"]
    scope = " (only those; the other sections are from their own last run)" if "--only" in run_info["command"] else ""
    lines += [f"- **Run**: {run_info['date']}, `{run_info['command']}`{scope}"
              f"{' (quick smoke run: not for comparison)' if run_info['quick'] else ''}, commit "
              f"`{run_info['commit']}`, load average {run_info['loadavg']} at the start",
              f"- **Model**: `{run_info['model']}` (checkpoint `{run_info.get('checkpoint')}`)", ""]
    if run_info.get("failed"):
        lines += [f"Failed this run (older results, if any, are shown): {', '.join(run_info['failed'])}.", ""]
    decisions = REPO / "docs" / "benchmarks" / "decisions.md"  # hand-written, not measured by this run
    if decisions.is_file():
        sections.append(decisions.read_text())
    text = "\n".join(lines) + "\n" + "\n".join(sections)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip() + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: each module in < 30 s, into build/")
    parser.add_argument("--model", type=Path, default=Path("artifacts/bench/model.onnx"), help="exported model to use")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/bench/best.pt"),
                        help="checkpoint to use (the model's, for the export and training benchmarks)")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="shapes data set to use")
    parser.add_argument("--only", nargs="+", choices=MODULES, metavar="NAME", help=f"a subset of {', '.join(MODULES)}")
    parser.add_argument("--out", type=Path, help="results folder (default docs/benchmarks, or build/bench-quick)")
    args = parser.parse_args(argv)
    out = args.out or Path("build/bench-quick" if args.quick else "docs/benchmarks")
    doc = out / "benchmarks.md" if (args.quick or args.out) else Path("docs/benchmarks.md")
    names = available(tuple(args.only) if args.only else MODULES)
    if not names:
        parser.error("no benchmark modules found")

    model, checkpoint, data = prepare(args.model.resolve(), args.checkpoint.resolve(), args.data.resolve())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    run_info = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "command": ("make bench" + (" QUICK=1" if args.quick else "") if not args.only else
                            f"python -m benchmarks --only {' '.join(args.only)}"),
                "quick": args.quick,
                "commit": commit.stdout.strip() or "unknown",
                "loadavg": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
                "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
                "checkpoint": str(checkpoint.relative_to(REPO) if checkpoint.is_relative_to(REPO) else checkpoint),
                "failed": []}
    env = {**os.environ, "KEEL_BENCH_MODEL": str(model), "KEEL_BENCH_CHECKPOINT": str(checkpoint),
           "KEEL_BENCH_DATA": str(data)}
    if {"service_load", "batch_job"} & set(names) and not args.quick:
        env["KEEL_BENCH_LARGE_MODEL"] = str(prepare_large())
    started = time.monotonic()
    for index, name in enumerate(names, 1):
        argv_ = ["-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if args.quick else [])
        argv_ += ["--model", str(model)] if name in TAKES_MODEL else []
        print(f"[{index}/{len(names)}] benchmarks.{name} ({time.monotonic() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
        if subprocess.run([sys.executable, *argv_], cwd=REPO, env=env).returncode != 0:
            run_info["failed"].append(name)
            print(f"benchmarks.{name} failed; going on with the rest", file=sys.stderr)
    assemble(out, doc, run_info)
    print(f"wrote {doc} ({time.monotonic() - started:.0f} s); results in {out}/", file=sys.stderr)
    if run_info["failed"]:
        print(f"failed: {', '.join(run_info['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
