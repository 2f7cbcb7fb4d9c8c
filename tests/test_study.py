"""The stability study (training/study): fault injection, its statistics and judgements, and the whole
machinery end to end with --quick, including a fault the guard must catch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from training.study.faults import Fault, StepProbe
from training.study.report import interval
from training.study.runner import lead_layer


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(4, 3, 2, 2), torch.tensor([0, 1, 2, 9])


def test_each_fault_changes_its_steps_and_nothing_else():
    model = nn.Linear(2, 2)
    probe = StepProbe((Fault("nan_image", 3), Fault("scale_lr", 5, steps=2, scale=10.0),
                       Fault("shift_labels", 8), Fault("scale_inputs", 9, scale=1e4)), update_every=0)
    images, targets = batch()
    seen = {step: probe(step, model, images, targets, 0.1) for step in range(1, 11)}
    for step in (1, 2, 4, 7, 10):
        assert torch.equal(seen[step][0], images) and torch.equal(seen[step][1], targets) and seen[step][2] == 0.1
    assert seen[3][0][0].isnan().all() and not seen[3][0][1:].isnan().any()  # one image, not the batch
    assert not images.isnan().any()  # the loader's tensor is left as it was
    assert seen[5][2] == seen[6][2] == pytest.approx(1.0)
    assert seen[8][1].tolist() == [1, 2, 3, 0]  # every label moved to the next class (mod 10)
    assert torch.equal(seen[9][0], images * 1e4)
    assert probe.faulty_steps == [3, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="fault kind must be one of"):
        Fault("cosmic_ray", 1)


def test_the_probe_measures_each_update_relative_to_the_weights():
    model = nn.Linear(3, 2)
    probe = StepProbe(update_every=2)
    images, targets = batch()
    for step in range(1, 5):
        probe(step, model, images, targets, 0.1)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        if step == 2:
            expected = ((after - before).norm() / before.norm()).item()
    assert sorted(probe.updates) == [2]  # step 4's update is measured when step 5 begins
    assert probe.updates[2] == pytest.approx(expected)


def test_interval_is_the_t_interval_on_the_mean():
    mean, low, high = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and high - mean == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert interval([0.7]) == (0.7, 0.7, 0.7)


def test_the_lead_layer_is_judged_relative_to_its_weights():
    """fc1 has the largest raw gradient only because its weights are large; conv1's step is 100x its size."""
    steps = [{"step": 1, "layers": {"conv1": 1.0, "fc1": 5.0}, "layer_weights": {"conv1": 0.01, "fc1": 500.0}},
             {"step": 2, "layers": {"conv1": 9e9, "fc1": 9e9}, "layer_weights": {"conv1": 1.0, "fc1": 1.0}}]
    lead = lead_layer(steps, trouble=2)
    assert lead["step"] == 1 and lead["layer"] == "conv1" and lead["ratio"] == 100.0
    assert lead["runner_up"] == "fc1" and lead["largest_raw_norm"] == "fc1"


@pytest.mark.slow
def test_the_quick_study_runs_everything_and_the_guard_catches_its_fault(tmp_path):
    from training.study.__main__ import main
    from training.study.design import ARCHS, FAULT_LABELS, QUICK, REMEDIES

    out, work = tmp_path / "docs", tmp_path / "work"
    assert main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    study = json.loads((out / "stability" / "study.json").read_text())
    seeds = list(range(QUICK.seeds))
    for arch in ARCHS:
        assert study["selection"]["lr"][arch]["chosen"] in QUICK.lr_grid
        assert study["selection"]["agc"][arch]["chosen"] in QUICK.agc_grid
        assert list(study["remedies"][arch]) and set(study["remedies"][arch]) == set(REMEDIES)
        assert all([r["seed"] for r in runs] == seeds for runs in study["remedies"][arch].values())
    assert len(study["causes"]) == len(QUICK.causes.settings())
    # AlexNet's bare set-up and single remedies again, at the rate the recipe set-up was chosen at
    assert set(study["recipe_rate"]) == set(QUICK.recipe_rate_setups)
    assert all([r["seed"] for r in runs] == seeds and all(r["lr"] == study["selection"]["fault_lr"]["chosen"]
               for r in runs) for runs in study["recipe_rate"].values())
    # the fault the guard must catch: a corrupt batch (pixel values x1e4) half-way, on the same seeds with the
    # guard on and off: skipped with it (its inputs are beyond what the preprocessing produces), trained on without
    at = study["faults_injected"]["corrupt_batch"][0]["step"]
    guarded, unguarded = study["faults"]["corrupt_batch"]["guard"], study["faults"]["corrupt_batch"]["no_guard"]
    assert all(r["faulty_steps"] == [at] for r in guarded + unguarded)
    assert all(not r["stopped"] and r["skipped_steps"] == 1 and r["test_acc"] is not None for r in guarded)
    assert all(r["skipped_steps"] == 0 for r in unguarded)
    # selection runs never saw the test split; reported runs were evaluated on it once
    assert all(r["test_acc"] is None and r["final_test_acc"] is None and r["final_val_acc"] is not None
               for runs in study["selection"]["fault_lr"]["runs"].values() for r in runs)
    assert all(r["test_acc"] is not None and r["final_test_acc"] is not None for r in study["faults"]["clean"])
    # the run directories (kept with --work) have no per-run plots: the study draws its own from the JSON
    assert (work / "runs" / "faults" / "clean" / "s0" / "steps.jsonl").is_file()
    assert not list(work.rglob("steps.png"))

    page = (out / "stability.md").read_text()
    for heading in ("## Conclusions", "## 1. Causes", "## 2. Remedies", "## 3. The guard at work",
                    "## 4. The tools measured", "## What the recipes take from this"):
        assert heading in page
    assert "**Table 2a. AlexNet**" in page and "**Table 2b. Inception-v1**" in page
    assert "**Table 2c. AlexNet at the recipe's rate**" in page and "**At AlexNet's recipe rate**" in page
    assert all(f"| {label} | on |" in page and f"| {label} | off |" in page for label in FAULT_LABELS.values())
    assert "These results come from `--quick`" in page
    for name in ("causes_init_scale", "causes_activation", "causes_depth", "causes_lr", "remedies_alexnet",
                 "remedies_inception_v1", "remedies_alexnet_recipe_rate", "faults"):
        assert (out / "stability" / f"{name}.png").stat().st_size > 0, name
    # the page is a function of the results file: --render rebuilds it exactly
    (out / "stability.md").unlink()
    assert main(["--render", "--out", str(out)]) == 0
    assert (out / "stability.md").read_text() == page
