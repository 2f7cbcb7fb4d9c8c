"""The transfer study: does a pretrained start help on a new task, and how much of the network should train?

`python -m training.finetune_study` pre-trains alexnet_bn (the quick start's recipe at 64 px, without EMA) on five
classes of the built-in shapes data set, then trains on a *different* task: the other five
classes, drawn with another generator seed, with a tenth of the training images. Three ways,
everything else equal (data order, steps, optimizer, learning rate):

  scratch     fresh weights, everything trains
  frozen      --init-from the pre-trained checkpoint, --trainable-from classifier: the conv
              features are frozen (their batch norm in eval mode), the FC layers train
  fine-tune   --init-from the pre-trained checkpoint, everything trains

It writes docs/finetune.md (`render`: how to fine-tune, then the table and the plot) from
docs/finetune/finetune.json and docs/finetune/finetune.png; `--render` rewrites the page from the
saved results, `--quick` checks the machinery in seconds (into build/finetune-quick/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from training.config import TrainConfig
from training.shapes import CLASSES, SPLITS, render_sample, sample_rng

ARMS = {"scratch": "from scratch", "frozen": "frozen backbone", "finetune": "full fine-tune"}


@dataclass(frozen=True)
class TransferConfig:
    width: float = 0.25  # alexnet_bn channel multiplier (the quick start's)
    image_size: int = 64  # the shapes images' own size
    pretrain_classes: tuple[str, ...] = CLASSES[:5]  # arrow, circle, crescent, cross, hexagon
    transfer_classes: tuple[str, ...] = CLASSES[5:]  # pentagon, ring, square, star, triangle
    pretrain_per_class: int = 500  # training images per class for pre-training (val and test: `eval_per_class`)
    pretrain_epochs: int = 20  # 780 steps of 64
    pretrain_seed: int = 0  # the shapes generator's seed for the pre-training data
    transfer_per_class: int = 50  # a tenth of the pre-training data per class: where a pretrained start matters
    transfer_epochs: int = 40  # 280 steps of 32 per arm
    transfer_seed: int = 1  # another generator seed: no image of the new task was drawn before
    transfer_batch_size: int = 32
    eval_per_class: int = 50  # validation and test images per class, both tasks
    trainable_from: str = "classifier"  # the frozen arm trains from here on
    lr: float = 0.003  # AdamW, as the alexnet_bn recipe; the same in every arm
    seeds: tuple[int, ...] = (0, 1, 2)  # each arm once per seed (fresh weights, data order); pre-training: the first


QUICK = TransferConfig(pretrain_per_class=8, pretrain_epochs=1, transfer_per_class=8, transfer_epochs=2,
                       eval_per_class=2, transfer_batch_size=8, seeds=(0,))


def make_task(root: Path, classes: tuple[str, ...], train_per_class: int, eval_per_class: int, size: int,
              seed: int) -> Path:
    """An ImageFolder tree of some of the shapes classes (each image keyed by its class's index in the
    full set, as `training.shapes` draws it, so a class's images do not depend on which others are in)."""
    counts = {"train": train_per_class, "val": eval_per_class, "test": eval_per_class}
    shutil.rmtree(root, ignore_errors=True)
    for split_index, split in enumerate(SPLITS):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(counts[split]):
                render_sample(name, sample_rng(seed, split_index, CLASSES.index(name), i), size).save(
                    folder / f"{i:05d}.png")
    return root


def base_config(config: TransferConfig, data: Path, out: Path, seed: int, **changes) -> TrainConfig:
    """The alexnet_bn recipe at the study's size; `changes` set epochs, batch size and the fine-tuning fields."""
    from training.__main__ import load_recipe

    recipe = load_recipe(Path(__file__).parent / "recipes" / "alexnet_bn.yaml")
    fields = {**recipe, "width": config.width, "image_size": config.image_size, "resize": config.image_size,
              "lr": config.lr, "seed": seed, "workers": 0, "device": "cpu", "layer_norms_every": 0}
    return TrainConfig(**{**fields, "data": str(data), "out": str(out), **changes})


def run_study(config: TransferConfig, work: Path, figures: Path) -> dict:
    from training.train import train

    pretrain_data = make_task(work / "pretrain-data", config.pretrain_classes, config.pretrain_per_class,
                              config.eval_per_class, config.image_size, config.pretrain_seed)
    transfer_data = make_task(work / "transfer-data", config.transfer_classes, config.transfer_per_class,
                              config.eval_per_class, config.image_size, config.transfer_seed)
    print(f"pre-training on {', '.join(config.pretrain_classes)}", file=sys.stderr)
    pretrain_out = work / "pretrain"
    shutil.rmtree(pretrain_out, ignore_errors=True)
    pretrain = train(base_config(config, pretrain_data, pretrain_out, config.seeds[0], epochs=config.pretrain_epochs))
    checkpoint = pretrain_out / "best.pt"
    arms = {
        "scratch": {},
        "frozen": {"init_from": str(checkpoint), "trainable_from": config.trainable_from},
        "finetune": {"init_from": str(checkpoint)},
    }
    results = {"pretrain": {"test_acc": pretrain["test_acc"], "curve": curve(pretrain_out)}, "arms": {}}
    for arm, changes in arms.items():
        runs = []
        for seed in config.seeds:
            print(f"transfer to {', '.join(config.transfer_classes)}: {ARMS[arm]}, seed {seed}", file=sys.stderr)
            out = work / f"{arm}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            summary = train(base_config(config, transfer_data, out, seed, epochs=config.transfer_epochs,
                                        batch_size=config.transfer_batch_size, **changes))
            runs.append({"seed": seed, "test_acc": summary["test_acc"], "best_val_acc": summary["best_val_acc"],
                         "curve": curve(out)})
        tests = [run["test_acc"] for run in runs]
        results["arms"][arm] = {"changes": {k: Path(v).name if k == "init_from" else v for k, v in changes.items()},
                                "test_acc": sum(tests) / len(tests), "test_acc_min": min(tests),
                                "test_acc_max": max(tests), "runs": runs}
    results = {"config": dataclasses.asdict(config), **results}
    plot(results, figures / "finetune.png")
    return results


