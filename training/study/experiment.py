"""The study's runs, in the order their dependencies allow, and the results JSON they fill.

  causes          the plain CNN, each factor varied alone (independent of the rest)
  lr selection    per architecture, the bare set-up at rising learning rates until it diverges
  agc selection   per architecture, AGC's clip factor by validation accuracy at the chosen rate
  remedies        per architecture, every set-up at the chosen rate, `seeds` seeds each
  fault selection the recipe's set-up at a few learning rates, by validation accuracy
  faults          that set-up clean and with each fault, guard on and off, `seeds` seeds each
  recipe rate     AlexNet's bare set-up and single remedies again, at the rate the fault selection chose

Selection runs train on a copy of the data without its test split and use their own seeds, so the
test split is evaluated once per reported run and chose nothing.
"""

from __future__ import annotations

import dataclasses
import statistics
from functools import partial
from pathlib import Path

from training.config import TrainConfig
from training.shapes import ShapesConfig, generate_dataset
from training.study.causes import make_data, run_cause
from training.study.design import ARCHS, REMEDIES, StudyConfig, train_config
from training.study.runner import RunSpec, Scheduler, run_training

SELECTION_SEED = 100  # selection runs use seeds 100, 101, ...; reported runs 0, 1, ...
PROBE, SELECT, REPORT, CAUSES = 0, 1, 2, 3  # priorities: the selection path first, the causes fill gaps


def make_data_sets(config: StudyConfig, work: Path) -> tuple[Path, Path]:
    """The shapes data set, and a view of it without the test split for selection runs."""
    data = generate_dataset(work / "data", ShapesConfig(size=config.image_size, train_per_class=config.train_per_class,
                                                        val_per_class=config.val_per_class,
                                                        test_per_class=config.test_per_class),
                            progress=False, overwrite=True)
    selection = work / "data-selection"
    selection.mkdir(exist_ok=True)
    for split in ("train", "val"):
        if not (selection / split).exists():
            (selection / split).symlink_to(data / split, target_is_directory=True)
    return data, selection


