"""`python -m training.study`: run the stability study and write docs/stability.md from its results.

  python -m training.study --jobs 2          the whole study (results: docs/stability/study.json)
  python -m training.study --quick           the same machinery in seconds, on a micro data set
  python -m training.study --render          rewrite the page and figures from the saved results
  python -m training.study --only-recipes    every architecture at its recipe (docs/stability/recipes.json)

See training/study/__init__.py for what the study measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from training.study import __doc__ as overview
    from training.study.recipes import RECIPE_ARCHS

    parser = argparse.ArgumentParser(prog="python -m training.study", description=overview.split("\n\n")[0])
    parser.add_argument("--out", default="docs",
                        help="folder for stability.md; figures and results go to OUT/stability/")
    parser.add_argument("--work", help="folder for the data and runs, kept afterwards with every run's directory "
                                       "(default: a temporary folder, removed)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each on one thread")
    parser.add_argument("--quick", action="store_true", help="seconds on a micro data set: checks the machinery")
    parser.add_argument("--seeds", type=int, help="seeds per set-up instead of the configured 5 (a reduced study)")
    parser.add_argument("--epochs", type=int, help="epochs per run instead of the configured ones (a reduced study)")
    parser.add_argument("--render", action="store_true", help="only rewrite stability.md and the figures from the "
                                                              "saved results")
    parser.add_argument("--recipes", nargs="*", choices=RECIPE_ARCHS, metavar="ARCH",
                        help=f"also train these architectures (default: all of {', '.join(RECIPE_ARCHS)}) at their "
                             "recipes")
    parser.add_argument("--only-recipes", action="store_true", help="train the recipes, skip the study")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    from benchmarks.common import machine
    from training.shapes import ShapesConfig, generate_dataset
    from training.study.design import QUICK, StudyConfig
    from training.study.experiment import run_study
    from training.study.recipes import run_recipes
    from training.study.report import render, write_figures

    out, figures = Path(args.out), Path(args.out) / "stability"
    figures.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="keel-study-"))
    config = QUICK if args.quick else StudyConfig()
    config = dataclasses.replace(config, **{k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v})
    try:
        if not args.render and not args.only_recipes:
            load_before, started = os.getloadavg(), time.perf_counter()
            study = run_study(config, work, args.jobs, keep=bool(args.work))
            study["timing"] = {"wall_seconds": round(time.perf_counter() - started, 1), "jobs": args.jobs,
                               "load_before": [round(v, 2) for v in load_before],
                               "load_after": [round(v, 2) for v in os.getloadavg()], "quick": args.quick}
            study["machine"] = machine()
            (figures / "study.json").write_text(json.dumps(study, indent=1) + "\n")
        if not args.render and (args.recipes is not None or args.only_recipes) and not args.quick:
            data = generate_dataset(work / "data-full", ShapesConfig(), progress=True, overwrite=True)
            recipes = run_recipes(data, work / "recipes", tuple(args.recipes or RECIPE_ARCHS))
            # merged into the earlier results, so architectures can be measured one at a time
            path = figures / "recipes.json"
            merged = {**(json.loads(path.read_text()) if path.exists() else {}), **recipes}
            ordered = {arch: merged[arch] for arch in RECIPE_ARCHS if arch in merged}
            path.write_text(json.dumps(ordered, indent=2) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def load(name: str) -> dict | None:
        return json.loads((figures / name).read_text()) if (figures / name).exists() else None

    study = load("study.json")
    if study:
        write_figures(study, figures)
    (out / "stability.md").write_text(render(study, load("recipes.json")))
    print(f"wrote {out / 'stability.md'}" + (f" and its figures in {figures}" if study else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
