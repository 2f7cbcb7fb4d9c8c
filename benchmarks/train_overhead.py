"""What the stability machinery costs: training throughput with and without monitoring and guards.

Times the real step (`training.train.Trainer.train_step`, the code the training loop runs) on
in-memory batches, so data loading does not dilute the difference, in four set-ups:

  bare        guard off, no step log: forward, loss, backward, clipping, optimizer step, one loss read
              (and the running-median loss check with which a guard-less run stops when it diverges)
  guard       + non-finite guard (batch-norm statistics saved each step), divergence check, snapshots
  monitoring  + steps.jsonl (one line per step) and per-layer gradient norms every 25 steps
  full        both: what `python -m training` runs

Blocks of steps of each set-up alternate (the order rotates) so that a machine that slows down or
speeds up during the run affects all four alike; each number is the median over blocks.
`python -m benchmarks.train_overhead [--quick] --out DIR` -> DIR/train_overhead.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import fmt, spread, write_results

NAME = "train_overhead"
MODES = ("bare", "guard", "monitoring", "full")
# (arch, width, image size, batch, model args): the quick-start recipe, and a deep BN network whose
# many layers make per-layer norms and batch-norm bookkeeping cost the most
MODELS = [("alexnet_bn", 0.25, 64, 64, {"dropout": 0.0}), ("inception_v1_bn", 0.25, 64, 64, {"aux_logits": False})]


def make_trainer(mode: str, arch: str, width: float, model_args: dict, log_dir: Path):
    from training.config import TrainConfig
    from training.models import build_model
    from training.monitor import StepLog
    from training.precision import Precision
    from training.train import Trainer, make_optimizer

    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, width=width, **model_args).train()
    config = TrainConfig(data="-", out=str(log_dir), arch=arch, optimizer="adamw", lr=0.001, weight_decay=0.05,
                         layer_norms_every=25, guard=mode in ("guard", "full"))
    steps_log = StepLog(log_dir / f"{mode}.jsonl", config.layer_norms_every) if mode in ("monitoring", "full") else None
    return Trainer(model, make_optimizer(model, config), config, 10, Precision.create("fp32", torch.device("cpu")),
                   steps_log, guard=config.guard)


def measure(arch: str, width: float, size: int, batch: int, model_args: dict, blocks: int, steps: int,
            warmup: int = 3) -> dict:
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, size, size, generator=generator),
                torch.randint(0, 10, (batch,), generator=generator))
               for _ in range(4)]
    with tempfile.TemporaryDirectory() as folder:
        trainers = {mode: make_trainer(mode, arch, width, model_args, Path(folder)) for mode in MODES}
        rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        for trainer in trainers.values():  # warm-up: allocator, thread pool
            for i in range(warmup):
                trainer.train_step(*batches[i % len(batches)], lr=0.001)
        for block in range(blocks):
            order = MODES[block % len(MODES):] + MODES[:block % len(MODES)]
            for mode in order:
                trainer = trainers[mode]
                started = time.perf_counter()
                for i in range(steps):
                    trainer.train_step(*batches[i % len(batches)], lr=0.001)
                rates[mode].append(steps * batch / (time.perf_counter() - started))
            print(f"  {arch} block {block + 1}/{blocks}: " + ", ".join(f"{m} {rates[m][-1]:.0f}" for m in MODES),
                  file=sys.stderr)
        for trainer in trainers.values():
            trainer.steps_log.close()
    result = {"arch": arch, "width": width, "image_size": size, "batch_size": batch, "steps_per_block": steps,
              "images_per_s": {mode: spread(rates[mode]) for mode in MODES}}
    # overhead per block (paired, so slow and fast phases of the machine cancel), in percent
    result["overhead_pct"] = {mode: spread([100 * (1 - r / b) for r, b in zip(rates[mode], rates["bare"])])
                              for mode in MODES[1:]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, required=True, help="results folder (docs/benchmarks/ for the docs)")
    args = parser.parse_args(argv)
    if args.quick:
        runs = [measure("alexnet_bn", 0.125, 64, 16, {"dropout": 0.0}, blocks=2, steps=2, warmup=1)]
    else:
        runs = [measure(arch, width, size, batch, model_args, blocks=8, steps=30)
                for arch, width, size, batch, model_args in MODELS]
    results = {"name": NAME, "quick": args.quick, "torch_threads": torch.get_num_threads(), "runs": runs}
    path = write_results(args.out, NAME, results)
    print(render(results), file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def render(results: dict) -> str:
    lines = [
        "### Training loop: cost of monitoring and guards",
        "",
        "Training throughput of the real step (`Trainer.train_step`, CPU fp32, "
        f"{results['torch_threads']} torch threads) on in-memory batches, images/s, median (min-max) over "
        "alternating blocks of steps. *bare*: forward, loss, backward, clipping, optimizer step; *guard*: + "
        "non-finite guard, divergence check and snapshots; *monitoring*: + steps.jsonl and per-layer gradient "
        "norms every 25 steps; *full*: both, as `python -m training` runs. Overhead: 1 - full / bare per block, "
        "median (min-max); the target is under 5%.",
        "",
        "| model | batch | bare | guard | monitoring | full | overhead of full |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        rates = run["images_per_s"]
        lines.append(f"| `{run['arch']}` width {run['width']}, {run['image_size']} px | {run['batch_size']} | "
                     + " | ".join(fmt(rates[mode], 0) for mode in MODES)
                     + f" | {fmt(run['overhead_pct']['full'], 1)} % |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
