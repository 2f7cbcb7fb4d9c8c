"""What the study trains: its one configuration, the remedy set-ups and the injected faults.

Everything the page says about the design is rendered from these values (saved in the results
JSON), so changing a number here changes the page with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.config import TrainConfig
from training.study.causes import CausesConfig
from training.study.faults import Fault


@dataclass(frozen=True)
class StudyConfig:
    # Sized to finish in under 30 minutes on 2 cores with --jobs 2 (about 200 training runs of one
    # thread each) from the CPU time per step of pilot runs (every run's cpu_seconds is in the results
    # file; the page states the full run's wall time). Under SGD the shapes need a few hundred steps to
    # rise well above chance: hence 8 epochs of 54 steps for AlexNet at an eighth of its width, and 5
    # for Inception-v1, whose step costs about twice as much at the same width.
    # Data: the built-in shapes (10 classes, 64 px). The test split is twice the validation split:
    # with 5 seeds the interval on a mean is set by the seeds' spread, not by the test images.
    train_per_class: int = 350
    val_per_class: int = 50
    test_per_class: int = 100
    image_size: int = 64
    seeds: int = 5  # reported runs: seeds 0 .. seeds-1, the same in every set-up
    selection_seeds: int = 2  # selection runs: seeds 100, 101, ... (never a reported seed, never the test split)
    # Training, shared by every run: SGD with Nesterov momentum 0.9 (the textbook setting of every
    # remedy studied: Pascanu et al.'s clipping, Goyal et al.'s warmup, Brock et al.'s AGC), cosine
    # decay, weight decay 5e-4, no dropout, no label smoothing, random-resized crops of >= 80%.
    epochs: int = 8  # AlexNet's, and the faults' (AlexNet too)
    inception_epochs: int = 5
    batch_size: int = 64
    weight_decay: float = 5e-4
    min_crop_scale: float = 0.8
    warmup_epochs: float = 1.0  # the "warmup" remedy: linear from 0, TrainConfig's default length
    clip_threshold: float = 2.0  # global-norm clipping: the recipes' threshold (training/recipes/*.yaml)
    alexnet_width: float = 0.125  # half the recipe's: a step costs half as much, and it learns as fast
    inception_width: float = 0.125  # half the recipe's
    # Selection of the study's learning rate, per architecture: the lowest rate of the grid at which
    # the bare set-up ("none") diverges within `probe_epochs` in at least `probe_share` of the probe
    # seeds, tried from the lowest rate up (a bare ReLU network can also die at a high rate without
    # diverging, so a search from the top can stop above the rate that first diverges).
    lr_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
    probe_epochs: int = 1
    # "Most seeds" with one seed of margin: 4 of 5. Probes from other seeds only estimate the share of
    # reported runs that diverge, and at 3 of 5 a rate can diverge in fewer than half of the reported runs.
    probe_share: float = 0.8
    # AGC's clip factor, per architecture, by validation accuracy at the study's learning rate
    # (the paper's range is 0.01-0.16).
    agc_grid: tuple[float, ...] = (0.01, 0.04, 0.16)
    # The guard at work: faults injected into the recipe's set-up (AlexNet-BN, clipping by global norm,
    # warmup) at a learning rate chosen by validation accuracy, late in training, where a fault costs
    # the most: the run has the least time left to recover before its final weights are taken.
    fault_lr_grid: tuple[float, ...] = (0.05, 0.1)
    fault_at: float = 0.75  # share of the run's steps before the first faulty step
    corrupt_scale: float = 1e4  # pixel values times this (a batch that skipped normalisation, or worse)
    lr_spike: float = 10.0  # learning rate times this ...
    lr_spike_steps: int = 5  # ... for this many steps (a mis-set schedule)
    lr_blunder: float = 100.0  # learning rate times this ...
    lr_blunder_steps: int = 3  # ... for this many steps (a rate given in the wrong units)
    mislabel_steps: int = 20  # batches whose labels are all shifted by one class (a bad shard)
    # At the rate where the bare network diverges, most set-ups also learn next to nothing in this
    # budget; these set-ups are trained on AlexNet a second time at the recipe set-up's rate chosen
    # for the faults (a rate the recipe trains well at), to show what each does for learning.
    recipe_rate_setups: tuple[str, ...] = ("none", "warmup", "bn", "clip", "bn_clip")
    layer_norms_every: int = 2  # per-layer norms every other step (every step costs Inception 15% more time)
    update_every: int = 10  # the relative update ||dw|| / ||w|| is measured on every 10th step
    causes: CausesConfig = field(default_factory=CausesConfig)

    def steps_per_epoch(self) -> int:
        return self.train_per_class * 10 // self.batch_size  # the loader drops the last partial batch

    def epochs_of(self, arch: str) -> int:
        return self.inception_epochs if arch == "inception_v1" else self.epochs

    def fault_step(self) -> int:
        return round(self.fault_at * self.epochs * self.steps_per_epoch()) + 1

    def faults(self) -> dict[str, tuple[Fault, ...]]:
        """Fault name -> what is injected (in the order the page lists them)."""
        at = self.fault_step()
        return {
            "corrupt_batch": (Fault("scale_inputs", at, scale=self.corrupt_scale),),
            "lr_spike": (Fault("scale_lr", at, steps=self.lr_spike_steps, scale=self.lr_spike),),
            "lr_blunder": (Fault("scale_lr", at, steps=self.lr_blunder_steps, scale=self.lr_blunder),),
            "mislabel": (Fault("shift_labels", at, steps=self.mislabel_steps),),
        }


# A seconds-long version that goes through every part of the machinery (tests/test_training_recipes.py).
QUICK = StudyConfig(
    train_per_class=4, val_per_class=1, test_per_class=1, seeds=2, selection_seeds=1, epochs=2, inception_epochs=2,
    batch_size=10, alexnet_width=0.125, inception_width=0.0625, lr_grid=(1.0,), probe_share=0.5,
    agc_grid=(0.04,), fault_lr_grid=(0.05,), fault_at=0.5, lr_spike_steps=1, lr_blunder_steps=1, mislabel_steps=1,
    update_every=2, layer_norms_every=1,
    causes=CausesConfig(train_images=32, steps=3, batch_size=8, depth=2, depths=(2,), init_scales=(1.0, 2.0),
                        activations=("relu",), lrs=(0.02,)),
)

ARCHS = {"alexnet": "AlexNet", "inception_v1": "Inception-v1"}

# Set-up name -> (label, what it adds to the bare network: no BN, no warmup, no clipping, no guard).
REMEDIES = {
    "none": ("none", {}),
    "warmup": ("warmup only", {"warmup": True}),
    "bn": ("BN only", {"bn": True}),
    "clip": ("clipping only (global norm)", {"clip": "norm"}),
    "agc": ("AGC only", {"clip": "agc"}),
    "bn_clip": ("BN + clipping", {"bn": True, "clip": "norm"}),
    "bn_clip_guard": ("BN + clipping + guard", {"bn": True, "clip": "norm", "guard": True}),
}

FAULT_LABELS = {"corrupt_batch": "a corrupt batch", "lr_spike": "a learning-rate spike (x10)",
                "lr_blunder": "a learning-rate blunder (x100)", "mislabel": "mislabelled batches"}


def train_config(study: StudyConfig, arch: str, data: Path, out: Path, *, lr: float, seed: int, bn: bool = False,
                 warmup: bool = False, clip: str = "none", clip_threshold: float | None = None, guard: bool = False,
                 epochs: int | None = None) -> TrainConfig:
    """One run of the study: `arch` ("alexnet" or "inception_v1") with or without each remedy."""
    if arch == "alexnet":
        name, width, model_args = ("alexnet_bn" if bn else "alexnet"), study.alexnet_width, {"dropout": 0.0}
    else:  # the no-BN Inception is the same builder with its batch norms left out
        name, width = "inception_v1_bn", study.inception_width
        model_args = {"dropout": 0.0, "aux_logits": False, "batch_norm": bn}
    threshold = clip_threshold if clip_threshold is not None else study.clip_threshold
    return TrainConfig(
        data=str(data), out=str(out), arch=name, width=width, image_size=study.image_size, resize=study.image_size,
        model_args=model_args, epochs=epochs or study.epochs_of(arch), batch_size=study.batch_size, optimizer="sgd",
        lr=lr, weight_decay=study.weight_decay, warmup_epochs=study.warmup_epochs if warmup else 0.0,
        label_smoothing=0.0, clip=clip, clip_threshold=threshold, min_crop_scale=study.min_crop_scale, workers=0,
        seed=seed, device="cpu", precision="fp32", layer_norms_every=study.layer_norms_every, plots=False,
        # Without the guard the loop is a plain one (torchvision's or timm's): it goes on through any
        # finite loss, and a non-finite one ends the run (from there on its weights would be NaN).
        guard=guard, rollback_loss_factor=TrainConfig.rollback_loss_factor if guard else 0.0,
    )
