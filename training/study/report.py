"""docs/stability.md and its figures, rendered from the results JSON alone.

Every number on the page is read from the JSON here, and every sentence that states a finding is
built from the same numbers, worded by what they show (a remedy that did not help reads so), so the
page can be rewritten from saved results (`--render`) and never disagrees with its tables.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from pathlib import Path

from training.study.causes import FACTORS
from training.study.design import ARCHS, FAULT_LABELS, REMEDIES
from training.study.experiment import validation_score
from training.study.recipes import render_recipes

CHANCE = 0.1  # 10 classes
# t quantiles (0.975) for 1-30 degrees of freedom: the 95% interval on a mean of a few seeds
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
TABLE = {"alexnet": "2a", "inception_v1": "2b"}


# ---- statistics ---------------------------------------------------------------------------------

def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (mean - h, mean + h); with one value the interval is the value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    degrees = len(values) - 1
    t = T975[degrees - 1] if degrees <= len(T975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def accuracy(run: dict) -> float:
    """Test accuracy of a reported run's final weights; a run that stopped has no model and scores chance."""
    return run["final_test_acc"] if run["final_test_acc"] is not None else CHANCE


def summarize(runs: list[dict]) -> dict:
    """One table row's numbers from a set-up's runs (one per seed)."""
    finished = [r for r in runs if not r["stopped"]]
    clip_rates = [r["clip_rate"] for r in runs if r["clip_rate"] is not None]
    updates = [r["update_median"] for r in runs if r["update_median"] is not None]
    maxima = [r["grad_norm_max"] for r in runs if r["grad_norm_max"] is not None]
    return {
        "n": len(runs), "diverged": sum(r["blowup_step"] is not None for r in runs),
        "diverged_steps": [r["blowup_step"] for r in runs if r["blowup_step"] is not None],
        "stopped": sum(r["stopped"] for r in runs),
        "gave_up": sum(bool(r["stopped"] and "rollbacks" in (r["error"] or "")) for r in runs),
        "at_chance": sum(accuracy(r) < 1.5 * CHANCE for r in finished),
        "acc": interval([accuracy(r) for r in runs]),
        "clip_rate": statistics.fmean(clip_rates) if clip_rates else None,
        "update": statistics.median(updates) if updates else None,
        "grad_max": statistics.median(maxima) if maxima else None,
        "skipped": sum(r["skipped_steps"] for r in runs), "rollbacks": sum(r["rollbacks"] for r in runs),
    }


# ---- formatting ---------------------------------------------------------------------------------

def pct(value: float) -> str:
    return f"{value:.1%}"


def acc_text(acc: tuple[float, float, float]) -> str:
    """Mean [interval], the interval cut to what an accuracy can be."""
    mean, low, high = acc
    return f"{mean:.1%} [{max(low, 0.0):.1%}, {min(high, 1.0):.1%}]" if high > low else f"{mean:.1%}"


def points(value: float) -> str:
    return f"{value * 100:+.1f} points"


def num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def share(k: int, n: int) -> str:
    return f"{k}/{n}"


def steps_text(steps: list[int]) -> str:
    if not steps:
        return ""
    low, high = min(steps), max(steps)
    return f" (step {low})" if low == high else f" (steps {low}-{high})"


def diverged_text(row: dict) -> str:
    return f"**{share(row['diverged'], row['n'])}**{steps_text(row['diverged_steps'])}" if row["diverged"] \
        else share(0, row["n"])


def stopped_text(row: dict) -> str:
    gave_up = f" ({row['gave_up']} by the guard giving up)" if row["gave_up"] else ""
    return f"**{share(row['stopped'], row['n'])}**{gave_up}" if row["stopped"] else share(0, row["n"])


def seeds_text(k: int, n: int) -> str:
    return "no seed" if k == 0 else "every seed" if k == n else f"{k} of {n} seeds"


# ---- the page -----------------------------------------------------------------------------------

def render(study: dict | None, recipes: dict | None) -> str:
    lines = ["# Stability: what makes a deep CNN explode, and what stops it", ""]
    if study:
        lines += header(study) + conclusions_section(study) + design_section(study) + causes_section(study) \
            + remedies_section(study) + faults_section(study) + tools_section(study) + recipe_defaults_section(study)
    else:
        lines += ["The study's results are not in this checkout: `python -m training.study --jobs 2` runs it and "
                  "rewrites this page (do not edit it by hand).", ""]
    if recipes:
        lines += render_recipes(recipes)
    return "\n".join(lines)


def header(study: dict) -> list[str]:
    timing, machine = study["timing"], study["machine"]
    runs = count_runs(study)
    lines = [f"Generated by `python -m training.study --jobs {timing['jobs']}` from "
             "[stability/study.json](stability/study.json) (the results of every run, selection runs included); "
             "`--render` rewrites this page and its figures from that file. Do not edit by hand.", ""]
    if timing.get("quick"):
        lines += ["**These results come from `--quick`, a micro data set that only exercises the machinery: "
                  "the numbers mean nothing.**", ""]
    lines += [f"The study trained {runs['training']} runs ({runs['cpu_seconds'] / 60:.0f} CPU-minutes) and "
              f"{runs['causes']} short runs of the plain CNN in **{timing['wall_seconds'] / 60:.1f} minutes** of wall "
              f"time on {machine['cpus']} CPUs "
              f"({machine['cpu_model']}), {timing['jobs']} runs at a time on one thread each; the load average "
              f"(1 min) was {timing['load_before'][0]} when it started and {timing['load_after'][0]} when it ended.",
              ""]
    return lines