def run_study(config: StudyConfig, work: Path, jobs: int, keep: bool = False) -> dict:
    data, selection_data = make_data_sets(config, work)
    results: dict = {"causes": {}, "selection": {"lr": {}, "agc": {}, "fault_lr": {}}, "remedies": {}, "faults": {},
                     "recipe_rate": {}}
    scheduler = Scheduler(jobs)
    runs = work / "runs"

    def training(priority: int, label: str, out: Path, callback, faults=(), **kwargs) -> None:
        spec = RunSpec(train_config(config, out=out, **kwargs), faults, config.update_every, keep)
        scheduler.submit(priority, label, run_training, spec,
                         lambda result: callback({"seed": kwargs["seed"], "lr": kwargs["lr"], **result}))

    # The causes: every setting from every seed.
    causes_data = str(make_data(data, work / "causes.pt", config.causes))
    for name, setting in config.causes.settings().items():
        for seed in range(config.seeds):
            scheduler.submit(CAUSES, f"causes {name} seed {seed}", partial(run_cause, causes_data, config.causes, name,
                             setting), seed, results["causes"].setdefault(name, []).append)

    # Remedies, per architecture: learning rate first, then AGC's factor, then the reported runs.
    selection_seeds = [SELECTION_SEED + i for i in range(config.selection_seeds)]
    probe_seeds = [SELECTION_SEED + i for i in range(config.seeds)]

    def remedies(arch: str, setups: list[str], lr: float, agc: float | None = None, into: dict | None = None,
                 folder: Path | None = None) -> None:
        """Every set-up in `setups` from every reported seed; results into `into` (default: the remedies
        of `arch`), run directories under `folder`."""
        into = results["remedies"].setdefault(arch, {}) if into is None else into
        folder = folder or runs / "remedies" / arch
        for setup in setups:
            for seed in range(config.seeds):
                training(REPORT, f"{arch} {setup} seed {seed} at lr {lr}", folder / setup / f"s{seed}",
                         into.setdefault(setup, []).append, arch=arch, data=data, lr=lr, seed=seed,
                         clip_threshold=agc, **REMEDIES[setup][1])

    def select_agc(arch: str, lr: float) -> None:
        record = results["selection"]["agc"][arch] = {"lr": lr, "runs": {}}

        def collect(threshold: float, result: dict) -> None:
            record["runs"].setdefault(str(threshold), []).append(result)
            if sum(map(len, record["runs"].values())) == len(config.agc_grid) * len(selection_seeds):
                record["chosen"] = best_by_validation(record["runs"])
                remedies(arch, ["agc"], lr, record["chosen"])

        for threshold in config.agc_grid:
            for seed in selection_seeds:
                training(SELECT, f"{arch} agc {threshold} (selection) seed {seed}",
                         runs / "select-agc" / arch / f"{threshold}-s{seed}", partial(collect, threshold), arch=arch,
                         data=selection_data, lr=lr, seed=seed, clip="agc", clip_threshold=threshold)

    def probe(arch: str, rates: list[float]) -> None:
        """The bare set-up at rates[0] from every probe seed; then the next higher rate until it diverges."""
        record = results["selection"]["lr"].setdefault(arch, {"runs": {}})
        lr, found = rates[0], []

        def collect(result: dict) -> None:
            found.append(result)
            if len(found) < len(probe_seeds):
                return
            record["runs"][str(lr)] = sorted(found, key=lambda r: r["seed"])
            qualifies = sum(r["blowup_step"] is not None for r in found) >= config.probe_share * len(found)
            if not qualifies and len(rates) > 1:
                probe(arch, rates[1:])
                return
            # the first rate that qualifies; if none did, the highest, and the page says so
            record["chosen"], record["criterion_met"] = lr, qualifies
            setups = [name for name in REMEDIES if name != "agc"]
            remedies(arch, setups, record["chosen"])
            select_agc(arch, record["chosen"])

        for seed in probe_seeds:
            training(PROBE, f"{arch} none lr {lr} (selection) seed {seed}", runs / "select-lr" / arch / f"{lr}-s{seed}",
                     collect, arch=arch, data=selection_data, lr=lr, seed=seed, epochs=config.probe_epochs)

    for arch in ARCHS:
        probe(arch, sorted(config.lr_grid))

    # The guard at work: the recipe's set-up at a learning rate chosen on validation, then the faults.
    recipe = {"arch": "alexnet", "bn": True, "warmup": True, "clip": "norm"}
    fault_selection = results["selection"]["fault_lr"] = {"runs": {}}

    def faults(lr: float) -> None:
        remedies("alexnet", list(config.recipe_rate_setups), lr, into=results["recipe_rate"],
                 folder=runs / "recipe-rate")
        clean = results["faults"]["clean"] = []
        for seed in range(config.seeds):
            training(REPORT, f"faults clean seed {seed}", runs / "faults" / "clean" / f"s{seed}", clean.append,
                     data=data, lr=lr, seed=seed, guard=True, **recipe)
        for name, injected in config.faults().items():
            for guard in (True, False):
                into = results["faults"].setdefault(name, {}).setdefault("guard" if guard else "no_guard", [])
                for seed in range(config.seeds):
                    training(REPORT, f"faults {name} guard {'on' if guard else 'off'} seed {seed}",
                             runs / "faults" / name / f"{'guard' if guard else 'no-guard'}-s{seed}", into.append,
                             faults=injected, data=data, lr=lr, seed=seed, guard=guard, **recipe)

    def collect_fault_lr(lr: float, result: dict) -> None:
        fault_selection["runs"].setdefault(str(lr), []).append(result)
        if sum(map(len, fault_selection["runs"].values())) == len(config.fault_lr_grid) * len(selection_seeds):
            fault_selection["chosen"] = best_by_validation(fault_selection["runs"])
            faults(fault_selection["chosen"])

    for lr in config.fault_lr_grid:
        for seed in selection_seeds:
            training(SELECT, f"faults lr {lr} (selection) seed {seed}", runs / "select-faults" / f"{lr}-s{seed}",
                     partial(collect_fault_lr, lr), data=selection_data, lr=lr, seed=seed, guard=True, **recipe)

    scheduler.run()
    guard = {name: getattr(TrainConfig, name) for name in ("rollback_skips", "rollback_window", "rollback_loss_factor",
                                                          "rollback_lr_factor", "max_rollbacks", "snapshot_every")}
    return {"config": dataclasses.asdict(config), "faults_injected": {name: [dataclasses.asdict(f) for f in injected]
                                                                     for name, injected in config.faults().items()},
            "steps_per_epoch": config.steps_per_epoch(), "guard": guard, **sort_by_seed(results)}


def best_by_validation(runs: dict[str, list[dict]]) -> float:
    """The grid value whose runs ended with the highest mean validation accuracy (a stopped run counts
    as chance, 10%); ties go to the smaller value."""
    def score(key: str) -> float:
        return statistics.mean(validation_score(r) for r in runs[key])

    return float(max(sorted(runs, key=float), key=score))


def sort_by_seed(tree):
    """Runs finish in any order; the JSON lists them by seed."""
    if isinstance(tree, dict):
        return {key: sort_by_seed(value) for key, value in tree.items()}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict) and "seed" in tree[0]:
        return sorted(tree, key=lambda r: r["seed"])
    return tree


def validation_score(run: dict) -> float:
    """A selection run's final validation accuracy; a run that stopped has no model and scores chance."""
    return run["final_val_acc"] if run["final_val_acc"] is not None else 0.1
