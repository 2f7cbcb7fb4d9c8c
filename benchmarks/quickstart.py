"""The quick start's training (`make train`), timed, against the same at BEFORE: wall time and test accuracy.

`make serve` trains training/recipes/alexnet_bn.yaml on the shapes data set; #16 changed that recipe
and the input pipeline under it, with the target of a higher test accuracy in no more wall time.
This runs both, one after the other on the same machine and data: *before* is the repository at
BEFORE (`git archive`, run with this interpreter), *after* the working tree, each exactly as `make
train` runs it (`python -m training --recipe training/recipes/alexnet_bn.yaml`). Take it on a quiet
machine: about two quick-start trainings (7-8 minutes on 2 cores).
`python -m benchmarks.quickstart [--quick] --out DIR` -> DIR/quickstart.json (--quick: 2 epochs each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_results

NAME = "quickstart"
BEFORE = "f337699"  # main before #16's recipe and input pipeline
REPO = Path(__file__).resolve().parents[1]
RECIPE = "training/recipes/alexnet_bn.yaml"


def train(source: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """`python -m training --recipe RECIPE` in `source`, timed; the run's summary and per-epoch seconds."""
    command = [sys.executable, "-m", "training", "--recipe", RECIPE, "--data", str(data), "--out", str(out), *extra]
    print(f"+ (cd {source}) {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=source, check=True, env={**os.environ, "PYTHONPATH": str(source)})
    seconds = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": round(seconds, 1), "epochs": len(epochs),
            "median_epoch_s": statistics.median(r["seconds"] for r in epochs),
            "test_acc": summary.get("test_acc"), "best_val_acc": summary["best_val_acc"],
            "best_weights": summary.get("best_weights", "model")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs each: a smoke run")
    parser.add_argument("--out", type=Path, required=True, help="results folder (docs/benchmarks/ for the docs)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("KEEL_BENCH_DATA", "data/shapes")),
                        help="the shapes data set (default: $KEEL_BENCH_DATA, else data/shapes)")
    args = parser.parse_args(argv)
    data = args.data.resolve()
    if not (data / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "training.shapes", "--out", str(data)], cwd=REPO, check=True)
    extra = ["--epochs", "2"] if args.quick else []
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", BEFORE], cwd=REPO, capture_output=True)
        if archive.returncode == 0:
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
            runs["before"] = train(before, data, Path(tmp) / "run-before", extra)
        else:
            print(f"no git history with {BEFORE}: timing the current recipe only", file=sys.stderr)
        runs["after"] = train(REPO, data, Path(tmp) / "run-after", extra)
    recipe = (REPO / RECIPE).read_text()
    results = {"name": NAME, "quick": args.quick, "before_commit": BEFORE, "recipe": RECIPE,
               "recipe_text": recipe, "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"), "runs": runs}
    if "before" in runs:
        results["wall_ratio"] = round(runs["after"]["wall_s"] / runs["before"]["wall_s"], 3)
    path = write_results(args.out, NAME, results)
    print(render(results), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def render(results: dict) -> str:
    lines = [
        "### Quick-start training",
        "",
        f"`make train` (`python -m training --recipe {results['recipe']}` on the shapes data set), timed from "
        f"start to summary, against the same command at `{results['before_commit']}`, one after the other on this "
        "machine" + (" (quick smoke run: 2 epochs each, accuracies meaningless)" if results["quick"] else "") + ".",
        "",
        "| version | epochs | wall time | median epoch | test top-1 | best val top-1 (weights) |",
        "|---|---|---|---|---|---|",
    ]
    for which, run in results["runs"].items():
        test = f"{run['test_acc']:.3f}" if run["test_acc"] is not None else "-"
        lines.append(f"| {which} | {run['epochs']} | {run['wall_s'] / 60:.1f} min | {run['median_epoch_s']:.1f} s | "
                     f"{test} | {run['best_val_acc']:.3f} ({run['best_weights']}) |")
    if "wall_ratio" in results:
        lines += ["", f"Wall time after / before: {results['wall_ratio']:.2f}."]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
