"""Fine-tuning controls: freeze the layers below a named one, and give the classifier its own learning rate.

`freeze_below(model, "inception4e", layout)` stops every parameter registered before that layer
from training (`requires_grad = False`, so the optimizer never holds them) and keeps those layers'
batch norm in eval mode for good: in train mode a frozen layer's batch norm would normalise with
each batch's statistics, a different function from the one the layers above were trained on, and
overwrite the pretrained running statistics. The heads (classifier layers and auxiliary heads)
always train, wherever they are registered: Inception-v3 registers its auxiliary head between
Mixed_6e and Mixed_7a.

`parameter_groups` puts the trainable parameters into optimizer groups: weight decay only on
weights of rank > 1, and with `head_lr_scale` the classifier layers in groups of their own whose
`lr_scale` the training loop multiplies the learning rate by (a new head on pretrained features
may move faster than the features should).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from training.pretrained import Layout, under


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode whatever `train()` is asked: it normalises with its running
    statistics and never updates them. Its state dict is a BatchNorm2d's, so checkpoints, export (which
    rebuilds plain models) and resuming see no difference."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


@dataclass
class FreezeReport:
    layer: str
    frozen: list[str]  # parameter names
    frozen_batch_norms: int
    trainable: int  # parameters (elements) left to train
    frozen_elements: int

    def line(self) -> str:
        return (f"training from {self.layer} on: {len(self.frozen)} parameter tensors frozen "
                f"({self.frozen_elements:,} weights, {self.frozen_batch_norms} batch norms held in eval mode), "
                f"{self.trainable:,} weights train")


def layer_names(model: nn.Module, layout: Layout) -> list[str]:
    """The layers `--trainable-from` is meant to name, in order (AlexNet's are inside features/classifier)."""
    names = []
    for name, child in model.named_children():
        if under(name, layout.aux_heads) or not any(True for _ in child.parameters()):
            continue
        named_parts = [n for n, c in child.named_children() if not n.isdigit() and any(True for _ in c.parameters())]
        names += [f"{name}.{n}" for n in named_parts] if isinstance(child, nn.Sequential) and named_parts else [name]
    return names


def freeze_below(model: nn.Module, layer: str, layout: Layout) -> FreezeReport:
    """Freeze every parameter registered before `layer`'s first one, except the heads'; hold the batch
    norms among them in eval mode (FrozenBatchNorm2d, swapped in place: the same parameters and buffers)."""
    modules = dict(model.named_modules())
    if layer not in modules or not any(True for _ in modules[layer].parameters()):
        raise ValueError(f"--trainable-from {layer!r}: no layer of that name with weights; the layers are "
                         f"{', '.join(layer_names(model, layout))} (or any module inside one)")
    if under(layer, layout.aux_heads):
        raise ValueError(f"--trainable-from {layer!r} is an auxiliary head, not a layer of the network's trunk")
    first = next(iter(modules[layer].parameters()))
    frozen = []
    for name, parameter in model.named_parameters():
        if parameter is first:
            break
        if not under(name, layout.heads):
            parameter.requires_grad_(False)
            frozen.append(name)
    batch_norms = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.weight is not None and not module.weight.requires_grad:
            module.__class__ = FrozenBatchNorm2d
            module.train(False)
            batch_norms += 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_elements = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return FreezeReport(layer, frozen, batch_norms, trainable, frozen_elements)


def parameter_groups(model: nn.Module, layout: Layout, weight_decay: float, head_lr_scale: float = 1.0) -> list[dict]:
    """Trainable parameters in optimizer groups, each with `weight_decay` and `lr_scale`.

    Weight decay on batch-norm scales/shifts and biases only shrinks them toward a worse fit: it goes
    to weights of rank > 1 only. With head_lr_scale 1 there are exactly two groups (decay, no decay),
    as in checkpoints written before the multiplier existed, so those still resume.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(False, True): [], (False, False): []}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            head = head_lr_scale != 1.0 and under(name, layout.classifier)
            groups.setdefault((head, parameter.ndim > 1), []).append(parameter)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": head_lr_scale if head else 1.0}
            for (head, decay), params in groups.items() if params or not head]
