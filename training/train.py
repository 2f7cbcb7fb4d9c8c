"""The training loop: read it top to bottom.

Each step (`Trainer.train_step`): forward under autocast, loss, backward, unscale, gradient
clipping (global norm by default), a non-finite guard, the divergence check, optimizer step.
Under `torchrun` every process runs the same loop on its share of each epoch (DDP); only the
first one writes files.
Each batch: uint8 images from the loader's workers, normalised on the device, then random erasing
and mixup/cutmix (training/augment.py) when the config asks for them.
Each epoch: validation (of the weights' moving average too, with --ema-decay), `last.pt` always,
`best.pt` when validation accuracy improves, one line of `metrics.jsonl`. At the end, when the
data has a test split: the best checkpoint's top-1, top-5 and per-class accuracy and a
confusion-matrix plot; and a plot of the curves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from service.preprocessing import PreprocessSpec, find_images
from service.progress import Progress
from training.augment import BatchAugment
from training.checkpoint import checkpoint_payload, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.clipping import clip_gradients_
from training.config import TrainConfig
from training.data import (
    DeviceBatches,
    EpochSampler,
    ImageFolder,
    UnreadableImages,
    find_classes,
    input_limit,
    make_loader,
)
from training.ema import ModelEma
from training.evaluation import evaluate, plot_confusion
from training.finetune import freeze_below, parameter_groups
from training.models import build_model
from training.monitor import StepLog, layer_norms, plot_steps
from training.precision import Precision, resolve_channels_last, resolve_precision
from training.pretrained import initialise, layout_of, read_weights, resolve_preprocessing
from training.stability import DivergenceMonitor, TrainingDiverged, passes_gate, stability_report

# (step about to run, model, images, targets, learning rate) -> the images, targets and learning rate to use
StepHook = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, float]]


def train(config: TrainConfig, step_hook: StepHook | None = None) -> dict:
    """Train as `config` says; under `torchrun` each process runs this with its share of the data.

    `step_hook` is for experiments on the loop itself: called before every step with the step number,
    the model, the batch and the learning rate, it returns the batch and learning rate to train on
    (the stability study injects faults and measures each update with it: training/study/faults.py).
    Normal training has none.
    """
    dist_env = DistEnv.from_environment(config.device)
    finished = False
    try:
        result = _train(config, dist_env, step_hook)
        finished = True
        return result
    finally:
        dist_env.close(finished)


def _train(config: TrainConfig, dist_env: DistEnv, step_hook: StepHook | None) -> dict:
    torch.manual_seed(config.seed)  # the same initial weights in every process (DDP checks they agree)
    device, rank, world, lead = dist_env.device, dist_env.rank, dist_env.world, dist_env.rank == 0
    log = (lambda message: print(message, file=sys.stderr)) if lead else (lambda message: None)
    precision = Precision.create(resolve_precision(config.precision, device), device)
    channels_last = resolve_channels_last(config.channels_last, device)
    if device.type == "cuda":
        # Fixed input size: let cuDNN time its kernels once and keep the fastest. --deterministic instead asks
        # for bit-identical reruns (and resumptions that end where the uninterrupted run does): that timing
        # can pick different kernels in two processes, and some kernels add with atomics in any order. Ops
        # with no deterministic kernel warn (warn_only). CPU runs are deterministic already.
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for reproducibility
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    out = Path(config.out)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    # Initial weights bring the preprocessing they were trained with (sizes and mean/std the config leaves open).
    weights = read_weights(config.init_from, config.arch) if config.init_from else None
    config = resolve_preprocessing(config, weights, log)

    data = Path(config.data)
    classes = find_classes(data / "train")
    spec = PreprocessSpec(resize=config.resize_to, crop=config.image_size, mean=config.mean, std=config.std)
    # Workers decode and augment, and hand over uint8 images that are normalised on the device. Each
    # process reads its own 1/world of every epoch's order (the same order in all of them, seeded by
    # seed + epoch, as each sample's augmentation is); batch_size is per process. An unreadable image
    # is replaced in its training batch and left out of evaluation, and logged (or stops the run).
    unreadable = UnreadableImages(config.bad_images, out / "skipped.jsonl" if lead else None, bool(config.resume))
    train_set = ImageFolder(data / "train", classes, spec, config.image_augment())
    sampler = EpochSampler(len(train_set), config.seed, rank, world)
    pin = device.type == "cuda"
    train_loader = DeviceBatches(make_loader(train_set, config.batch_size, config.workers, sampler, pin), spec, device,
                                 unreadable, "train", channels_last)
    val_loader = DeviceBatches(make_loader(ImageFolder(data / "val", classes, spec), config.batch_size, config.workers,
                                           pin=pin), spec, device, unreadable, "val", channels_last)
    batch_augment = BatchAugment(len(classes), config.random_erase, config.mixup_alpha, config.cutmix_alpha,
                                 seed=f"{config.seed}/{rank}")

    model_args = {"num_classes": len(classes), "width": config.width, **config.model_args}
    model = build_model(config.arch, **model_args)
    init_from = None
    if weights is not None and not config.resume:  # (a resumed run's weights come from its checkpoint)
        init_report = initialise(model, weights, classes)
        init_from = init_report.record()
        for line in init_report.lines():
            log(line)
    if config.trainable_from:
        log(freeze_below(model, config.trainable_from, layout_of(config.arch)).line())
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    ema = ModelEma(model, config.ema_decay) if config.ema_decay else None
    total_steps = config.epochs * len(train_loader)
    warmup_steps = round(config.warmup_epochs * len(train_loader))
    log(f"training {config.arch} (width {config.width}) on {len(train_set)} images, {len(classes)} classes, "
        f"{config.epochs} epochs, device {device}, {precision.name}" + (", channels_last" if channels_last else "")
        + f", {train_loader.loader.num_workers} loader workers" + (f", EMA {config.ema_decay}" if ema else "")
        + (f", {world} processes ({dist_env.backend}), {config.batch_size} images each per step" if world > 1 else ""))

    step, skipped, best_acc, history, first_epoch = 0, 0, -1.0, [], 1
    rollbacks, lr_scale, state = 0, 1.0, None
    if config.resume:
        state = load_checkpoint(config.resume)
        if "rng" not in state:
            raise ValueError(f"{config.resume}: holds no training state to resume from (use the run's last.pt)")
        if (state["arch"], state["model_args"]) != (config.arch, model_args):
            raise ValueError(f"{config.resume}: was trained as {state['arch']} {state['model_args']}, "
                             f"not {config.arch} {model_args}")
        if state.get("world_size", 1) != world:
            raise ValueError(f"{config.resume}: was trained by {state.get('world_size', 1)} processes, not {world}: "
                             f"resume with the same number so that the data order goes on as it was")
        init_from = state.get("init_from")
        if weights is not None and (init_from or {}).get("sha256") != weights.sha256:
            raise ValueError(f"{config.resume}: was not initialised from {config.init_from} (or that file changed)")
        if PreprocessSpec.from_dict(state["preprocessing"]) != spec:  # e.g. sizes that came with --init-from
            raise ValueError(f"{config.resume}: was trained with preprocessing {state['preprocessing']}, not "
                             f"{spec.to_dict()}: resume with the command that started the run")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if ema:
            if "ema" not in state:
                raise ValueError(f"{config.resume}: holds no weight average to resume --ema-decay from")
            ema.load_state_dict(state["ema"])
        precision.load_state_dict(state.get("scaler", {}))
        rng = state["rng_ranks"][rank] if world > 1 else state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        elif ("cuda" in rng) != (device.type == "cuda"):
            log(f"note: {config.resume} was trained on another kind of device; the run will not repeat bit for bit")
        step, skipped, best_acc, first_epoch = (state["step"], state["skipped_steps"], state["best_val_acc"],
                                                state["epoch"] + 1)
        rollbacks, lr_scale = state["rollbacks"], state["lr_scale"]
        log(f"resuming from {config.resume} after epoch {state['epoch']}")
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model,
                                                          device_ids=[device.index] if device.type == "cuda" else None)

    # Only the first process writes: the logs hold exactly the epochs and steps behind the weights,
    # so a new run starts them afresh and a resumed one keeps what its checkpoint covers.
    kept_steps = []
    if lead:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        history = read_records(out / "metrics.jsonl")[: state["epoch"]] if state else []
        (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
        kept_steps = [r for r in read_records(out / "steps.jsonl") if r["step"] <= step] if state else []
        (out / "steps.jsonl").write_text("".join(json.dumps(record) + "\n" for record in kept_steps))
    trainer = Trainer(model, optimizer, config, len(classes), precision, StepLog(out / "steps.jsonl" if lead else None,
                      config.layer_norms_every), guard=config.guard, world=world, ema=ema,
                      input_limit=input_limit(spec))
    trainer.step, trainer.skipped, trainer.rollbacks, trainer.lr_scale = step, skipped, rollbacks, lr_scale
    applied_steps = [r for r in kept_steps if not r["skipped"] and "rollback" not in r]
    trainer.grad_norms, trainer.total_clipped = ([r["grad_norm"] for r in applied_steps],
                                                 sum(r["clipped"] for r in applied_steps))
    trainer.overflows = state.get("overflow_steps", 0) if state else 0
    module = trainer.module

    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        train_loader.set_epoch(epoch)  # this epoch's order and augmentation
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        epoch_norms_from, clipped_before = len(trainer.grad_norms), trainer.total_clipped
        progress = (Progress(len(train_loader), f"epoch {epoch}/{config.epochs}", unit="steps", log_lines=0)
                    if lead else None)
        for images, targets in train_loader:  # on the device, normalised
            if progress:
                progress.update()
            images, targets = batch_augment(images, targets, trainer.step)  # mixup/cutmix: targets become soft
            lr = trainer.lr_scale * learning_rate(trainer.step, total_steps, warmup_steps, config.lr, config.schedule,
                                                  round(config.step_epochs * len(train_loader)), config.step_gamma)
            if step_hook is not None:
                images, targets, lr = step_hook(trainer.step + 1, trainer.module, images, targets, lr)
            try:
                loss_value = trainer.train_step(images, targets, lr, epoch)
            except TrainingDiverged as exc:
                raise TrainingDiverged(f"{exc}; lower --lr, or see {out / 'steps.jsonl'}") from None
            if loss_value is not None:
                loss_sum += loss_value * len(targets)
                seen += len(targets)

        if progress:
            progress.clear()
        step, skipped, rollbacks, grad_norms = trainer.step, trainer.skipped, trainer.rollbacks, trainer.grad_norms
        if world > 1:  # batch-norm statistics as DDP keeps them (rank 0's), so every process evaluates one model
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, 0)
        val = evaluate(module, val_loader, device, classes)
        ema_val = evaluate(ema.module, val_loader, device, classes) if ema else None
        epoch_norms = grad_norms[epoch_norms_from:]
        record = {
            "epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / max(seen, 1),
            "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
            "mean_grad_norm": sum(epoch_norms) / max(len(epoch_norms), 1),
            "clip_rate": (trainer.total_clipped - clipped_before) / max(len(epoch_norms), 1),
            "skipped_steps": skipped, "rollbacks": rollbacks, "seconds": round(time.perf_counter() - started, 2),
            "skipped_images": unreadable.end_epoch(epoch, dist_env.gather),
        }
        if ema_val:
            record.update(ema_val_loss=ema_val["loss"], ema_val_acc=ema_val["acc"], ema_val_top5=ema_val["top5"])
        if precision.scaler:
            record.update(overflow_steps=trainer.overflows, loss_scale=precision.scale)
        history.append(record)
        log(f"epoch {epoch}/{config.epochs}  loss {record['train_loss']:.3f}  val_loss {val['loss']:.3f}  "
            f"val_acc {val['acc']:.3f}" + (f" (ema {ema_val['acc']:.3f})" if ema_val else "")
            + f"  grad_norm {record['mean_grad_norm']:.2f}  clipped {record['clip_rate']:.0%}  {record['seconds']}s"
            + (f"  skipped {record['skipped_images']} unreadable images" if record["skipped_images"] else ""))

        report = stability_report(grad_norms, trainer.total_clipped, skipped, rollbacks, module)
        if precision.scaler:
            report["overflow_steps"] = trainer.overflows
        if passes_gate(report):
            trainer.good_state = snapshot(module, optimizer, ema)
        # Everything an interrupted run needs to go on exactly as if it had not stopped (the data order
        # and augmentation need nothing: they follow from seed and epoch).
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":  # dropout on the GPU draws from the device's generator. This process's device
            rng["cuda"] = torch.cuda.get_rng_state(device)  # only: _all() would wake every GPU in every process
        rng_ranks = dist_env.gather(rng)
        if not lead:
            continue
        with open(out / "metrics.jsonl", "a") as metrics_log:
            metrics_log.write(json.dumps(record) + "\n")
        payload = checkpoint_payload(
            module, arch=config.arch, model_args=model_args, labels=classes, preprocessing=spec.to_dict(),
            config=config.to_dict(), metrics=record, stability=report, epoch=epoch, optimizer=optimizer.state_dict(),
            **({"init_from": init_from} if init_from else {}),
            weights="model",
        )
        # best.pt holds the weights, live or averaged (--best-weights), that validate best; export takes them.
        candidates = {"model": val["acc"], **({"ema": ema_val["acc"]} if ema_val else {})}
        chosen = max([w for w in candidates if config.best_weights in (w, "either")] or ["model"], key=candidates.get)
        if candidates[chosen] > best_acc and passes_gate(report):
            best_acc = candidates[chosen]
            best_state = (ema.module if chosen == "ema" else module).state_dict()
            save_checkpoint(out / "best.pt", {**payload, "weights": chosen, "metrics": {**record, "weights": chosen},
                                              "state_dict": {k: v.detach().cpu() for k, v in best_state.items()}})
        # the step log reaches the disk first, so it always covers what the checkpoint covers
        trainer.steps_log.flush()
        payload.update(step=step, skipped_steps=skipped, best_val_acc=best_acc, rollbacks=rollbacks,
                       lr_scale=trainer.lr_scale, rng=rng, world_size=world, scaler=precision.state_dict(),
                       overflow_steps=trainer.overflows, **({"rng_ranks": rng_ranks} if world > 1 else {}),
                       **({"ema": ema.state_dict()} if ema else {}))
        save_checkpoint(out / "last.pt", payload)

    trainer.steps_log.close()
    # Data-parallel processes must end with the same weights; each one's digest goes into the summary.
    digests = dist_env.gather(weights_digest(module))
    if not lead:
        return {}
    best_checkpoint = load_checkpoint(out / "best.pt")
    summary = {"best_val_acc": best_acc, "best_weights": best_checkpoint["weights"], "epochs": config.epochs,
               "stability": report, "precision": precision.name, "channels_last": channels_last, "world_size": world}
    if world > 1:
        summary["rank_weight_digests"] = digests
    if find_images(data / "test"):  # the best checkpoint, once, on data it never selected on
        best = model_from_checkpoint(best_checkpoint).to(device)
        test_loader = make_loader(ImageFolder(data / "test", classes, spec), config.batch_size, config.workers)
        test = evaluate(best, DeviceBatches(test_loader, spec, device, unreadable, "test"), device, classes)
        summary.update(test_acc=test["acc"], test_top5=test["top5"], test_per_class_acc=test["per_class_acc"],
                       test_confusion=test["confusion"])
        if config.plots:
            plot_confusion(test["confusion"], classes, out / "confusion_test.png",
                           f"{config.arch}: test top-1 {test['acc']:.1%}, top-5 {test['top5']:.1%}")
        unreadable.end_epoch("test")
    summary["skipped_images"] = len(unreadable.seen)  # distinct files, every one in skipped.jsonl
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if config.plots:
        plot_history(history, out / "training.png")
        plot_steps(out / "steps.jsonl", out / "steps.png",
                   config.clip_threshold if config.clip in ("norm", "value") else None)
    log(f"done: best val_acc {best_acc:.3f}"
        + (f", test_acc {summary['test_acc']:.3f}" if "test_acc" in summary else "")
        + f"; checkpoints in {out}")
    return summary


class Trainer:
    """One optimizer step at a time, with everything that keeps a run stable and observable.

    A step: forward (under autocast), loss, backward (scaled for fp16), unscale, per-layer norms at
    the interval, clipping, one host transfer of (loss, norm, clipped, input peak), then the guard
    (skip a step with a non-finite loss or gradient, or inputs beyond `input_limit`), the divergence
    check, and the optimizer step, a skip or a rollback. `guard=False` and no step
    log give the bare loop the overhead benchmark compares with (benchmarks/train_overhead.py).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, num_classes: int,
                 precision: Precision, steps_log: StepLog | None, *, guard: bool = True, world: int = 1,
                 ema: ModelEma | None = None, input_limit: float = math.inf):
        self.model, self.optimizer, self.config, self.num_classes = model, optimizer, config, num_classes
        self.input_limit = input_limit  # |value| above this (or non-finite) in a batch: corrupt inputs
        self.ema = ema  # updated after every applied step
        self.module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        self.precision, self.steps_log, self.guard, self.world = precision, steps_log or StepLog(None, 0), guard, world
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.monitor = DivergenceMonitor(config.rollback_skips, config.rollback_window, config.rollback_loss_factor,
                                         num_classes)
        self.step = self.skipped = self.overflows = self.rollbacks = self.total_clipped = 0
        self.lr_scale, self.grad_norms = 1.0, []
        self.good_state = snapshot(self.module, optimizer, ema) if guard else None

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, lr: float, epoch: int = 0) -> float | None:
        """One step at learning rate `lr`; returns the loss when the step was applied, else None."""
        config, precision, optimizer = self.config, self.precision, self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # the classifier's multiplier (--head-lr-scale)
        self.step += 1
        step = self.step
        # The forward pass updates batch-norm running statistics; keep the old ones so that a
        # skipped step leaves no trace in the model (they are a few numbers per channel).
        saved_buffers = [buffer.detach().clone() for buffer in self.module.buffers()] if self.guard else None
        with precision.autocast():
            outputs = self.model(images)
            loss = training_loss(outputs, targets, self.criterion, config.aux_weight)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.unscale(optimizer)  # true gradients from here on: what is measured and clipped is real
        layers = layer_norms(self.module) if self.steps_log.wants_layers(step) else {}
        norm, clipped = clip_gradients_(self.module, config.clip, config.clip_threshold, self.num_classes)
        measured = [loss.detach().float(), norm, clipped.float()]
        if self.guard:  # the largest |input| (NaN when any value is): the bare loop does not pay for it
            measured.append(images.detach().abs().amax().float())
        values = torch.stack(measured)
        if self.world > 1:
            # Gradients are already averaged (identical in every process); the loss is averaged here so
            # that every process takes the same guard, rollback and snapshot decisions.
            torch.distributed.all_reduce(values)
            values /= self.world
        loss_value, grad_norm, was_clipped, *peak = values.tolist()  # the step's one host sync
        input_peak = peak[0] if peak else 0.0
        was_clipped = was_clipped > 0.5
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        # Corrupt inputs: the guard skips the step like a non-finite one (it leaves no trace, BN statistics
        # included). One such batch costs one step; a stream of them is a broken pipeline, and rolls back.
        bad_inputs = self.guard and not input_peak <= self.input_limit
        if not self.guard:
            # Nothing is skipped or rolled back; a run that diverges (non-finite, or the loss far above
            # its running median: the monitor's test) stops there, as there is no way back without the guard.
            diverging = self.monitor.observe(step, loss_value) if finite else "non-finite loss or gradient"
            if diverging:
                self.steps_log.write(step=step, epoch=epoch, lr=lr,
                                     loss=loss_value if math.isfinite(loss_value) else None,
                                     grad_norm=grad_norm if math.isfinite(grad_norm) else None, clipped=was_clipped,
                                     skipped=False, diverged=diverging)
                self.steps_log.flush()
                raise TrainingDiverged(f"training diverged at step {step}: {diverging}, with the guard off")
            precision.step(optimizer)
            if self.ema:
                self.ema.update(self.module)
            self.grad_norms.append(grad_norm)
            self.total_clipped += was_clipped
            self.steps_log.write(step=step, epoch=epoch, lr=lr, loss=loss_value, grad_norm=grad_norm,
                                 clipped=was_clipped, skipped=False, **layers)
            return loss_value

        # fp16 only: a finite loss with non-finite gradients is the loss scale overflowing, which the
        # scaler answers by halving it. Skipped and counted like any non-finite step, but it only
        # counts toward a rollback once the scale is below 1, i.e. when the gradients themselves overflow.
        overflow = precision.scaler is not None and math.isfinite(loss_value) and not finite
        scale = precision.scale if overflow else None
        skip = not finite or bad_inputs
        diverging = self.monitor.observe(step, None if skip else loss_value) if not overflow or scale < 1 else None
        record = dict(step=step, epoch=epoch, lr=lr, loss=loss_value if math.isfinite(loss_value) else None,
                      grad_norm=grad_norm if finite else None, clipped=was_clipped, skipped=skip)
        if overflow:
            record.update(overflow=True, loss_scale=scale)
        if bad_inputs:
            record.update(bad_inputs=input_peak if math.isfinite(input_peak) else None)
        self.steps_log.write(**record, **layers,
                             **({"rollback": diverging} if diverging else {}))
        # The guard: a NaN/inf loss or gradient would poison the weights and the momentum buffers for
        # good, and corrupt inputs BN's running statistics, so that step is skipped and counted instead.
        if skip:
            self.skipped += 1
            self.overflows += overflow
            precision.skip()
            with torch.no_grad():
                for buffer, saved in zip(self.module.buffers(), saved_buffers):
                    buffer.copy_(saved)
            if self.world == 1 or self.steps_log.file:
                what = (f"inputs outside what the preprocessing produces (largest |value| {input_peak:.3g}, "
                        f"limit {self.input_limit:.3g})" if bad_inputs
                        else f"fp16 gradients overflowed (loss scale now {precision.scale:g})" if overflow
                        else "non-finite loss or gradient")
                print(f"\n  step {step}: {what}, step skipped", file=sys.stderr)
        # Divergence: back to the last good weights and optimizer state, at a lower learning rate.
        if diverging:
            self.rollbacks += 1
            if self.rollbacks > config.max_rollbacks:
                self.steps_log.flush()
                raise TrainingDiverged(f"training diverged at step {step} ({diverging}) "
                                       f"after {config.max_rollbacks} rollbacks")
            self.lr_scale *= config.rollback_lr_factor
            restore(self.module, optimizer, self.good_state, self.ema)
            self.monitor.reset()
            if self.world == 1 or self.steps_log.file:
                print(f"\n  step {step}: {diverging}: rolled back to the last good state, "
                      f"learning rate x{self.lr_scale:g}", file=sys.stderr)
        if skip or diverging:
            return None
        precision.step(optimizer)
        if self.ema:
            self.ema.update(self.module)
        self.grad_norms.append(grad_norm)
        self.total_clipped += was_clipped
        if step % config.snapshot_every == 0 and not self.monitor.recent_skips:
            self.good_state = snapshot(self.module, optimizer, self.ema)
        return loss_value


