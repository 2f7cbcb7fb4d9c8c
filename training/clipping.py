"""Gradient clipping, three ways, behind one call the training loop makes after every backward.

- "norm": scale all gradients together so their global L2 norm is at most `threshold` (Pascanu
  et al. 2013). Keeps the update's direction; the default.
- "value": clamp every gradient element to [-threshold, threshold]. Cheap, but changes direction.
- "agc": adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization"): per unit, scale the gradient so that
  ||g|| / max(||w||, 1e-3) <= threshold (the paper uses 0.01-0.16). A unit is one output row of a
  weight matrix or conv kernel; a vector (bias, batch-norm scale and shift) is one unit as a
  whole, clipped by the vector's norm, as in the paper's code (deepmind-research/nfnets) and
  timm's `adaptive_clip_grad`. Classifier layers (Linear layers with one output per class) are
  excluded, as in the paper.
- "none": measure the norm only.
"""

from __future__ import annotations

import torch
from torch import nn

CLIP_MODES = ("norm", "value", "agc", "none")
AGC_EPS = 1e-3  # floor on ||w||, so units that start at zero can still move


def clip_gradients(model: nn.Module, mode: str, threshold: float, num_classes: int) -> tuple[float, bool]:
    """Clip `model`'s gradients in place; returns (global L2 norm before clipping, whether it clipped).

    The norm comes back as a float, NaN or inf when a gradient is not finite: the caller's guard
    decides what to do with such a step.
    """
    norm, clipped = clip_gradients_(model, mode, threshold, num_classes)
    return norm.item(), bool(clipped)


@torch.no_grad()
def clip_gradients_(model: nn.Module, mode: str, threshold: float,
                    num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip_gradients` without a host sync: (norm, clipped) come back as 0-d tensors on the device.

    The training step reads them together with the loss in one transfer, so a CUDA step waits
    for the device once, not once per measurement.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {', '.join(CLIP_MODES)}, not {mode!r}")
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
    if mode == "norm":
        clipped = norm > threshold
        # as clip_grad_norm_ does, with the norm already known; a factor of exactly 1 leaves gradients as they are
        torch._foreach_mul_(grads, (threshold / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
    elif mode == "value":
        clipped = torch.stack([g.abs().amax() for g in grads]).amax() > threshold
        torch._foreach_clamp_min_(grads, -threshold)
        torch._foreach_clamp_max_(grads, threshold)
    elif mode == "agc":
        clipped = adaptive_clip_(agc_parameters(model, num_classes), threshold)
    else:
        clipped = torch.zeros((), dtype=torch.bool, device=norm.device)
    return norm, clipped


def agc_parameters(model: nn.Module, num_classes: int) -> list[nn.Parameter]:
    """Every parameter except those of classifier layers (Linear with num_classes outputs)."""
    excluded = {id(p) for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
                for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in excluded]


@torch.no_grad()
def adaptive_clip_(parameters: list[nn.Parameter], threshold: float) -> torch.Tensor:
    """Unit-wise AGC in place; returns whether any unit was clipped (a 0-d bool tensor, no host sync)."""
    clipped = []
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unit_norms(p).clamp_min(AGC_EPS) * threshold
        grad_norm = unit_norms(p.grad)
        scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        clipped.append((scale < 1).any())
        p.grad.mul_(scale)
    return torch.stack(clipped).any() if clipped else torch.tensor(False)


def unit_norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per unit, shaped to broadcast against `x`: per output row of a matrix or kernel
    (conv N x C x k x k -> N x 1 x 1 x 1), over the whole tensor for a vector or scalar (0-d)."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)
