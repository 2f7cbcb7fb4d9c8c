"""Each architecture at its recipe (training/recipes/<arch>.yaml) on the full built-in data set:
`python -m training.study --only-recipes`. Results go to docs/stability/recipes.json."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from training.config import TrainConfig

RECIPES = Path(__file__).parent.parent / "recipes"
RECIPE_ARCHS = ("alexnet", "alexnet_bn", "inception_v1_bn", "inception_v3")


def run_recipes(data: Path, work: Path, archs: tuple[str, ...] = RECIPE_ARCHS) -> dict:
    from training.__main__ import load_recipe
    from training.train import train

    results = {}
    for arch in archs:
        recipe = load_recipe(RECIPES / f"{arch}.yaml")
        out = work / f"recipe-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"recipe {arch}: {recipe}", file=sys.stderr)
        train(TrainConfig(**{**recipe, "data": str(data), "out": str(out), "device": "cpu"}))
        results[arch] = {**recipe_result(arch, out), "machine": machine_name()}
    return results


def machine_name() -> str:
    from benchmarks.common import machine

    info = machine()
    return f"{info['cpu_model']}, {info['cpus']} CPUs"


def recipe_result(arch: str, run: Path) -> dict:
    """The table row of a finished recipe run, from its run directory."""
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    seconds = sum(json.loads(line)["seconds"] for line in (run / "metrics.jsonl").read_text().splitlines())
    return {"recipe": f"training/recipes/{arch}.yaml", "test_acc": summary["test_acc"],
            "test_top5": summary["test_top5"],
            "best_val_acc": summary["best_val_acc"], "epochs": config["epochs"], "width": config["width"],
            "image_size": config["image_size"], "skipped_steps": summary["stability"]["skipped_steps"],
            "rollbacks": summary["stability"]["rollbacks"], "grad_norm_max": summary["stability"]["grad_norm_max"],
            "minutes": round(seconds / 60, 1)}


def render_recipes(recipes: dict) -> list[str]:
    lines = ["## Accuracy at each recipe", "",
             "Each architecture trained at its recipe (`training/recipes/<arch>.yaml`, CPU, small width) on "
             "the full built-in shapes data set (`python -m training.shapes` defaults), one seed; test split "
             "accuracy of the best checkpoint. Reproduce: `python -m training.study --only-recipes` (or "
             "`--recipes ARCH ...` for some). Training minutes are wall time on the machine named in the last "
             "column, one thread per run, while other jobs shared its cores: they show the relative cost, not a "
             "speed.", "",
             "| arch | recipe | width | image size | epochs | test top-1 | test top-5 | skipped | rollbacks "
             "| max grad norm | training minutes | machine |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, r in recipes.items():
        lines.append(f"| `{arch}` | [{Path(r['recipe']).name}](../{r['recipe']}) | {r['width']} | "
                     f"{r['image_size']} | {r['epochs']} | {r['test_acc']:.1%} | {r['test_top5']:.1%} | "
                     f"{r['skipped_steps']} | {r['rollbacks']} | {r['grad_norm_max']:.3g} | {r['minutes']} | "
                     f"{r.get('machine', 'not recorded')} |")
    return [*lines, ""]
