"""Per-step monitoring: what the loop did at every step, and which layers' gradients grow.

`steps.jsonl` gets one line per step: loss, global gradient norm before clipping, whether the
step was clipped or skipped, learning rate; every `layer_every` steps also the gradient and weight
norm of each layer (parameters grouped by module). `plot_steps` turns the file into `steps.png`:
loss, gradient norm against the clipping threshold, and a heat map of each layer's gradient norm
relative to its weight norm over time, the picture that shows an explosion starting in one layer
and spreading.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn


@torch.no_grad()
def layer_norms(model: nn.Module) -> dict[str, dict[str, float]]:
    """Each layer's gradient norm ("layers") and weight norm ("layer_weights"), L2 over its parameters
    (weights, biases and its batch norm together), in model order. Their ratio, the size of the step
    the gradient asks for relative to the weights, is what says which layer leads a blow-up: a raw
    norm is large wherever the weights are large."""
    grads: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            layer = name.rsplit(".", 1)[0]  # "features.conv1.0.weight" -> "features.conv1.0"
            if layer.rsplit(".", 1)[-1].isdigit():  # conv and BN of one ConvBNReLU count as one layer
                layer = layer.rsplit(".", 1)[0]
            grads[layer] = grads.get(layer, 0) + parameter.grad.float().pow(2).sum()
            weights[layer] = weights.get(layer, 0) + parameter.float().pow(2).sum()
    if not grads:
        return {}
    values = torch.stack([*grads.values(), *weights.values()]).sqrt().tolist()  # one host transfer
    return {"layers": dict(zip(grads, values[: len(grads)])), "layer_weights": dict(zip(weights, values[len(grads):]))}


class StepLog:
    """Appends one JSON line per step to `path`; with no path (data-parallel ranks other than 0) it
    still says when per-layer norms are due, so every rank computes the same things, but writes nothing."""

    def __init__(self, path: Path | None, layer_every: int):
        self.path, self.layer_every = path, layer_every
        self.file = open(path, "a") if path else None

    def wants_layers(self, step: int) -> bool:
        return self.layer_every > 0 and step % self.layer_every == 0

    def write(self, **record) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def plot_steps(steps_path: Path, out_path: Path, clip_threshold: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = [json.loads(line) for line in steps_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    steps = [r["step"] for r in records]
    layered = [r for r in records if "layers" in r]
    rows = 3 if layered else 2
    fig, axes = plt.subplots(rows, 1, figsize=(10, 2.6 * rows + 0.6), sharex=True)
    loss = np.array([r["loss"] if r["loss"] is not None else np.nan for r in records], dtype=float)
    axes[0].plot(steps, loss, lw=0.8)
    for step in [r["step"] for r in records if r["loss"] is None]:
        axes[0].axvline(step, color="tab:red", ls=":", lw=1)  # non-finite loss
    axes[0].set_ylabel("loss")
    norm = np.array([r["grad_norm"] if r["grad_norm"] is not None else np.nan for r in records], dtype=float)
    axes[1].semilogy(steps, norm, lw=0.8, label="global grad norm (before clipping)")
    if clip_threshold:
        axes[1].axhline(clip_threshold, color="tab:red", ls="--", lw=0.8, label="clipping threshold")
    for step in [r["step"] for r in records if r.get("skipped")]:
        axes[1].axvline(step, color="black", alpha=0.3, lw=0.8)  # skipped: non-finite
    for step in [r["step"] for r in records if r.get("rollback")]:
        axes[1].axvline(step, color="tab:red", alpha=0.8, lw=1.2)  # rolled back
    axes[1].legend(loc="upper right", fontsize=8)
    if layered:
        layers = list(defaultdict.fromkeys(name for r in layered for name in r["layers"]))
        grid = np.array([[r["layers"].get(name, np.nan) / max(r.get("layer_weights", {}).get(name, 1.0), 1e-12)
                          for r in layered] for name in layers], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            heat = np.log10(grid)
        x = [r["step"] for r in layered]
        last = x[-1] + (x[-1] - x[-2] if len(x) > 1 else 1)  # each column spans to the next logged step
        image = axes[2].imshow(heat, aspect="auto", cmap="magma", interpolation="nearest",
                               extent=(x[0], last, len(layers) - 0.5, -0.5))
        if len(layers) <= 40:
            axes[2].set_yticks(range(len(layers)), layers, fontsize=6)
        axes[2].set_ylabel("layer (input at top)")
        # in an inset, not beside: a colorbar taking room from this panel alone would shift its steps
        # against the panels above
        fig.colorbar(image, cax=axes[2].inset_axes([1.01, 0, 0.015, 1]), label="log10 (grad norm / weight norm)")
    axes[-1].set_xlabel("step")
    # imshow sets the shared x range to the heat map's: a diverged run's last steps, logged without
    # per-layer norms, would fall off the loss and grad-norm panels
    axes[-1].set_xlim(steps[0], max(steps[-1] + 1, last if layered else 0))
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
