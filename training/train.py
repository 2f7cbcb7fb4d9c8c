"""The training loop: read it top to bottom.

Each step: forward, loss, backward, gradient clipping (global norm by default), a non-finite
guard, optimizer step.
Each epoch: validation, `last.pt` always, `best.pt` when validation accuracy improves, one line
of `metrics.jsonl`. At the end, when the data has a test split: the best checkpoint's top-1,
top-5 and per-class accuracy and a confusion-matrix plot; and a plot of the curves.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from service.preprocessing import PreprocessSpec, find_images
from service.progress import Progress
from training.checkpoint import checkpoint_payload, load_checkpoint, model_from_checkpoint, save_checkpoint
from training.clipping import clip_gradients
from training.config import TrainConfig
from training.data import ImageFolder, find_classes
from training.evaluation import evaluate, plot_confusion
from training.models import build_model
from training.monitor import StepLog, layer_grad_norms, plot_steps
from training.stability import DivergenceMonitor, TrainingDiverged, passes_gate, stability_report


def train(config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    data = Path(config.data)
    classes = find_classes(data / "train")
    spec = PreprocessSpec(resize=config.resize_to, crop=config.image_size, mean=config.mean, std=config.std)
    train_loader = make_loader(ImageFolder(data / "train", classes, spec, True, config.min_crop_scale), config, True)
    val_loader = make_loader(ImageFolder(data / "val", classes, spec, False), config, False)

    model_args = {"num_classes": len(classes), "width": config.width, **config.model_args}
    model = build_model(config.arch, **model_args).to(device)
    optimizer = make_optimizer(model, config)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    total_steps = config.epochs * len(train_loader)
    warmup_steps = round(config.warmup_epochs * len(train_loader))
    print(f"training {config.arch} (width {config.width}) on {len(train_loader.dataset)} images, "
          f"{len(classes)} classes, {config.epochs} epochs, device {device}", file=sys.stderr)

    step, skipped, best_acc, history, first_epoch = 0, 0, -1.0, [], 1
    rollbacks, lr_scale = 0, 1.0
    if config.resume:
        state = load_checkpoint(config.resume)
        if "rng" not in state:
            raise ValueError(f"{config.resume}: holds no training state to resume from (use the run's last.pt)")
        if (state["arch"], state["model_args"]) != (config.arch, model_args):
            raise ValueError(f"{config.resume}: was trained as {state['arch']} {state['model_args']}, "
                             f"not {config.arch} {model_args}")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        train_loader.generator.set_state(state["rng"]["loader"])
        step, skipped, best_acc, first_epoch = state["step"], state["skipped_steps"], state["best_val_acc"], state["epoch"] + 1
        rollbacks, lr_scale = state["rollbacks"], state["lr_scale"]
        history = read_records(out / "metrics.jsonl")[: state["epoch"]]
        print(f"resuming from {config.resume} after epoch {state['epoch']}", file=sys.stderr)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    # the logs hold exactly the epochs and steps behind the weights: a new run starts them afresh
    (out / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))
    kept_steps = [r for r in read_records(out / "steps.jsonl") if r["step"] <= step] if config.resume else []
    (out / "steps.jsonl").write_text("".join(json.dumps(record) + "\n" for record in kept_steps))
    steps_log = StepLog(out / "steps.jsonl", config.layer_norms_every)
    applied_steps = [r for r in kept_steps if not r["skipped"] and "rollback" not in r]
    grad_norms, total_clipped = [r["grad_norm"] for r in applied_steps], sum(r["clipped"] for r in applied_steps)
    monitor = DivergenceMonitor(config.rollback_skips, config.rollback_window, config.rollback_loss_factor, len(classes))
    good_state = snapshot(model, optimizer)

    for epoch in range(first_epoch, config.epochs + 1):
        model.train()
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        epoch_norms_from, clipped_before = len(grad_norms), total_clipped
        progress = Progress(len(train_loader), f"epoch {epoch}/{config.epochs}", unit="steps", log_lines=0)
        for images, targets in train_loader:
            progress.update()
            images, targets = images.to(device), targets.to(device)
            lr = lr_scale * learning_rate(step, total_steps, warmup_steps, config.lr, config.schedule,
                                          round(config.step_epochs * len(train_loader)), config.step_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step += 1

            # The forward pass updates batch-norm running statistics; keep the old ones so that a
            # skipped step leaves no trace in the model (they are a few numbers per channel).
            saved_buffers = [buffer.detach().clone() for buffer in model.buffers()]
            outputs = model(images)
            loss = training_loss(outputs, targets, criterion, config.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            layers = layer_grad_norms(model) if steps_log.wants_layers(step) else None
            # Clip (by global norm unless the config says otherwise); the norm is measured before.
            grad_norm, was_clipped = clip_gradients(model, config.clip, config.clip_threshold, len(classes))
            loss_value = loss.item()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            diverging = monitor.observe(step, loss_value if finite else None)
            steps_log.write(step=step, epoch=epoch, lr=lr, loss=loss_value if finite else None,
                            grad_norm=grad_norm if finite else None, clipped=was_clipped, skipped=not finite,
                            **({"layers": layers} if layers else {}), **({"rollback": diverging} if diverging else {}))
            # Non-finite guard: a NaN/inf loss or gradient would poison the weights and the
            # momentum buffers for good, so that step is skipped and counted instead.
            if not finite:
                skipped += 1
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), saved_buffers):
                        buffer.copy_(saved)
                print(f"\n  step {step}: non-finite loss or gradient, step skipped", file=sys.stderr)
            # Divergence: back to the last good weights and optimizer state, at a lower learning rate.
            if diverging:
                rollbacks += 1
                if rollbacks > config.max_rollbacks:
                    steps_log.close()
                    raise TrainingDiverged(f"training diverged at step {step} ({diverging}) after {config.max_rollbacks} "
                                           f"rollbacks; lower --lr, or see {out / 'steps.jsonl'}")
                lr_scale *= config.rollback_lr_factor
                restore(model, optimizer, good_state)
                monitor.reset()
                print(f"\n  step {step}: {diverging}: rolled back to the last good state, learning rate x{lr_scale:g}",
                      file=sys.stderr)
            if not finite or diverging:
                continue
            optimizer.step()
            grad_norms.append(grad_norm)
            total_clipped += was_clipped
            loss_sum += loss_value * len(targets)
            seen += len(targets)
            if step % config.snapshot_every == 0 and not monitor.recent_skips:
                good_state = snapshot(model, optimizer)

        progress.clear()
        val = evaluate(model, val_loader, device, classes)
        epoch_norms = grad_norms[epoch_norms_from:]
        record = {
            "epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum / max(seen, 1),
            "val_loss": val["loss"], "val_acc": val["acc"], "val_top5": val["top5"],
            "mean_grad_norm": sum(epoch_norms) / max(len(epoch_norms), 1),
            "clip_rate": (total_clipped - clipped_before) / max(len(epoch_norms), 1),
            "skipped_steps": skipped, "rollbacks": rollbacks, "seconds": round(time.perf_counter() - started, 2),
        }
        history.append(record)
        with open(out / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        print(f"epoch {epoch}/{config.epochs}  loss {record['train_loss']:.3f}  val_loss {val['loss']:.3f}  "
              f"val_acc {val['acc']:.3f}  grad_norm {record['mean_grad_norm']:.2f}  clipped {record['clip_rate']:.0%}  {record['seconds']}s", file=sys.stderr)

        report = stability_report(grad_norms, total_clipped, skipped, rollbacks, model)
        payload = checkpoint_payload(
            model, arch=config.arch, model_args=model_args, labels=classes, preprocessing=spec.to_dict(),
            config=config.to_dict(), metrics=record, stability=report, epoch=epoch, optimizer=optimizer.state_dict(),
        )
        if passes_gate(report):
            good_state = snapshot(model, optimizer)
        if val["acc"] > best_acc and passes_gate(report):
            best_acc = val["acc"]
            save_checkpoint(out / "best.pt", payload)
        # Everything an interrupted run needs to go on exactly as if it had not stopped; the step
        # log reaches the disk first, so it always covers what the checkpoint covers.
        steps_log.flush()
        payload.update(step=step, skipped_steps=skipped, best_val_acc=best_acc, rollbacks=rollbacks, lr_scale=lr_scale,
                       rng={"torch": torch.get_rng_state(), "loader": train_loader.generator.get_state()})
        save_checkpoint(out / "last.pt", payload)

    steps_log.close()
    summary = {"best_val_acc": best_acc, "epochs": config.epochs, "stability": report}
    if find_images(data / "test"):  # the best checkpoint, once, on data it never selected on
        best = model_from_checkpoint(load_checkpoint(out / "best.pt")).to(device)
        test = evaluate(best, make_loader(ImageFolder(data / "test", classes, spec, False), config, False), device, classes)
        summary.update(test_acc=test["acc"], test_top5=test["top5"], test_per_class_acc=test["per_class_acc"],
                       test_confusion=test["confusion"])
        plot_confusion(test["confusion"], classes, out / "confusion_test.png",
                       f"{config.arch}: test top-1 {test['acc']:.1%}, top-5 {test['top5']:.1%}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_history(history, out / "training.png")
    plot_steps(out / "steps.jsonl", out / "steps.png", config.clip_threshold if config.clip in ("norm", "value") else None)
    print(f"done: best val_acc {best_acc:.3f}" + (f", test_acc {summary['test_acc']:.3f}" if "test_acc" in summary else "")
          + f"; checkpoints in {out}", file=sys.stderr)
    return summary


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An in-memory copy of the weights, batch-norm statistics and optimizer state."""
    return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # the snapshot stays reusable


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
    # Weight decay on BN scales/shifts and biases only shrinks them toward a worse fit: exclude them.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)


def make_loader(dataset, config: TrainConfig, shuffle: bool) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, shuffle=shuffle, drop_last=shuffle and len(dataset) > config.batch_size,
        # Workers are started afresh each epoch, seeded from `generator`, so that a resumed run
        # augments exactly as an uninterrupted one (persistent workers would carry their RNG on).
        num_workers=config.workers, generator=generator,
    )


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