class DistEnv:
    """This process's place in a `torchrun` job (or a job of one), and the few collectives the loop needs."""

    def __init__(self, rank: int, world: int, device: torch.device, backend: str | None):
        self.rank, self.world, self.device, self.backend = rank, world, device, backend

    @classmethod
    def from_environment(cls, requested_device: str) -> DistEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, pick_device(requested_device), None)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(requested_device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        return cls(rank, world, device, backend)

    def gather(self, value) -> list:
        """Every process's `value`, in rank order (a list of one without torchrun)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def close(self, finished: bool) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            # After a finished run rank 0 is still writing reports when the others get here; gloo torn
            # down on one side while the other still holds the group aborted a rank at exit once
            # ("terminate called without an active exception"), so finished ranks leave together.
            # (After an error a barrier could wait on a rank that never comes.)
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the weights and buffers, to show that data-parallel processes ended identical."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, ema: ModelEma | None = None) -> dict:
    """An in-memory copy of the weights, batch-norm statistics, optimizer state and weight average."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "ema": ema.state_dict() if ema else None})


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, ema: ModelEma | None = None) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # the snapshot stays reusable
    if ema:
        ema.load_state_dict(state["ema"])


def read_records(path: Path) -> list[dict]:
    """A JSONL log's records, without the half-written last line a killed run may leave."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def training_loss(outputs, targets, criterion, aux_weight: float) -> torch.Tensor:
    """Cross-entropy on the logits, plus weighted auxiliary-head losses when the model returns them."""
    if isinstance(outputs, tuple):
        logits, *aux = outputs
        return criterion(logits, targets) + aux_weight * sum(criterion(a, targets) for a in aux)
    return criterion(outputs, targets)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str = "cosine",
                  step_every: int = 0, gamma: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to zero, or `gamma` times every `step_every` steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "step":
        return peak * gamma ** ((step - warmup_steps) // max(step_every, 1))
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # trainable parameters only; weight decay on weights of rank > 1; the classifier's lr_scale (training/finetune.py)
    groups = parameter_groups(model, layout_of(config.arch), config.weight_decay, config.head_lr_scale)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    left.plot(epochs, [r["val_loss"] for r in history], label="val loss")
    left.set_xlabel("epoch")
    left.legend()
    right.plot(epochs, [r["val_acc"] for r in history], label="val accuracy", color="tab:green")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
