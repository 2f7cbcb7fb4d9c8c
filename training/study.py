"""The explosion study: does a deep CNN at a high learning rate blow up, and what stops it?

`python -m training.study` trains one architecture family (AlexNet, with and without batch norm)
on a small built-in shapes data set under four set-ups, everything else equal (SGD with Nesterov
momentum at 5x the learning rate that trains alexnet_bn well, from the first step: no warmup):

  (a) no BN, no clipping, no guard      (b) clipping only (adaptive, unit-wise: AGC)
  (c) BN only                           (d) BN + clipping + non-finite guard and rollback

and writes `docs/stability.md`: a table (final accuracy, skipped steps, rollbacks, max gradient
norm, diverged, the layer that led the explosion) and plots of loss and gradient norm per set-up
(`docs/stability/`). Each set-up trains on one thread, so its numbers do not depend on the
machine's core count; `--jobs N` trains N at once. `--recipes` also trains every architecture at
its recipe (training/recipes/) on the full built-in data set and adds the test accuracies; each
part keeps its results in `docs/stability/*.json`, so running one part re-renders the page with
the other's last results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import TrainConfig
from training.shapes import ShapesConfig, generate_dataset
from training.stability import TrainingDiverged

RECIPES = Path(__file__).parent / "recipes"
ARCHS = ("alexnet", "alexnet_bn", "inception_v1_bn", "inception_v3")


@dataclass(frozen=True)
class StudyConfig:
    # Measured on this data at width 0.25, 64 px, batch 64, one thread, ~0.08 s a step (2026-11).
    train_per_class: int = 500  # shapes images per class for training (64 px); val and test get 20 each
    width: float = 0.25  # AlexNet channel multiplier: a quarter of 64-192-384-256-256
    image_size: int = 64  # the shapes images' own size: no resizing
    # 1,170 steps, ~1.5 min per set-up that does not blow up: (d) reached 78.5% test accuracy after
    # 15 epochs, and no more after 20 (78%); (a) and (c) stop within 6 steps.
    epochs: int = 15
    min_crop_scale: float = 0.8  # milder augmentation, as in the recipes
    batch_size: int = 64  # images per step
    # SGD peak learning rate from the first step (no warmup), then cosine decay. alexnet_bn trains
    # to 81% at 0.1 with a one-epoch warmup. Without warmup both AlexNets blow up at 0.5 (loss
    # above 100 by step 5-6) and at 1.0 (step 3-4), but at 0.3 they survive with a dead FC head
    # (loss pinned at ln 10): 0.5 is the lowest learning rate that reliably explodes.
    lr: float = 0.5
    # Clipping in (b) and (d). Global-norm clipping does not save alexnet_bn's FC head (no BN): at
    # threshold 0.25 (healthy norms are ~1-2), at lr 0.5 and at 1.0, fc1/fc2 went dead within 40
    # steps (their gradients 0, loss pinned at ln 10, no spike for the guard to see); at lr 1.0
    # and 0.05 it learned, to 38.5% in 20 epochs. AGC bounds each unit's step relative to its
    # weights: at lr 0.5, 0.01 reached 78.5% (d) and 79.5% (b) in 15 epochs; 0.005 learned as fast
    # (62.5% vs 67% after 8 epochs), 0.015 and 0.02 sat at chance for epochs first (59.5% after 15, 33.5% after 8).
    clip: str = "agc"
    clip_threshold: float = 0.01  # AGC: max ||g|| / ||w|| per output unit (the paper's range is 0.01-0.16)
    seed: int = 0  # the same initial weights and data order in every set-up

    def variants(self) -> dict[str, dict]:
        """Set-up name -> the TrainConfig fields it changes."""
        return {
            "a": dict(arch="alexnet", clip="none", guard=False),
            "b": dict(arch="alexnet", clip=self.clip, guard=False),
            "c": dict(arch="alexnet_bn", clip="none", guard=False),
            "d": dict(arch="alexnet_bn", clip=self.clip, guard=True),
        }


LABELS = {"a": "(a) no BN, no clipping", "b": "(b) clipping only", "c": "(c) BN only",
          "d": "(d) BN + clipping + guard"}
QUICK = StudyConfig(train_per_class=6, width=0.125, epochs=1, batch_size=16, lr=0.1)  # seconds: machinery only


def run_study(config: StudyConfig, data: Path, work: Path, figures: Path, jobs: int = 1) -> dict:
    """Train the four set-ups (`jobs` at a time, one thread each); returns their results and writes
    the plots into `figures`."""
    configs = {}
    for name, changes in config.variants().items():
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        configs[name] = TrainConfig(
            data=str(data), out=str(out), width=config.width, image_size=config.image_size, resize=config.image_size,
            model_args={"dropout": 0.0}, epochs=config.epochs, batch_size=config.batch_size, optimizer="sgd",
            lr=config.lr, warmup_epochs=0.0, weight_decay=5e-4, label_smoothing=0.0,
            clip_threshold=config.clip_threshold,
            min_crop_scale=config.min_crop_scale, workers=0, seed=config.seed, device="cpu",
            # every step: a blow-up takes 3-6 steps, and the heat map should show which layer led it
            layer_norms_every=1, **changes,
        )
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=torch_threads, initargs=(1,)) as pool:
            futures = {name: pool.submit(run_variant, train_config) for name, train_config in configs.items()}
            results = {name: future.result() for name, future in futures.items()}
    else:
        threads = torch_threads(1)
        try:
            results = {name: run_variant(train_config) for name, train_config in configs.items()}
        finally:
            torch_threads(threads)
    for name in results:
        out = work / name
        if (out / "steps.png").exists():
            shutil.copy(out / "steps.png", figures / f"study_{name}_steps.png")
    plot_study({name: work / name / "steps.jsonl" for name in results}, results, figures / "study.png")
    return {"config": dataclasses.asdict(config), "variants": results}


def torch_threads(count: int) -> int:
    """Sets torch's intra-op threads; returns the count before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    return before