def count_runs(study: dict) -> dict:
    runs = list(all_runs(study))
    return {"training": len(runs), "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
            "causes": sum(map(len, study["causes"].values()))}


def all_runs(study: dict):
    """Every training run in the results, selection runs included."""
    def walk(tree):
        if isinstance(tree, list):
            yield from tree
        elif isinstance(tree, dict):
            for value in tree.values():
                yield from walk(value)

    yield from walk(study["remedies"])
    yield from walk(study.get("recipe_rate", {}))
    yield from walk(study["faults"])
    for part in ("lr", "agc"):
        for record in study["selection"][part].values():
            yield from walk(record["runs"])
    yield from walk(study["selection"]["fault_lr"]["runs"])


def rows(study: dict, arch: str) -> dict[str, dict]:
    return summarize_setups(study["remedies"].get(arch, {}))


def summarize_setups(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Set-up name -> its table row, in REMEDIES' order."""
    return {setup: summarize(setup_runs) for setup, setup_runs in in_remedy_order(runs).items()}


def in_remedy_order(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {setup: runs[setup] for setup in REMEDIES if setup in runs}


def fault_rows(study: dict) -> dict[str, dict]:
    clean = study["faults"]["clean"]
    out = {"clean": {**summarize(clean), "paired": None}}
    for name in FAULT_LABELS:
        for guard in ("guard", "no_guard"):
            runs = study["faults"][name][guard]
            by_seed = {r["seed"]: accuracy(r) for r in clean}
            differences = [accuracy(r) - by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]
            out[f"{name}/{guard}"] = {**summarize(runs), "paired": interval(differences) if differences else None}
    return out


# ---- conclusions --------------------------------------------------------------------------------

def conclusions_section(study: dict) -> list[str]:
    lines = ["## Conclusions", "",
             "Each is read off the table row it names (tables 1-3 below); the wording follows the numbers.", ""]
    lines += [f"- {text}" for text in causes_conclusions(study) + remedy_conclusions(study) + fault_conclusions(study)]
    return [*lines, ""]


def causes_conclusions(study: dict) -> list[str]:
    table = causes_table_rows(study)
    lines = []
    for factor, name in FACTORS.items():
        group = [row for row in table if row["factor"] == factor]
        diverged = [f"{row['value']} ({share(row['diverged'], row['n'])}{steps_text(row['diverged_steps'])})"
                    for row in group if row["diverged"]]
        stuck = [str(row["value"]) for row in group if not row["diverged"] and row["end_loss"] is not None
                 and row["end_loss"] > 0.95 * math.log(10)]
        if len(stuck) == len([row for row in group if not row["diverged"]]):
            stuck = []  # nothing learned in so few steps: the loss says nothing about the factor
        ratios = ", ".join(f"{row['value']}: {num(row['first_over_last'])}" for row in group)
        text = f"**{name.capitalize()}** (table 1): " + (
            f"training diverged at {', '.join(diverged)}" if diverged else "no setting diverged")
        if stuck:
            text += f"; the loss stayed at chance level at {', '.join(stuck)}"
        lines.append(text + f". First conv's gradient at initialisation over the last conv's: {ratios}.")
    return lines


def effect(row: dict) -> str:
    """What a set-up's seeds did, in a few words (test accuracy counts a stopped run at chance)."""
    n, k, stopped = row["n"], row["diverged"], row["stopped"]
    text = f"{seeds_text(k, n)} diverged{steps_text(row['diverged_steps'])}"
    if stopped:
        text += " and stopped there" if stopped == k else f" ({stopped} stopped there)"
    if stopped < n:
        text += f", test accuracy {acc_text(row['acc'])}"
        if row["at_chance"]:
            text += f" ({row['at_chance']} of the {n - stopped} finished runs at chance level)"
    return text


def remedy_conclusions(study: dict) -> list[str]:
    tables = {arch: rows(study, arch) for arch in ARCHS if arch in study["remedies"]}
    lrs = {arch: study["selection"]["lr"][arch]["chosen"] for arch in tables}
    agc = {arch: study["selection"]["agc"][arch].get("chosen") for arch in tables}

    def per_arch(setup: str, extra=lambda arch, row: "") -> str:
        return "; ".join(f"{ARCHS[arch]}, {effect(t[setup])}{extra(arch, t[setup])} (table {TABLE[arch]}, "
                         f"'{REMEDIES[setup][0]}')" for arch, t in tables.items() if setup in t)

    def clipped(arch: str, row: dict) -> str:
        return (f"; it clipped {pct(row['clip_rate'])} of the steps, median relative update {num(row['update'])}"
                if row["clip_rate"] is not None else "")

    def guard(arch: str, row: dict) -> str:
        without = tables[arch]["bn_clip"]
        return (f", {row['rollbacks']} rollbacks and {row['skipped']} skipped steps in all (without the guard: "
                f"{effect(without)})")

    def rate(arch: str) -> str:
        record, grid = study["selection"]["lr"][arch], study["config"]["lr_grid"]
        note = ("; it diverged even at the lowest rate of the grid" if record["chosen"] == min(grid) and
                record.get("criterion_met") else "; even the highest rate of the grid left most seeds finite"
                if not record.get("criterion_met") else "")
        return f"{ARCHS[arch]} {lrs[arch]}{note}"

    rates = ", ".join(rate(arch) for arch in lrs)
    return [
        f"**No remedy**, at the learning rates chosen to make it fail ({rates}): {per_arch('none')}.",
        f"**BN alone**: {per_arch('bn')}.",
        f"**Warmup alone** ({study['config']['warmup_epochs']:g} epoch): {per_arch('warmup')}.",
        f"**Clipping by global norm alone**, at the recipes' threshold {study['config']['clip_threshold']}: "
        f"{per_arch('clip', clipped)}.",
        "**AGC alone**, clip factor " + ", ".join(f"{ARCHS[a]} {v}" for a, v in agc.items())
        + f" (chosen on validation): {per_arch('agc', clipped)}.",
        f"**BN + clipping**: {per_arch('bn_clip', clipped)}.",
        f"**BN + clipping + guard**: {per_arch('bn_clip_guard', guard)}.",
        *recipe_rate_conclusion(study),
    ]


def recipe_rate_conclusion(study: dict) -> list[str]:
    if not study.get("recipe_rate"):
        return []
    table = summarize_setups(study["recipe_rate"])
    parts = ", ".join(f"{REMEDIES[setup][0]} {acc_text(row['acc'])}"
                      + (f" ({share(row['diverged'], row['n'])} diverged)" if row["diverged"] else "")
                      for setup, row in table.items())
    return [f"**At AlexNet's recipe rate** ({study['selection']['fault_lr']['chosen']}, chosen on validation), test "
            f"accuracy: {parts} (table 2c)."]


def fault_verdict(on: dict, off: dict) -> str:
    """Whether the guard changed a fault's outcome: fewer stopped runs, or accuracy intervals apart."""
    if not on["skipped"] and not on["rollbacks"]:
        return ("The guard never acted: nothing it checks (a non-finite value, inputs beyond what the preprocessing "
                "produces, a loss far above its median) happened.")
    if on["stopped"] < off["stopped"] or (on["paired"][1] > off["paired"][2]):
        return "The guard helped."
    if on["stopped"] > off["stopped"] or (on["paired"][2] < off["paired"][1]):
        return "The guard made it worse."
    return "The guard acted, but the outcome did not differ measurably."


def fault_conclusions(study: dict) -> list[str]:
    if "clean" not in study["faults"]:
        return []
    table = fault_rows(study)
    lines = []
    for name, label in FAULT_LABELS.items():
        on, off = table[f"{name}/guard"], table[f"{name}/no_guard"]

        def outcome(row: dict) -> str:
            if row["stopped"] == row["n"]:
                return "every run stopped (no model left)"
            runs = "every run finished" if not row["stopped"] else f"{row['stopped']} of {row['n']} runs stopped"
            return (f"{runs}, accuracy {points(row['paired'][0])} against the clean run "
                    f"[{row['paired'][1] * 100:+.1f}, {row['paired'][2] * 100:+.1f}]")

        lines.append(f"**{label[0].upper() + label[1:]}** (table 3): with the guard, {outcome(on)}, after "
                     f"{on['skipped']} skipped steps and {on['rollbacks']} rollbacks in all; without it, "
                     f"{outcome(off)}. "
                     + fault_verdict(on, off))
    return lines


# ---- design -------------------------------------------------------------------------------------

def design_section(study: dict) -> list[str]:
    c, guard = study["config"], study["guard"]
    steps, inception_steps = (c[key] * study["steps_per_epoch"] for key in ("epochs", "inception_epochs"))
    return [
        "## How it was measured", "",
        f"**Data.** The built-in shapes data set (10 classes, chance 10%) at {c['image_size']} px: "
        f"{c['train_per_class']} training, {c['val_per_class']} validation and {c['test_per_class']} test images per "
        "class.", "",
        f"**Training.** Every run of parts 2 and 3 goes through Keel's own loop (`training.train`): SGD with Nesterov "
        f"momentum 0.9, batch {c['batch_size']}, {c['epochs']} epochs ({steps} steps) for AlexNet and "
        f"{c['inception_epochs']} ({inception_steps} steps) for Inception-v1, cosine decay from the peak "
        f"learning rate, weight decay {c['weight_decay']}, no dropout, no label smoothing, random-resized crops of at "
        f"least {c['min_crop_scale']:.0%} of the area; CPU, fp32, one thread per run. AlexNet at width "
        f"{c['alexnet_width']} and Inception-v1 at width {c['inception_width']}, both at {c['image_size']} px; "
        "without BN, AlexNet is torchvision's and Inception-v1 is the same network with its batch norms left out. "
        "The recipes train with AdamW; the study uses SGD because each remedy studied was proposed for it (clipping, "
        "Pascanu et al. 2013; warmup, Goyal et al. 2017; AGC, Brock et al. 2021) and because under SGD a clipping "
        "threshold bounds the step itself, where AdamW rescales every gradient anyway.", "",
        f"**Seeds and statistics.** {c['seeds']} seeds per set-up (0-{c['seeds'] - 1}); a seed fixes the initial "
        "weights, the batch order and the augmentation, so set-ups of one architecture start from the same weights "
        "and see the same batches. Accuracy is the final weights' on the test split, evaluated once per run "
        "(Keel also keeps the best checkpoint by validation accuracy, which can predate a blow-up or a fault and "
        "would hide it): mean over seeds with a 95% t-interval. A run **diverged** when its loss or "
        f"gradient became non-finite or its loss rose above {guard['rollback_loss_factor']:g}x max(running median, "
        "ln 10), the guard's own test (applied after the fact to runs without the guard, which nothing stops: like "
        "torchvision's or timm's loop they train through any finite loss). A run **stopped** when its loss became "
        "non-finite without the guard (its weights would be NaN from the next step on) or when the guard gave up "
        f"after {guard['max_rollbacks']} rollbacks; it has no model at the end and counts as chance (10%). A run "
        "that finished can still be at chance level (test accuracy below 15%), which the tables count "
        "separately.", "",
        "**Step size.** The clip rate is the share of applied steps whose gradient was clipped. The relative update "
        f"is ||w_t+1 - w_t|| / ||w_t|| over all parameters, measured on one step in {c['update_every']}: the "
        "step the optimizer really took, after clipping, momentum and weight decay; tables give the median over a "
        "run's steps, then the median over seeds.", "",
        f"**Selection.** Every hyper-parameter the study chooses is chosen on the validation split by selection runs "
        f"with their own seeds (from 100), on a copy of the data without the test split; all of them are in the "
        f"results file. Fixed, not chosen: the clipping threshold ({c['clip_threshold']}, the recipes'), the warmup "
        f"length ({c['warmup_epochs']:g} epoch, linear from zero, TrainConfig's default) and the guard's settings "
        f"(its defaults).", "",
        f"**The guard** (`--guard`, on by default): a step with a non-finite loss or gradient, or with inputs beyond "
        "what the preprocessing can produce (`training.data.input_limit`: 4x the largest normalised value), is "
        "skipped, leaving weights, optimizer state and BN statistics untouched; "
        f"{guard['rollback_skips']} skips within {guard['rollback_window']} steps, or a loss above "
        f"{guard['rollback_loss_factor']:g}x max(running median, ln 10), roll the run back to its last good state "
        f"(taken every {guard['snapshot_every']} steps and at each "
        f"epoch's end) at {guard['rollback_lr_factor']:g}x the learning rate; one more after "
        f"{guard['max_rollbacks']} rollbacks stops the run.", "",
    ]


# ---- 1. causes ----------------------------------------------------------------------------------

def causes_table_rows(study: dict) -> list[dict]:
    config = study["config"]["causes"]
    base = {"depth": config["depth"], "activation": config["activation"], "init_scale": config["init_scale"],
            "lr": config["lr"]}
    values = {"init_scale": config["init_scales"], "activation": config["activations"], "depth": config["depths"],
              "lr": config["lrs"]}
    table = []
    for factor, choices in values.items():
        for value in choices:
            setting = {**base, factor: value}
            name = ",".join(f"{k}={v}" for k, v in setting.items() if v != base[k]) or "base"
            runs = study["causes"][name]
            init = [r["layers_at"]["1"]["grad"] for r in runs]
            first = median_of([g[0] for g in init])
            last = median_of([g[-2] for g in init])
            classifier = median_of([g[-1] for g in init])
            growth = median_of([max(v for v in r["grad_norm"][:50] if v is not None) / r["grad_norm"][0]
                                for r in runs if r["grad_norm"][0]])
            ends = [statistics.fmean(r["loss"][-20:]) for r in runs if not r["stopped_step"]]
            table.append({
                "name": name, "factor": factor, "value": value, "base": name == "base", "n": len(runs),
                "label": f"{FACTORS[factor]} {value}" + (" (base)" if name == "base" else ""),
                "first": first, "last": last, "classifier": classifier,
                "first_over_last": first / last if first is not None and last else None, "growth": growth,
                "diverged": sum(r["blowup_step"] is not None for r in runs),
                "diverged_steps": [r["blowup_step"] for r in runs if r["blowup_step"]],
                "end_loss": statistics.median(ends) if ends else None,
            })
    return table


def median_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def causes_section(study: dict) -> list[str]:
    c = study["config"]["causes"]
    lines = [
        "## 1. Causes: a plain deep CNN, one factor at a time", "",
        f"A plain CNN: {c['channels']}-channel 3x3 convs with biases, no normalisation and no skip connections "
        "(stride 2 at the first and the middle conv), a linear classifier on the flattened last map (as in "
        "AlexNet and VGG; a global average pool in its place learned nothing in 800 steps of the base setting); "
        f"{c['train_images']} training images at {c['image_size']} px (centre crops, no augmentation), batch "
        f"{c['batch_size']}, SGD with Nesterov momentum 0.9, no clipping, no warmup, {c['steps']} steps, from "
        f"{study['config']['seeds']} seeds. Base setting: depth {c['depth']}, {c['activation']}, He initialisation "
        f"(N(0, 2/fan_in) for the convs, N(0, 1/fan_in) for the classifier) times {c['init_scale']:g}, learning "
        f"rate {c['lr']}; each block of rows changes one factor. Gradient norms at initialisation are those of the "
        "first batch (median over seeds); growth is the largest global gradient norm of the first 50 steps over the "
        "first one; the loss at the end is the mean of the last 20 steps (median over the seeds that did not "
        "diverge; chance level is ln 10 = 2.30). Diverged: a non-finite loss or gradient, where the run stops.", "",
        "**Table 1.**", "",
        "| factor | setting | grad norm at init: first conv | last conv | classifier | first / last | growth, "
        "first 50 steps | diverged | loss at the end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in causes_table_rows(study):
        lines.append(f"| {FACTORS[row['factor']]} | {row['value']}{' (base)' if row['base'] else ''} | "
                     f"{num(row['first'])} | {num(row['last'])} | {num(row['classifier'])} | "
                     f"{num(row['first_over_last'])} | {num(row['growth'])} | {diverged_text(row)} | "
                     f"{num(row['end_loss'])} |")
    lines += ["", "Per factor, each layer's gradient norm at initialisation and a few steps in, and the global "
              "gradient norm over the steps (medians over seeds; a line ends where its runs stopped):", ""]
    lines += [f"![{FACTORS[factor]}](stability/causes_{factor}.png)" for factor in FACTORS]
    return [*lines, ""]


# ---- 2. remedies --------------------------------------------------------------------------------

def remedies_section(study: dict) -> list[str]:
    c = study["config"]
    lines = [
        "## 2. Remedies on AlexNet and Inception-v1", "",
        "Each remedy alone and in combination, at a learning rate high enough that the bare network diverges. The "
        f"rate is chosen per architecture: the bare set-up (no BN, no warmup, no clipping, no guard) trained for "
        f"{c['probe_epochs']} epoch (its cosine decay compressed into it) from {c['seeds']} selection seeds at each "
        f"rate of the grid ({', '.join(map(str, c['lr_grid']))}), from the lowest up; the study uses the first "
        f"rate at which at least {c['probe_share']:.0%} of them diverged (one seed more than half: probes from "
        "other seeds only estimate the share of the reported runs that will diverge). AGC's clip "
        f"factor is then chosen among {', '.join(map(str, c['agc_grid']))} by the mean final validation accuracy of "
        f"{c['selection_seeds']} selection seeds at that rate.", "",
        "| architecture | bare set-up's loss at step 1 (median) | bare set-up diverged, selection seeds, by learning "
        "rate | learning rate used | AGC factor: mean final validation accuracy | factor used |",
        "|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        lr_record, agc_record = study["selection"]["lr"].get(arch), study["selection"]["agc"].get(arch, {})
        if not lr_record:
            continue
        probes = ", ".join(f"{lr}: {share(sum(r['blowup_step'] is not None for r in runs), len(runs))}"
                           for lr, runs in sorted(lr_record["runs"].items(), key=lambda kv: float(kv[0])))
        agc = ", ".join(f"{t}: {pct(statistics.fmean(map(validation_score, runs)))}"
                        for t, runs in sorted(agc_record.get("runs", {}).items(), key=lambda kv: float(kv[0])))
        note = "" if lr_record.get("criterion_met", True) else " (the criterion was not met: highest rate)"
        first = median_of([r["first_loss"] for runs in lr_record["runs"].values() for r in runs])
        lines.append(f"| {ARCHS[arch]} | {num(first)} | {probes} | {lr_record['chosen']}{note} | {agc} | "
                     f"{agc_record.get('chosen', '—')} |")
    lines += ["", f"Columns: seeds that diverged (the steps at which they did), seeds that stopped, test accuracy "
              f"(mean [95% interval] over {c['seeds']} seeds, a stopped run at 10%), finished runs at chance level, "
              "clip rate (mean over seeds), median relative update, largest finite gradient norm (before clipping, "
              "median over seeds), skipped steps and rollbacks (totals over the seeds).", ""]
    for arch in ARCHS:
        table = rows(study, arch)
        if not table:
            continue
        lines += [f"**Table {TABLE[arch]}. {ARCHS[arch]}**, learning rate {study['selection']['lr'][arch]['chosen']}",
                  "", *remedy_table(table),
                  "", f"![{ARCHS[arch]}: every seed's loss per set-up, and test accuracy per seed]"
                  f"(stability/remedies_{arch}.png)", ""]
    if study.get("recipe_rate"):
        lr = study["selection"]["fault_lr"]["chosen"]
        lines += [f"**Table 2c. AlexNet at the recipe's rate**, learning rate {lr}: the rate at which the recipe's "
                  "set-up (BN, clipping, warmup, guard) reached its best validation accuracy (selection in part 3), "
                  "for the bare network and each single remedy. Where little diverges, this is what each remedy "
                  "does for learning rather than for stability.", "",
                  *remedy_table(summarize_setups(study["recipe_rate"])), "",
                  "![AlexNet at the recipe's rate: every seed's loss per set-up, and test accuracy per seed]"
                  "(stability/remedies_alexnet_recipe_rate.png)", ""]
    lines += lead_layer_lines(study)
    return lines


def remedy_table(table: dict[str, dict]) -> list[str]:
    lines = ["| set-up | diverged | stopped | test accuracy | at chance | clip rate | relative update "
             "| max grad norm | skipped | rollbacks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setup, row in table.items():
        clips = REMEDIES[setup][1].get("clip") and row["clip_rate"] is not None
        finished = row["n"] - row["stopped"]
        lines.append(f"| {REMEDIES[setup][0]} | {diverged_text(row)} | {stopped_text(row)} | "
                     f"{acc_text(row['acc'])} | "
                     f"{share(row['at_chance'], finished) if finished else '—'} | "
                     f"{pct(row['clip_rate']) if clips else '—'} | {num(row['update'])} | {num(row['grad_max'])} | "
                     f"{row['skipped']} | {row['rollbacks']} |")
    return lines


def lead_layer_lines(study: dict) -> list[str]:
    lines = ["**Which layer led the blow-up.** In every run that diverged, skipped a step or rolled back: at the "
             "last step before the first of these, the layer whose gradient norm was largest relative to its weight "
             "norm (the step it was asked to take, relative to its size), how many of those runs it led, its median "
             "ratio, the runner-up, and the layer a raw gradient norm would have named instead.", "",
             "| architecture | set-up | runs | led by | median ‖g‖/‖w‖ | runner-up | largest raw norm |",
             "|---|---|---|---|---|---|---|"]
    found = False
    for arch in ARCHS:
        for setup, runs in study["remedies"].get(arch, {}).items():
            leads = [r["lead_layer"] for r in runs if r["lead_layer"]]
            if not leads:
                continue
            found = True
            layer, count = Counter(lead["layer"] for lead in leads).most_common(1)[0]
            ratio = statistics.median(lead["ratio"] for lead in leads if lead["layer"] == layer)
            runner_up = Counter(lead["runner_up"] for lead in leads if lead["layer"] == layer).most_common(1)[0][0]
            raw = Counter(lead["largest_raw_norm"] for lead in leads).most_common(1)[0][0]
            lines.append(f"| {ARCHS[arch]} | {REMEDIES[setup][0]} | {len(leads)} | `{layer}` ({count}) | "
                         f"{num(ratio)} | `{runner_up}` | `{raw}` |")
    return [*lines, ""] if found else []


# ---- 3. faults ----------------------------------------------------------------------------------

def faults_section(study: dict) -> list[str]:
    if "clean" not in study["faults"]:
        return []
    c, selection = study["config"], study["selection"]["fault_lr"]
    injected = {name: faults[0] for name, faults in study["faults_injected"].items()}
    at = injected["corrupt_batch"]["step"]
    total = c["epochs"] * study["steps_per_epoch"]
    scores = ", ".join(f"{lr}: {pct(statistics.fmean(map(validation_score, runs)))}"
                       for lr, runs in sorted(selection["runs"].items(), key=lambda kv: float(kv[0])))
    described = {
        "corrupt_batch": f"every pixel value of the batch at step {at} is multiplied by "
                         f"{injected['corrupt_batch']['scale']:g} (a batch that skipped normalisation, or worse)",
        "lr_spike": f"the learning rate is multiplied by {injected['lr_spike']['scale']:g} for "
                    f"{injected['lr_spike']['steps']} steps from step {at} (a mis-set schedule)",
        "lr_blunder": f"the learning rate is multiplied by {injected['lr_blunder']['scale']:g} for "
                      f"{injected['lr_blunder']['steps']} steps from step {at} (a rate given in the wrong units)",
        "mislabel": f"{injected['mislabel']['steps']} batches from step {at} have every label shifted to the next "
                    "class (a shard with an off-by-one label map)",
    }
    table = fault_rows(study)
    clean = table["clean"]
    lines = [
        "## 3. The guard at work", "",
        f"Faults injected into the recipe's set-up (AlexNet with BN, clipping by global norm at {c['clip_threshold']}, "
        f"a {c['warmup_epochs']:g}-epoch warmup) at step {at} of its {total}, late, where a fault costs the most (the "
        f"run has the least time to recover before its final weights), each on the same {c['seeds']} "
        f"seeds with the guard on and off. The learning rate, {selection['chosen']}, was chosen on validation "
        f"(mean final validation accuracy of {c['selection_seeds']} selection seeds: {scores}). The clean run is the "
        f"same set-up with the guard on and no fault; the guard acted {clean['skipped'] + clean['rollbacks']} times "
        "in it over all seeds. The faults, injected by the study's step hook (training/study/faults.py) into the "
        "real loop:", "",
        *[f"- {FAULT_LABELS[name]}: {text}" for name, text in described.items()], "",
        "The difference to the clean run is paired by seed (same weights and batches up to the fault): mean [95% "
        "interval].", "",
        "**Table 3.**", "",
        "| fault | guard | diverged | stopped | test accuracy | difference to the clean run | skipped | rollbacks |",
        "|---|---|---|---|---|---|---|---|",
        f"| none (clean) | on | {diverged_text(clean)} | {stopped_text(clean)} | {acc_text(clean['acc'])} | — | "
        f"{clean['skipped']} | {clean['rollbacks']} |",
    ]
    for name, label in FAULT_LABELS.items():
        for guard in ("guard", "no_guard"):
            row = table[f"{name}/{guard}"]
            paired = row["paired"]
            difference = f"{points(paired[0])} [{paired[1] * 100:+.1f}, {paired[2] * 100:+.1f}]" if paired else "—"
            lines.append(f"| {label} | {'on' if guard == 'guard' else 'off'} | {diverged_text(row)} | "
                         f"{stopped_text(row)} | {acc_text(row['acc'])} | {difference} | {row['skipped']} | "
                         f"{row['rollbacks']} |")
    lines += ["", "![training loss and validation accuracy around each fault, guard on and off]"
              "(stability/faults.png)", ""]
    return lines


# ---- 4. the tools themselves, and the recipes ---------------------------------------------------

def tools_section(study: dict) -> list[str]:
    return [
        "## 4. The tools measured", "",
        "- **AGC** follows Brock et al. 2021 (and timm's `adaptive_clip_grad`): each output unit's gradient (a row "
        "of a weight matrix, one output channel of a conv kernel) is scaled so that ‖g‖ / max(‖w‖, 1e-3) stays "
        "below the clip factor; a bias or batch-norm vector is one unit, clipped by the vector's norm, not element "
        "by element; the classifier layer is left out, as in the paper (`training/clipping.py`, checked in "
        "`tests/test_clipping.py`).",
        "- **The layer that led a blow-up** is the one with the largest gradient norm relative to its weight norm "
        "(table above): every step's per-layer gradient and weight norms are in the run's `steps.jsonl`, and "
        "`steps.png` maps their ratio.",
        "- **Where BN is.** `alexnet_bn` has batch norm after each of its five convs and none in its three-layer "
        "FC classifier; `inception_v1_bn` after every conv (and none with `batch_norm: false`, the study's no-BN "
        "Inception).", "",
    ]


def recipe_defaults_section(study: dict) -> list[str]:
    """What the recipes' stability defaults rest on, read off the study's rows."""
    tables = {arch: rows(study, arch) for arch in ARCHS if arch in study["remedies"]}
    if not tables:
        return []
    c = study["config"]

    def compare(setup: str, reference: str) -> str:
        parts = []
        for arch, t in tables.items():
            row, ref = t[setup], t[reference]
            fewer = row["diverged"] < ref["diverged"]
            better = row["acc"][1] > ref["acc"][2]
            word = "supports it" if fewer or better else "does not support it"
            parts.append(f"{ARCHS[arch]}: {share(row['diverged'], row['n'])} diverged with it against "
                         f"{share(ref['diverged'], ref['n'])} without, {acc_text(row['acc'])} against "
                         f"{acc_text(ref['acc'])} (table {TABLE[arch]}, '{REMEDIES[setup][0]}' and "
                         f"'{REMEDIES[reference][0]}'): {word}")
        return "; ".join(parts)

    lines = ["## What the recipes take from this", "",
             f"The recipes (training/recipes/*.yaml) keep BN, clip by global norm at {c['clip_threshold']}, warm up "
             "(TrainConfig's default, longer for plain AlexNet) and keep the guard on. They train with AdamW and the "
             "study with SGD, so what carries over is which remedy stops which failure, not the learning rates. A "
             "default is supported where adding it left fewer seeds diverged or an accuracy interval wholly above "
             "the one without it.", "",
             f"- **BN** (the default architectures have it): {compare('bn', 'none')}.",
             f"- **Clipping by global norm at {c['clip_threshold']}**: alone, {compare('clip', 'none')}; on top of "
             f"BN, {compare('bn_clip', 'bn')}.",
             f"- **Warmup**: {compare('warmup', 'none')}.",
             f"- **The guard, on by default**: {compare('bn_clip_guard', 'bn_clip')}" + guard_faults_text(study) + "."]
    return [*lines, ""]


def guard_faults_text(study: dict) -> str:
    if "clean" not in study["faults"]:
        return ""
    table = fault_rows(study)
    verdicts = {label: fault_verdict(table[f"{name}/guard"], table[f"{name}/no_guard"])
                for name, label in FAULT_LABELS.items()}
    helped = [label for label, verdict in verdicts.items() if verdict == "The guard helped."]
    return (f"; of the injected faults (table 3) it helped against {', '.join(helped)}" if helped
            else "; it helped against none of the injected faults (table 3)")


# ---- figures ------------------------------------------------------------------------------------

def write_figures(study: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    for factor in FACTORS:
        causes_figure(study, factor, folder / f"causes_{factor}.png")
    for arch in ARCHS:
        if arch in study["remedies"]:
            remedies_figure(in_remedy_order(study["remedies"][arch]),
                            f"{ARCHS[arch]} at learning rate {study['selection']['lr'][arch]['chosen']}",
                            folder / f"remedies_{arch}.png")
    if study.get("recipe_rate"):
        remedies_figure(in_remedy_order(study["recipe_rate"]),
                        f"AlexNet at the recipe's rate, {study['selection']['fault_lr']['chosen']}",
                        folder / "remedies_alexnet_recipe_rate.png")
    if "clean" in study["faults"]:
        faults_figure(study, folder / "faults.png")


def causes_figure(study: dict, factor: str, path: Path) -> None:
    """Per setting: each layer's gradient norm at initialisation and a few steps in, and the global
    gradient norm over the steps (medians over seeds)."""
    import warnings

    import matplotlib.pyplot as plt
    import numpy as np

    later = str(study["config"]["causes"]["record_layers_at"][-1])
    fig, (first, second, over) = plt.subplots(1, 3, figsize=(14, 3.6))
    for row in [row for row in causes_table_rows(study) if row["factor"] == factor]:
        runs = study["causes"][row["name"]]
        label = f"{row['value']}" + (" (base)" if row["base"] else "") + (
            f", {row['diverged']}/{row['n']} diverged" if row["diverged"] else "")
        color = None
        with warnings.catch_warnings():  # a layer or step no run reached has an all-NaN median
            warnings.simplefilter("ignore", RuntimeWarning)
            for ax, step in ((first, "1"), (second, later)):
                grads = np.array([[v if v is not None else np.nan for v in r["layers_at"][step]["grad"]]
                                  for r in runs if step in r["layers_at"]])
                if len(grads):
                    line, = ax.semilogy(range(1, grads.shape[1] + 1), np.nanmedian(grads, axis=0), marker="o", ms=3,
                                        color=color, label=label)
                    color = line.get_color()
            length = max(len(r["grad_norm"]) for r in runs)
            curves = np.full((len(runs), length), np.nan)
            for i, r in enumerate(runs):
                curves[i, :len(r["grad_norm"])] = [v if v is not None else np.nan for v in r["grad_norm"]]
            median = np.nanmedian(curves, axis=0)
        over.semilogy(range(1, length + 1), median, lw=1, color=color)
        for r in runs:
            if r["blowup_step"]:
                over.plot(r["blowup_step"], np.nanmax(median[: r["blowup_step"]]), "x", color=color)
    for ax, title in ((first, "at initialisation (step 1)"), (second, f"at step {later}")):
        ax.set_xlabel("layer (1 = first conv; last = classifier)")
        ax.set_title(f"gradient norm per layer, {title}", fontsize=9)
    first.legend(fontsize=8, title=FACTORS[factor], title_fontsize=8)
    over.set_xlabel("step")
    over.set_title("global gradient norm (x: a run diverged)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def remedies_figure(setups: dict[str, list[dict]], title: str, path: Path) -> None:
    """One panel per set-up (every seed's training loss), and the test accuracy per seed (last panel)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6), sharex=True, sharey=True)
    panels = list(axes.flat)
    for ax in panels[len(setups):-1]:
        ax.set_visible(False)
    for ax, (setup, runs) in zip(panels, setups.items()):
        for r in runs:
            steps = r["curve"]["step"]
            loss = [v if v is not None else float("nan") for v in r["curve"]["loss"]]
            line, = ax.semilogy(steps, loss, lw=0.7)
            if r["stopped"]:
                ax.plot(r["steps"], max((v for v in loss if v == v), default=1.0), "x", color=line.get_color())
            for step in r["rollback_steps"]:
                ax.axvline(step, color=line.get_color(), lw=0.6, ls=":")
        ax.set_title(REMEDIES[setup][0], fontsize=9)
    accuracy_ax = fig.add_subplot(2, 4, 8)
    panels[-1].remove()
    for i, runs in enumerate(setups.values()):
        values = [accuracy(r) for r in runs]
        accuracy_ax.plot([i] * len(values), values, "o", ms=4, alpha=0.6,
                         color="tab:red" if any(r["blowup_step"] for r in runs) else "tab:blue")
    accuracy_ax.set_xticks(range(len(setups)), [REMEDIES[s][0] for s in setups], rotation=60, fontsize=7,
                           ha="right")
    accuracy_ax.set_ylim(0, 1)
    accuracy_ax.axhline(CHANCE, color="gray", lw=0.6, ls="--")
    accuracy_ax.set_title("test accuracy per seed (red: a set-up with diverged seeds)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss (log)")
    for ax in axes[1, :3]:
        ax.set_xlabel("step")
    fig.suptitle(f"{title}: each line a seed, x where it stopped (non-finite), dotted where the guard rolled back",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def faults_figure(study: dict, path: Path) -> None:
    """Per fault: the training loss by step (top) and the validation accuracy by epoch (bottom). A
    corrupt batch under BN barely moves the training loss; the damage is in BN's running statistics,
    which only evaluation uses, so the bottom row is where it shows."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(FAULT_LABELS), figsize=(13, 6), sharey="row")
    clean = study["faults"]["clean"]
    per_epoch = study["steps_per_epoch"]
    for column, (name, label) in enumerate(FAULT_LABELS.items()):
        top, bottom = axes[0][column], axes[1][column]
        fault = study["faults_injected"][name][0]
        top.axvspan(fault["step"], fault["step"] + fault["steps"], color="gold", alpha=0.4, lw=0)
        bottom.axvline(fault["step"] / per_epoch, color="gold", lw=3, alpha=0.6)
        # guard off dashed over guard on: where the guard did nothing the two coincide and both show
        for runs, color, style, text in ((clean, "gray", "-", "clean"),
                                         (study["faults"][name]["guard"], "tab:blue", "-", "guard on"),
                                         (study["faults"][name]["no_guard"], "tab:red", "--", "guard off")):
            for i, r in enumerate(runs):
                loss = [v if v is not None else float("nan") for v in r["curve"]["loss"]]
                top.semilogy(r["curve"]["step"], loss, lw=0.8, ls=style, color=color, alpha=0.8,
                             label=text if i == 0 else None)
                if r["stopped"]:
                    top.plot(r["steps"], max((v for v in loss if v == v), default=1.0), "x", color=color)
                bottom.plot(range(1, len(r["val_acc"]) + 1), r["val_acc"], lw=0.8, ls=style, color=color, alpha=0.8,
                            marker=".", ms=3)
        top.set_title(label, fontsize=9)
        top.set_xlabel("step")
        bottom.set_xlabel("epoch")
    axes[0][0].set_ylabel("training loss (log)")
    axes[1][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The guard at work: every seed, the fault shaded, x where a run stopped", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
