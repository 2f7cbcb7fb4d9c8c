"""Evaluation of a model on one split: loss, top-1/top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, labels: list[str]) -> dict:
    """Everything is accumulated in one confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    classes = len(labels)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    loss_sum, top5_hits, count = 0.0, 0, 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        best = logits.topk(min(5, classes), dim=1).indices
        top5_hits += (best == targets[:, None]).any(dim=1).sum().item()
        confusion += torch.bincount(targets.cpu() * classes + best[:, 0].cpu(),
                                    minlength=classes * classes).view(classes, classes)
        count += len(targets)
    per_class = confusion.diag().float() / confusion.sum(dim=1).clamp_min(1).float()
    return {
        "loss": loss_sum / count,
        "acc": confusion.diag().sum().item() / count,
        "top5": top5_hits / count,
        "per_class_acc": {label: round(value, 4) for label, value in zip(labels, per_class.tolist())},
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(confusion, dtype=torch.float)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)  # each row sums to 1: recall per class
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(labels) <= 30:  # beyond that the numbers are unreadable; the colours still tell
        ax.set_xticks(range(len(labels)), labels, rotation=90)
        ax.set_yticks(range(len(labels)), labels)
        for (row, col), value in zip(torch.cartesian_prod(torch.arange(len(labels)),
                                                          torch.arange(len(labels))).tolist(),
                                     counts.flatten().tolist()):
            if value:
                ax.text(col, row, int(value), ha="center", va="center", fontsize=7,
                        color="white" if rates[row, col] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