def run_variant(config: TrainConfig) -> dict:
    from training.monitor import plot_steps
    from training.train import train

    print(f"study {config.arch}, clip {config.clip}, guard {config.guard}: {config.out}", file=sys.stderr)
    started = time.perf_counter()
    error = None
    try:
        with np.errstate(all="ignore"):
            summary = train(config)
    except TrainingDiverged as exc:
        summary, error = {}, str(exc).split("; ")[0]
        plot_steps(Path(config.out) / "steps.jsonl", Path(config.out) / "steps.png", None)
    steps = [json.loads(line) for line in (Path(config.out) / "steps.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in steps if r["grad_norm"] is not None]
    return {
        "changes": {k: getattr(config, k) for k in ("arch", "clip", "guard")},
        "steps": len(steps),
        "test_acc": summary.get("test_acc"),
        "skipped_steps": sum(bool(r["skipped"]) for r in steps),
        "rollbacks": sum("rollback" in r for r in steps),
        "grad_norm_max": max(norms) if norms else None,
        "non_finite_steps": sum(r["loss"] is None or r["grad_norm"] is None for r in steps),
        "diverged": error is not None,
        "error": error,
        "lead_layer": lead_layer(steps) if error else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def lead_layer(steps: list[dict]) -> dict | None:
    """Where a blow-up started: the layer with the largest gradient norm at the last step measured
    before it, against the largest conv layer's (a BN-free FC head exploding alone shows as a gap)."""
    layered = [r for r in steps if r.get("layers")]
    if not layered:
        return None
    layers = layered[-1]["layers"]
    name = max(layers, key=layers.get)
    convs = [v for k, v in layers.items() if k.startswith("features.")]
    return {"step": layered[-1]["step"], "layer": name, "norm": layers[name], "conv_max": max(convs) if convs else None}


def plot_study(logs: dict[str, Path], results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for name, log in logs.items():
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        x = [r["step"] for r in steps]
        loss = [r["loss"] if r["loss"] is not None else np.nan for r in steps]
        norm = [r["grad_norm"] if r["grad_norm"] is not None else np.nan for r in steps]
        label = LABELS[name] + (" - diverged" if results[name]["diverged"] else "")
        line, = top.semilogy(x, loss, lw=0.8, label=label)
        bottom.semilogy(x, norm, lw=0.8, color=line.get_color())
        if results[name]["diverged"]:  # where the run ended: its last loss was not finite
            top.axvline(x[-1], color=line.get_color(), ls=":", lw=1)
            bottom.axvline(x[-1], color=line.get_color(), ls=":", lw=1)
    top.set_ylabel("training loss (log)")
    top.legend(fontsize=8)
    bottom.set_ylabel("global grad norm (before clipping)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_recipes(data: Path, work: Path, archs: tuple[str, ...] = ARCHS) -> dict:
    """Each architecture at its recipe (training/recipes/<arch>.yaml) on the full built-in data set."""
    from training.__main__ import load_recipe
    from training.train import train

    results = {}
    for arch in archs:
        recipe = load_recipe(RECIPES / f"{arch}.yaml")
        out = work / f"recipe-{arch}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"recipe {arch}: {recipe}", file=sys.stderr)
        train(TrainConfig(**{**recipe, "data": str(data), "out": str(out), "device": "cpu"}))
        results[arch] = recipe_result(arch, out)
    return results


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


def render(study: dict | None, recipes: dict | None, machine: str) -> str:
    """docs/stability.md from the saved results of either part."""
    lines = ["# Stability: what makes a deep CNN explode, and what stops it", "",
             "Generated by `python -m training.study` (the four set-ups) and `python -m training.study --recipes`",
             "(every architecture at its recipe); do not edit by hand. Measured on: " + machine + ".", ""]
    if study:
        c = study["config"]
        lines += [
            "## The explosion study", "",
            f"AlexNet (width {c['width']}, {c['image_size']} px, no dropout) on the built-in shapes data set "
            f"({c['train_per_class']} training images per class, 10 classes; test split 20 per class; random-resized "
            f"crops of at least {c['min_crop_scale']:.0%} of the area), "
            f"{c['epochs']} epochs of SGD with Nesterov momentum 0.9, learning rate {c['lr']} from the first step "
            f"(no warmup) with cosine decay, batch {c['batch_size']}, weight decay 5e-4, seed {c['seed']}: the same "
            f"data order and initial weights in every set-up, one thread each. Clipping in (b) and (d) is "
            f"{clipping_text(c.get('clip', 'norm'), c['clip_threshold'])}. Without the guard (a-c) nothing is skipped "
            "or rolled back and a diverging run stops (below); with it (d) a non-finite step is skipped and "
            "divergence rolls back to the last good state at half the learning rate.", "",
            "The learning rate is deliberately high. alexnet_bn trains to ~81% at 0.1 after a one-epoch warmup; "
            "without warmup both AlexNets blow up at 0.5 and above (loss over 100 within 6 steps) and at 0.3 "
            "survive with a dead FC head (loss pinned at ln 10, chance accuracy), so 0.5 is the lowest rate that "
            "reliably explodes. Clipping by global norm did not rescue alexnet_bn there: at threshold 0.25 (healthy "
            "runs' norms are 1-2) and learning rate 0.5 or 1.0, fc1 and fc2 (the head has no BN) went dead within 40 "
            "steps with no loss spike for the guard to see; at 0.05 (learning rate 1.0) it learned, slowly (38.5% in "
            "20 epochs). AGC, which bounds each unit's step relative to its own weights, did rescue it. The "
            "measurements behind these choices are in `StudyConfig` (training/study.py).", "",
            "| set-up | final test accuracy | skipped steps | rollbacks | max grad norm | diverged |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in study["variants"].items():
            accuracy = f"{r['test_acc']:.1%}" if r["test_acc"] is not None else "— (no model left)"
            norm = f"{r['grad_norm_max']:.3g}" if r["grad_norm_max"] is not None else "—"
            diverged = f"**yes**, step {r['steps']}: {r['error'].split(': ', 1)[-1]}" if r["diverged"] else "no"
            lines.append(f"| {LABELS[name]} | {accuracy} | {r['skipped_steps']} | {r['rollbacks']} | {norm} "
                         f"| {diverged} |")
        lines += [
            "", "Chance is 10%. Max grad norm is the largest finite global norm before clipping. A run without the "
            "guard stops at the first non-finite loss or at a loss above 5x max(running median, ln(10)), the "
            "divergence monitor's test: with no way back, going on would only train a dead network.", "",
            *findings(study["variants"]), "",
            "![loss and gradient norm per set-up](stability/study.png)", "",
            "Per set-up, loss, global gradient norm (with the threshold when clipping by global norm) and the "
            "gradient norm of every layer at every step (the heat map shows where an explosion starts):",
            "", *[f"- {LABELS[name]}: [steps](stability/study_{name}_steps.png)" for name in study["variants"]], "",
        ]
    if recipes:
        lines += ["## Accuracy at each recipe", "",
                  "Each architecture trained at its recipe (`training/recipes/<arch>.yaml`, CPU, small width) on "
                  "the full built-in shapes data set (`python -m training.shapes` defaults); test split accuracy "
                  "of the best checkpoint. Reproduce: `python -m training.study --only-recipes` (or "
                  "`--recipes ARCH ...` for some). Training minutes are wall time on the machine named above, one "
                  "thread per run, while other jobs shared its cores: they show the relative cost, not a speed.", "",
                  "| arch | recipe | width | image size | epochs | test top-1 | test top-5 | skipped | rollbacks "
                  "| max grad norm | training minutes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch, r in recipes.items():
            lines.append(f"| `{arch}` | [{Path(r['recipe']).name}](../{r['recipe']}) | {r['width']} | "
                         f"{r['image_size']} | {r['epochs']} | {r['test_acc']:.1%} | {r['test_top5']:.1%} | "
                         f"{r['skipped_steps']} | {r['rollbacks']} | {r['grad_norm_max']:.3g} | {r['minutes']} |")
        lines.append("")
    return "\n".join(lines)


def clipping_text(mode: str, threshold: float) -> str:
    return {"agc": f"adaptive (AGC, Brock et al. 2021): each output unit's gradient is scaled down so that "
                   f"||g|| / ||w|| <= {threshold}, the classifier layer (fc3) left out as in the paper",
            "norm": f"by global norm at {threshold}", "value": f"per element at ±{threshold}", "none": "off"}[mode]


def findings(variants: dict) -> list[str]:
    """One sentence per set-up, from its numbers."""
    lines = []
    for name, r in variants.items():
        if r["diverged"]:
            text = f"blew up at step {r['steps']} ({r['error'].split(': ', 1)[-1].replace(', with the guard off', '')})"
            lead = r.get("lead_layer")
            if lead:
                text += (f"; one step before, the largest layer gradient norm was {lead['layer'].split('.')[-1]}'s, "
                         f"{lead['norm']:.3g}" + (f" (conv layers at most {lead['conv_max']:.3g})"
                                                  if lead["conv_max"] is not None else ""))
        elif r["test_acc"] is not None and r["test_acc"] < 0.2:
            text = (f"did not blow up but learned nothing: {r['test_acc']:.0%} test accuracy after {r['steps']} steps, "
                    "the loss stuck at chance level")
        else:
            text = (f"trained to {r['test_acc']:.1%} test accuracy in {r['steps']} steps, with {r['skipped_steps']} "
                    f"skipped steps and {r['rollbacks']} rollbacks" + (" (the guard never had to act)" if
                    r["changes"]["guard"] and not r["skipped_steps"] and not r["rollbacks"] else ""))
        lines.append(f"- {LABELS[name]} {text}.")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs", help="folder for stability.md; plots and results go to OUT/stability/")
    parser.add_argument("--work", help="folder for the runs and data (default: a temporary folder, removed)")
    parser.add_argument("--recipes", nargs="*", choices=ARCHS, metavar="ARCH",
                        help=f"also train these architectures (default: all of {', '.join(ARCHS)}) at their recipes")
    parser.add_argument("--only-recipes", action="store_true", help="train the recipes, skip the four set-ups")
    parser.add_argument("--quick", action="store_true", help="a few seconds on a micro data set (checks the machinery)")
    parser.add_argument("--jobs", type=int, default=1, help="set-ups trained at once (each on one thread)")
    parser.add_argument("--render", action="store_true", help="only rewrite stability.md from the saved results")
    args = parser.parse_args(argv)

    from benchmarks.common import machine

    out, figures = Path(args.out), Path(args.out) / "stability"
    figures.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="keel-study-"))
    config = QUICK if args.quick else StudyConfig()
    try:
        if args.render:
            pass
        elif not args.only_recipes:
            data = generate_dataset(work / "data-study", ShapesConfig(size=config.image_size,
                                    train_per_class=config.train_per_class, val_per_class=20 if not args.quick else 2,
                                    test_per_class=20 if not args.quick else 2), progress=False, overwrite=True)
            study = run_study(config, data, work / "study", figures, args.jobs)
            (figures / "study.json").write_text(json.dumps(study, indent=2) + "\n")
        if not args.render and (args.recipes is not None or args.only_recipes):
            shapes = (ShapesConfig() if not args.quick
                      else ShapesConfig(train_per_class=6, val_per_class=2, test_per_class=2))
            data = generate_dataset(work / "data-full", shapes, progress=not args.quick, overwrite=True)
            recipes = run_recipes(data, work / "recipes", tuple(args.recipes or ARCHS)) if not args.quick else {}
            if recipes:  # merged into the earlier results, so architectures can be measured one at a time
                path = figures / "recipes.json"
                earlier = json.loads(path.read_text()) if path.exists() else {}
                merged = {arch: {**earlier, **recipes}[arch] for arch in ARCHS if arch in {**earlier, **recipes}}
                path.write_text(json.dumps(merged, indent=2) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    load = lambda name: json.loads((figures / name).read_text()) if (figures / name).exists() else None  # noqa: E731
    info = machine()
    (out / "stability.md").write_text(render(load("study.json"), load("recipes.json"),
                                             f"{info['cpu_model']}, {info['cpus']} CPUs, CPU fp32"))
    study = load("study.json")
    if study:
        for name, r in study["variants"].items():
            print(f"{LABELS[name]}: acc {r['test_acc']}, skipped {r['skipped_steps']}, rollbacks {r['rollbacks']}, "
                  f"max norm {r['grad_norm_max']}, diverged {r['diverged']}", file=sys.stderr)
    print(f"wrote {out / 'stability.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
