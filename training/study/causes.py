"""The causes, each varied alone: what makes a plain deep CNN's gradients explode or vanish.

A plain CNN (3x3 convs, no batch norm, no residual connections, one linear classifier on the
flattened last map) on the shapes images at 32 px, trained with plain SGD (Nesterov momentum 0.9, no
clipping, no warmup, no guard) for a fixed number of steps from a base setting, with one factor
changed at a time: weight initialisation scale, activation, depth, learning rate, each from
several seeds (initial weights and batch order). Every step
records the loss, the global gradient norm and each layer's gradient and weight norm; a run that
reaches a non-finite loss or gradient stops there (its weights would be NaN from the next step
on); a run diverged when that happened or when its loss rose above 5x max(running median, ln 10),
the test Keel's guard applies (training/stability.py).

This is the textbook experiment (Glorot & Bengio 2010; He et al. 2015; Pascanu et al. 2013), not a
Keel training run, so it has its own twenty-line loop instead of `training.train`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from training.stability import DivergenceMonitor

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
FACTORS = {"init_scale": "weight initialisation scale", "activation": "activation", "depth": "depth",
           "lr": "learning rate"}


@dataclass(frozen=True)
class CausesConfig:
    image_size: int = 32
    channels: int = 16
    train_images: int = 2000  # a fixed random subset of the training split, centre-cropped, no augmentation
    # Long enough to see each setting blow up or not, not to train it: the table shows the training
    # loss at the end against chance level, ln 10 = 2.30, to tell learning from stuck.
    batch_size: int = 32
    steps: int = 500
    depth: int = 8  # the base setting ...
    activation: str = "relu"
    init_scale: float = 1.0  # times He et al.'s std, sqrt(2 / fan_in)
    lr: float = 0.01
    depths: tuple[int, ...] = (4, 8, 16)  # ... and the values each factor takes, the others at base
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid")
    init_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    record_layers_at: tuple[int, ...] = (1, 10)  # per-layer norms kept in the results at these steps and the last

    def base(self) -> dict:
        return {"depth": self.depth, "activation": self.activation, "init_scale": self.init_scale, "lr": self.lr}

    def settings(self) -> dict[str, dict]:
        """Every distinct setting: the base with one factor changed, named like "depth=16"."""
        values = {"init_scale": self.init_scales, "activation": self.activations, "depth": self.depths,
                  "lr": self.lrs}
        settings = {}
        for factor, choices in values.items():
            for value in choices:
                setting = {**self.base(), factor: value}
                settings[setting_name(setting, self.base())] = setting
        return settings


def setting_name(setting: dict, base: dict) -> str:
    changed = [f"{k}={v}" for k, v in setting.items() if v != base[k]]
    return ",".join(changed) or "base"


class PlainCNN(nn.Module):
    """`depth` 3x3 convs with biases (stride 2 at the first and the middle one), each followed by the
    activation; a linear classifier on the flattened last map, as in AlexNet and VGG. No normalisation,
    no skip connections. (A global average pool in its place learned nothing in 800 steps of the
    base setting: the shapes differ in where edges are, which the pool throws away.)"""

    def __init__(self, depth: int, channels: int, activation: str, image_size: int, num_classes: int = 10):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(depth):
            stride = 2 if i in (0, depth // 2) else 1
            layers[f"conv{i + 1}"] = nn.Conv2d(3 if i == 0 else channels, channels, 3, stride=stride, padding=1)
            layers[f"act{i + 1}"] = ACTIVATIONS[activation]()
        self.features = nn.Sequential(layers)  # N x C x S/4 x S/4
        self.fc = nn.Linear(channels * (image_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))  # N x C*(S/4)^2 -> N x num_classes

    def init_weights(self, scale: float) -> None:
        """N(0, (scale * gain)^2 / fan_in), biases 0: He et al. (gain sqrt 2) for the convs at scale 1,
        LeCun (gain 1) for the classifier."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                gain = math.sqrt(2.0) if isinstance(module, nn.Conv2d) else 1.0
                nn.init.normal_(module.weight, 0.0, scale * gain / math.sqrt(fan_in))
                nn.init.zeros_(module.bias)


def make_data(data: Path, out: Path, config: CausesConfig) -> Path:
    """The training images the causes use, preprocessed once into one tensor file."""
    from service.preprocessing import PreprocessSpec
    from training.data import ImageFolder, PixelNormalizer, find_classes

    spec = PreprocessSpec(resize=config.image_size, crop=config.image_size, mean=(0.485, 0.456, 0.406),
                          std=(0.229, 0.224, 0.225))
    classes = find_classes(data / "train")
    images = ImageFolder(data / "train", classes, spec)  # evaluation mode: resize and centre crop, uint8
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:config.train_images].tolist()
    samples = [images[i] for i in chosen]  # (S x S x 3 uint8, label, unreadable files)
    pixels = PixelNormalizer(spec)(torch.stack([image for image, _, _ in samples]))  # N x 3 x S x S
    torch.save((pixels, torch.tensor([label for _, label, _ in samples])), out)
    return out


@lru_cache(maxsize=1)
def load_data(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.load(path)


def run_cause(data_path: str, config: CausesConfig, name: str, setting: dict, seed: int) -> dict:
    """Train one setting from one seed; returns what the page needs (rounded, to keep the JSON small)."""
    x, y = load_data(data_path)
    torch.manual_seed(seed)
    model = PlainCNN(setting["depth"], config.channels, setting["activation"], config.image_size)
    model.init_weights(setting["init_scale"])
    optimizer = torch.optim.SGD(model.parameters(), lr=setting["lr"], momentum=0.9, nesterov=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    losses, norms, layers_at, stopped_step, blowup_step = [], [], {}, None, None
    keep = set(config.record_layers_at)
    monitor = DivergenceMonitor(max_skips=1, window=1, loss_factor=5.0, num_classes=10)
    for step in range(1, config.steps + 1):
        start = (step - 1) * config.batch_size % (len(x) - config.batch_size + 1)
        batch = order[start:start + config.batch_size]
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.norm() for p in model.parameters()]
        norm = torch.linalg.vector_norm(torch.stack(grads)).item()
        finite = math.isfinite(loss.item()) and math.isfinite(norm)
        losses.append(round4(loss.item()))
        norms.append(round4(norm))
        if step in keep or not finite or step == config.steps:
            layers_at[step] = layer_norms(model)
        if blowup_step is None and (not finite or monitor.observe(step, loss.item())):
            blowup_step = step
        if not finite:
            stopped_step = step
            break
        optimizer.step()
    return {"setting": name, "seed": seed, "blowup_step": blowup_step, "stopped_step": stopped_step, "loss": losses,
            "grad_norm": norms, "layers_at": layers_at}


def layer_norms(model: PlainCNN) -> dict[str, list]:
    """Per layer (convs from the input on, then the classifier): gradient norm and weight norm."""
    modules = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    grads = [math.sqrt(sum(p.grad.pow(2).sum().item() for p in m.parameters())) for m in modules]
    weights = [math.sqrt(sum(p.detach().pow(2).sum().item() for p in m.parameters())) for m in modules]
    return {"grad": [round4(g) for g in grads], "weight": [round4(w) for w in weights]}


def round4(value: float) -> float | None:
    """Four significant digits (the JSON holds thousands of these); None for inf or NaN."""
    return float(f"{value:.4g}") if math.isfinite(value) else None