def curve(run: Path) -> list[dict]:
    """(step, epoch, validation accuracy, training loss) after every epoch of a run."""
    return [{key: record[key] for key in ("step", "epoch", "val_acc", "train_loss")}
            for record in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Validation accuracy after each epoch: steps, and the mean, min and max over the seeds' runs."""
    steps = [p["step"] for p in runs[0]["curve"]]
    by_step = list(zip(*[[p["val_acc"] for p in run["curve"]] for run in runs]))
    return steps, [sum(v) / len(v) for v in by_step], [min(v) for v in by_step], [max(v) for v in by_step]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    points = results["pretrain"]["curve"]
    config = results["config"]
    left.plot([p["step"] for p in points], [p["val_acc"] for p in points], color="tab:gray", marker=".")
    left.set_title(f"pre-training ({len(config['pretrain_classes'])} classes, "
                   f"{config['pretrain_per_class']} images each)", fontsize=10)
    for arm, result in results["arms"].items():
        steps, mean, low, high = mean_curve(result["runs"])
        line, = right.plot(steps, mean, marker=".", label=f"{ARMS[arm]} (test {result['test_acc']:.0%})")
        if len(result["runs"]) > 1:
            right.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, lw=0)
    right.set_title(f"the new task ({len(config['transfer_classes'])} other classes, "
                    f"{config['transfer_per_class']} images each)", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    for axis, classes in ((left, config["pretrain_classes"]), (right, config["transfer_classes"])):
        axis.set_xlabel("step")
        axis.set_ylabel("validation accuracy")
        axis.set_ylim(0, 1)
        axis.axhline(1 / len(classes), color="black", lw=0.5, ls=":")  # chance
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: dict | None, machine: str) -> str:
    """docs/finetune.md: how to fine-tune, and the transfer study's results."""
    lines = [
        "# Fine-tuning: pretrained weights on your own classes", "",
        "Generated by `python -m training.finetune_study` (the transfer study at the end) from "
        "`docs/finetune/finetune.json`; do not edit by hand.", "",
        "## How", "",
        "Start from torchvision's ImageNet weights (a state dict saved with `torch.save`, e.g. the files "
        "`torchvision.models.googlenet(weights=\"DEFAULT\")` downloads to `~/.cache/torch/hub/checkpoints/`) or from "
        "a Keel checkpoint of the same architecture:", "",
        "```sh",
        "python -m training --recipe training/recipes/finetune_inception_v1_bn.yaml \\",
        "    --init-from googlenet-1378be20.pth --data my-photos --out runs/photos",
        "```", "",
        "- `--init-from FILE` loads every tensor that fits, re-initialises the classifier when the classes differ "
        "(for a Keel checkpoint: other labels; for torchvision's file: another class count), drops what the model "
        "does not use (GoogLeNet's auxiliary heads in torchvision's file were never trained), and stops with an error "
        "naming any other key that is missing, unexpected or of another shape. The log lists what was loaded, "
        "re-initialised and dropped; the checkpoint records the file's name and sha256 (`init_from`), and export "
        "carries them into the ONNX metadata (`keel.init_from`).",
        "- The weights bring their preprocessing: GoogLeNet's and Inception-v3's torchvision weights take mean = std "
        "= 0.5 (torchvision's `transform_input`), Inception-v3 a 299 px crop of a 342 px resize, a Keel checkpoint "
        "its own. `--image-size`/`--resize` left out (0) take the weights' sizes; given, they win. `--mean`/`--std` "
        "left at ImageNet's defaults take the weights' normalisation; other values are an error.",
        "- `--trainable-from LAYER` freezes every layer registered before LAYER (e.g. `inception4e`, "
        "`features.conv4`, `fc` for a linear probe; an unknown name lists the layers). The heads (classifier, "
        "auxiliary heads) always train. Frozen batch-norm layers stay in eval mode through training: they "
        "normalise with their pretrained statistics and never update them.",
        "- `--head-lr-scale K` multiplies the classifier layers' learning rate by K (the new head learns faster "
        "than the pretrained body should move).",
        "- `python -m training.convert WEIGHTS --arch ARCH --labels labels.txt --out model.pt` makes a servable "
        "checkpoint from torchvision's weights as they are, no training (see the README).", "",
        "Recipes (`training/recipes/finetune_*.yaml`, full width, for photos on a GPU; flags override them; "
        "starting points from common fine-tuning practice, not tuned here, where there are no photos):", "",
        "| recipe | for | optimizer | learning rate (head) | epochs | batch | auxiliary heads |",
        "|---|---|---|---|---|---|---|",
        *recipe_rows(), "",
        "For a linear probe add `--trainable-from fc` (`classifier.fc3` for AlexNet) and raise `--lr`.", "",
    ]
    if not results:
        lines += ["## Does it help? A transfer run on the CPU", "",
                  "Not measured on this checkout yet: `python -m training.finetune_study` pre-trains on five shapes "
                  "classes and compares a frozen backbone, a full fine-tune and training from scratch on the other "
                  "five, then writes the results here.", ""]
    else:
        c = results["config"]
        steps = results["arms"]["scratch"]["runs"][0]["curve"][-1]["step"]
        seeds = ", ".join(map(str, c["seeds"]))
        lines += [
            "## Does it help? A transfer run on the CPU", "",
            f"`alexnet_bn` at width {c['width']}, {c['image_size']} px (the quick start's optimiser: AdamW, learning "
            f"rate {c['lr']}, no dropout), pre-trained for {c['pretrain_epochs']} epochs on "
            f"{len(c['pretrain_classes'])} classes of the shapes data set ({', '.join(c['pretrain_classes'])}; "
            f"{c['pretrain_per_class']} training images each, generator seed {c['pretrain_seed']}): test accuracy "
            f"{results['pretrain']['test_acc']:.1%}. Then a different task: the other "
            f"{len(c['transfer_classes'])} classes ({', '.join(c['transfer_classes'])}), drawn with generator seed "
            f"{c['transfer_seed']}, {c['transfer_per_class']} training images each, {c['eval_per_class']} for "
            f"validation and for test. Each arm trains {c['transfer_epochs']} epochs of batch "
            f"{c['transfer_batch_size']} ({steps} steps) at the same learning rate, once per seed ({seeds}: the "
            "fresh weights and the data order; the same seed gives every arm the same data order). The "
            "pre-trained arms start from the pre-training's best checkpoint with the classifier re-initialised "
            "(other labels). Test accuracy is each run's best validation checkpoint's, averaged over the seeds "
            f"(range in brackets). Chance is {1 / len(c['transfer_classes']):.0%}.", "",
            "| arm | trains | test accuracy | best validation accuracy | steps |",
            "|---|---|---|---|---|",
        ]
        trains = {"scratch": "everything, from fresh weights",
                  "frozen": f"from `{c['trainable_from']}` on (conv features frozen, BN in eval mode)",
                  "finetune": "everything, from the pre-trained weights"}
        for arm, r in results["arms"].items():
            best_val = sum(run["best_val_acc"] for run in r["runs"]) / len(r["runs"])
            spread = f" ({r['test_acc_min']:.1%}-{r['test_acc_max']:.1%})" if len(r["runs"]) > 1 else ""
            lines.append(f"| {ARMS[arm]} | {trains[arm]} | {r['test_acc']:.1%}{spread} | {best_val:.1%} | {steps} |")
        curves = {arm: mean_curve(r["runs"]) for arm, r in results["arms"].items()}
        quarter = max(0, len(curves["scratch"][0]) // 4 - 1)
        lines += [
            "", f"After {curves['scratch'][0][quarter]} steps (a quarter of the run) mean validation accuracy was "
            + ", ".join(f"{curve[1][quarter]:.0%} {ARMS[arm]}" for arm, curve in curves.items()) + ".", "",
            "![validation accuracy over steps (mean over the seeds, band: min to max)](finetune/finetune.png)", "",
            f"Measured on: {machine}. Reproduce: `python -m training.finetune_study` (the accuracies depend only "
            "on the torch build and thread count; wall time is not reported: the runs shared their cores).", "",
        ]
    return "\n".join(lines)


def recipe_rows() -> list[str]:
    """One table row per fine-tuning recipe, read from the files so the page cannot drift from them."""
    from training.__main__ import load_recipe
    from training.pretrained import LAYOUTS

    rows = []
    for path in sorted((Path(__file__).parent / "recipes").glob("finetune_*.yaml")):
        r = load_recipe(path)
        aux = r.get("model_args", {}).get("aux_logits")
        rows.append(f"| [`{path.name}`](../training/recipes/{path.name}) | torchvision's "
                    f"`{LAYOUTS[r['arch']].torchvision}` | {r['optimizer']} | {r['lr']:g} "
                    f"({r['lr'] * r.get('head_lr_scale', 1.0):g}) | {r['epochs']} | {r['batch_size']} | "
                    f"{'on' if aux else 'off' if aux is False else '—'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.finetune_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for finetune.md; results and plot go to OUT/finetune/ "
                                                    "(default: docs, or build/finetune-quick with --quick)")
    parser.add_argument("--work", help="folder for the runs and data (default: a temporary folder, removed)")
    parser.add_argument("--quick", action="store_true", help="a few seconds on a micro data set (checks the machinery)")
    parser.add_argument("--render", action="store_true", help="only rewrite finetune.md from the saved results")
    args = parser.parse_args(argv)

    from benchmarks.common import machine

    out = Path(args.out or ("build/finetune-quick" if args.quick else "docs"))
    figures = out / "finetune"
    figures.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="keel-finetune-"))
    try:
        if not args.render:
            results = run_study(QUICK if args.quick else TransferConfig(), work, figures)
            (figures / "finetune.json").write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    saved = figures / "finetune.json"
    results = json.loads(saved.read_text()) if saved.exists() else None
    info = machine()
    (out / "finetune.md").write_text(render(results, f"{info['cpu_model']}, {info['cpus']} CPUs, CPU fp32"))
    if results:
        for arm, r in results["arms"].items():
            print(f"{ARMS[arm]}: test accuracy {r['test_acc']:.3f}", file=sys.stderr)
    print(f"wrote {out / 'finetune.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
