"""Initial weights from a file: a torchvision state dict, or a Keel checkpoint of the same architecture.

`python -m training --init-from FILE` and `python -m training.convert` both go through here:

    read_weights(FILE, arch)      the file, its sha256, its tensors under Keel's names, the
                                  preprocessing the weights expect, and their labels when known
    resolve_preprocessing(...)    the training config with that preprocessing filled in
    initialise(model, weights)    the tensors copied into a freshly built model; returns what was
                                  loaded, re-initialised, initialised fresh and dropped

torchvision -> Keel names. The models in `training.models` have torchvision's layouts, module for
module, but name some modules differently; the map is an explicit table per architecture of
anchored patterns (`re.fullmatch`), listing every module path it accepts:

  * `BasicConv2d`'s leaves `.conv` / `.bn` are `ConvBNReLU`'s `.0` / `.1`: only the last `.conv` of a
    name is the leaf, so GoogLeNet's `aux1.conv.conv.weight` becomes `aux1.conv.0.weight`;
  * AlexNet's `nn.Sequential` indices are named layers: `features.3` is `features.conv2.0`,
    `classifier.4` is `classifier.fc2`;
  * everything else (`fc`, `aux1.fc1`, `AuxLogits.fc`, ...) keeps its name.

tests/test_pretrained.py checks the table against a manifest of torchvision's own state dicts
(tests/fixtures/, made by tools/torchvision_manifest.py with torchvision installed) and Keel's
logits against torchvision's on the same weights.

What the weights expect. torchvision's GoogLeNet and Inception-v3 weights were ported from
TensorFlow and take pixels scaled to [-1, 1]: torchvision normalises with ImageNet's mean/std,
and the model's `transform_input=True` maps that back to (x - 0.5) / 0.5. Keel's models have no
transform_input, so their preprocessing is mean = std = 0.5, the same input; Inception-v3's is a
299 px crop of a 342 px resize. A Keel checkpoint carries its own preprocessing.

Which tensors are not loaded:
  * the classifier layers (and the auxiliary classifiers) when the data has other classes: a Keel
    checkpoint knows its labels, so any other list of labels re-initialises them; a torchvision
    file does not, so only a different class count does (1000 classes are taken to be ImageNet's,
    in the order of the folders);
  * GoogLeNet's auxiliary heads in torchvision's file, which were never trained (torchvision says
    so when they are asked for): dropped, and a model with aux_logits=True starts them fresh;
  * auxiliary heads the model does not have (aux_logits=False): dropped. Heads the model has and
    the file lacks start fresh.
Any other key the file has and the model lacks, or the other way round, or a shape that differs,
is an error naming it. `num_batches_tracked` may be absent (older files lack it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from service.preprocessing import PreprocessSpec
from training.checkpoint import FORMAT, CheckpointError, check_checkpoint

HALF = (0.5, 0.5, 0.5)
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _basic_conv_map(convs: str, linears: str) -> tuple[tuple[str, str], ...]:
    """torchvision's BasicConv2d (`.conv`, `.bn`) at the module paths `convs`, Linear layers at `linears`."""
    return ((rf"({convs})\.conv\.weight", r"\1.0.weight"),
            (rf"({convs})\.bn\.{_BN}", r"\1.1.\2"),
            (rf"({linears})\.(weight|bias)", r"\1.\2"))


# AlexNet: torchvision's Sequential indices -> Keel's named layers (the ReLUs, pools, dropouts between have no weights)
ALEXNET_KEYS = tuple((re.escape(index) + r"\.(weight|bias)", name + r".\1") for index, name in [
    ("features.0", "features.conv1.0"), ("features.3", "features.conv2.0"), ("features.6", "features.conv3.0"),
    ("features.8", "features.conv4.0"), ("features.10", "features.conv5.0"),
    ("classifier.1", "classifier.fc1"), ("classifier.4", "classifier.fc2"), ("classifier.6", "classifier.fc3")])
GOOGLENET_KEYS = _basic_conv_map(
    convs=r"conv[1-3]|inception(?:3[ab]|4[a-e]|5[ab])\.branch(?:1|[23]\.[01]|4\.1)|aux[12]\.conv",
    linears=r"fc|aux[12]\.fc[12]")
INCEPTION_V3_KEYS = _basic_conv_map(
    convs=r"Conv2d_(?:1a_3x3|2a_3x3|2b_3x3|3b_1x1|4a_3x3)|Mixed_(?:5[bcd]|6[a-e]|7[abc])\.branch\w+"
          r"|AuxLogits\.conv[01]",
    linears=r"fc|AuxLogits\.fc")


@dataclass(frozen=True)
class Layout:
    """What loading and fine-tuning need to know about an architecture beyond its modules."""

    classifier: tuple[str, ...]  # layers whose outputs are class scores (main and auxiliary)
    aux_heads: tuple[str, ...] = ()  # training-only side heads (absent with aux_logits=False)
    torchvision: str | None = None  # torchvision's model of the same layout, if any
    key_map: tuple[tuple[str, str], ...] = ()  # torchvision name pattern -> Keel name (re.fullmatch, expand)
    untrained: tuple[str, ...] = ()  # modules whose tensors in torchvision's released file were never trained
    preprocessing: PreprocessSpec | None = None  # what torchvision's released weights expect

    @property
    def heads(self) -> tuple[str, ...]:
        return self.classifier + self.aux_heads


LAYOUTS = {
    "alexnet": Layout(classifier=("classifier.fc3",), torchvision="alexnet", key_map=ALEXNET_KEYS,
                      preprocessing=PreprocessSpec(resize=256, crop=224)),
    "alexnet_bn": Layout(classifier=("classifier.fc3",)),  # torchvision has no AlexNet with batch norm
    "inception_v1_bn": Layout(classifier=("fc", "aux1.fc2", "aux2.fc2"), aux_heads=("aux1", "aux2"),
                              torchvision="googlenet", key_map=GOOGLENET_KEYS, untrained=("aux1", "aux2"),
                              preprocessing=PreprocessSpec(resize=256, crop=224, mean=HALF, std=HALF)),
    "inception_v3": Layout(classifier=("fc", "AuxLogits.fc"), aux_heads=("AuxLogits",),
                           torchvision="inception_v3", key_map=INCEPTION_V3_KEYS,
                           preprocessing=PreprocessSpec(resize=342, crop=299, mean=HALF, std=HALF)),
}
# torchvision's model name -> Keel's arch, for the converter's --arch
TORCHVISION_ARCHS = {layout.torchvision: arch for arch, layout in LAYOUTS.items() if layout.torchvision}

Log = Callable[[str], None]


class WeightsError(ValueError):
    """A weights file that cannot initialise the model; the message starts with its path."""


def under(name: str, modules: tuple[str, ...]) -> bool:
    """Whether the tensor or module `name` belongs to one of `modules` (dotted paths)."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def layout_of(arch: str) -> Layout:
    if arch not in LAYOUTS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[arch]


def keel_name(torchvision_name: str, layout: Layout) -> str | None:
    """The Keel name of one torchvision state-dict key, or None when no rule of the table takes it."""
    for pattern, template in layout.key_map:
        match = re.fullmatch(pattern, torchvision_name)
        if match:
            return match.expand(template)
    return None


@dataclass
class Weights:
    """A weights file read and renamed to Keel's names, before it meets a model."""

    path: Path
    sha256: str
    source: str  # "torchvision googlenet", "keel inception_v1_bn"
    tensors: dict[str, torch.Tensor]  # Keel names
    preprocessing: PreprocessSpec  # what the weights expect
    labels: list[str] | None  # a Keel checkpoint's classes; None for torchvision's files
    layout: Layout
    model_args: dict | None = None  # a Keel checkpoint's builder arguments

    def record(self) -> dict:
        """Where the weights came from, for checkpoints and the ONNX metadata."""
        return {"file": self.path.name, "sha256": self.sha256, "source": self.source}


def read_weights(path: str | Path, arch: str) -> Weights:
    """Read FILE as initial weights for `arch`, or raise WeightsError naming it."""
    path, layout = Path(path), layout_of(arch)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: not a readable weights file (truncated or corrupt, or a whole pickled model "
                           f"rather than its state_dict()?): {reason[:200]}") from None
    digest = sha256_of(path)
    if isinstance(loaded, dict) and loaded.get("format") == FORMAT:
        try:
            checkpoint = check_checkpoint(loaded, path)
        except CheckpointError as exc:
            raise WeightsError(str(exc)) from None
        if checkpoint["arch"] != arch:
            raise WeightsError(f"{path}: a Keel checkpoint of {checkpoint['arch']}, not {arch}: --init-from takes "
                               "a checkpoint of the same architecture")
        return Weights(path, digest, f"keel {arch}", dict(checkpoint["state_dict"]),
                       PreprocessSpec.from_dict(checkpoint["preprocessing"]), list(checkpoint["labels"]), layout,
                       dict(checkpoint["model_args"]))
    state = plain_state_dict(loaded, path)
    if layout.torchvision is None:
        raise WeightsError(f"{path}: a plain state dict, read as torchvision's, but torchvision has no {arch} "
                           f"(it has {', '.join(f'{tv} -> {a}' for tv, a in TORCHVISION_ARCHS.items())})")
    tensors, unknown = {}, []
    for name, tensor in state.items():
        mapped = keel_name(name, layout)
        if mapped is None:
            unknown.append(name)
        else:
            tensors[mapped] = tensor
    if unknown:
        keys = "keys" if len(unknown) > 1 else "key"
        raise WeightsError(f"{path}: not torchvision's {layout.torchvision} layout: unexpected {keys} "
                           f"{listing(unknown)}{guess_torchvision_model(state, arch)}")
    return Weights(path, digest, f"torchvision {layout.torchvision}", tensors, layout.preprocessing, None, layout)


def plain_state_dict(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a torchvision-style file: the file itself, or what a training script wrapped it in
    ({"model": ...} as torchvision's reference scripts save, {"state_dict": ...}), without DDP's `module.`."""
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path}: neither a Keel checkpoint nor a state dict (a mapping of names to tensors)")
    if all(name.startswith("module.") for name in loaded):
        loaded = {name.removeprefix("module."): tensor for name, tensor in loaded.items()}
    return dict(loaded)


def guess_torchvision_model(state: dict, arch: str) -> str:
    """A hint when a state dict fits another architecture's table completely."""
    for other, layout in LAYOUTS.items():
        if other != arch and layout.key_map and all(keel_name(name, layout) for name in state):
            return f"; it looks like torchvision's {layout.torchvision}: use --arch {other}"
    return ""


@dataclass
class InitReport:
    """What `initialise` did with each tensor of the model and of the file."""

    weights: Weights
    loaded: list[str]
    reinitialised: list[str]  # classifier layers, for another set of classes
    fresh: list[str]  # auxiliary heads the file has no trained weights for
    dropped: list[str]  # tensors of the file the model does not use
    reasons: dict[str, str]  # why each of the last three groups is what it is

    def record(self) -> dict:
        """Stored in the checkpoint as `init_from`: the source and every tensor not loaded (the rest were)."""
        return {**self.weights.record(), "loaded": len(self.loaded), "reinitialised": self.reinitialised,
                "initialised_fresh": self.fresh, "dropped": self.dropped}

    def lines(self) -> list[str]:
        lines = [f"initial weights from {self.weights.path} ({self.weights.source}, sha256 "
                 f"{self.weights.sha256[:12]}): {plural(len(self.loaded), 'tensor')} loaded"]
        for title, names in (("re-initialised", self.reinitialised), ("initialised fresh", self.fresh),
                             ("dropped", self.dropped)):
            if names:
                lines.append(f"  {title} ({self.reasons[title]}): {grouped(names)}")
        return lines


def initialise(model: nn.Module, weights: Weights, labels: list[str], reinitialise: bool = True) -> InitReport:
    """Copy `weights` into `model` (freshly built for `labels`), or raise WeightsError naming every
    tensor that does not fit. `reinitialise=False` (the converter) makes a classifier for other
    classes an error instead of a fresh layer."""
    layout, path = weights.layout, weights.path
    target = model.state_dict()
    other_classes = (weights.labels is not None and weights.labels != list(labels)) or any(
        name in weights.tensors and tuple(weights.tensors[name].shape) != tuple(target[name].shape)
        for name in target if under(name, layout.classifier))
    if other_classes and not reinitialise:
        outputs = weights.tensors.get(f"{layout.classifier[0]}.bias")
        raise WeightsError(f"{path}: its classifier has {len(outputs) if outputs is not None else '?'} outputs, "
                           f"for {len(labels)} labels")
    untrained = layout.untrained if weights.labels is None else ()  # torchvision's file only
    state, loaded, reinitialised, dropped, fresh, problems = {}, [], [], [], [], []
    for name, tensor in weights.tensors.items():
        if under(name, untrained) or (name not in target and under(name, layout.aux_heads)):
            dropped.append(name)
        elif name not in target:
            problems.append(f"unexpected {name}")
        elif under(name, layout.classifier) and other_classes:
            reinitialised.append(name)
        elif tuple(tensor.shape) != tuple(target[name].shape):
            problems.append(f"{name} is {list(tensor.shape)} in the file, {list(target[name].shape)} in the model")
        else:
            state[name] = tensor.to(target[name].dtype)
            loaded.append(name)
    for name in target:
        if name in state or name in reinitialised or name.endswith(".num_batches_tracked"):
            continue  # (older files have no num_batches_tracked: the model's count stays)
        if under(name, layout.aux_heads):
            fresh.append(name)
        else:
            problems.append(f"missing {name}")
    if problems:
        hint = (f" (it was built with {weights.model_args})" if weights.model_args is not None
                else " (torchvision's weights are width 1.0)" if any(" in the file, " in p for p in problems) else "")
        raise WeightsError(f"{path}: does not fit {weights.source.split()[-1]} as built here{hint}: "
                           f"{listing(problems)}")
    model.load_state_dict({**target, **state})
    reasons = {
        "re-initialised": f"{len(labels)} classes here, other classes in the file",
        "initialised fresh": ("not trained in torchvision's file" if any(under(n, untrained) for n in fresh)
                              else "not in the file"),
        "dropped": ("not trained in torchvision's file" if any(under(n, untrained) for n in dropped)
                    else "the model has no auxiliary heads"),
    }
    return InitReport(weights, loaded, reinitialised, fresh, dropped, reasons)


def resolve_preprocessing(config, weights: Weights | None, log: Log = print):
    """`config` (a TrainConfig) with the preprocessing the initial weights expect filled in.

    The input size is the config's when given, else the weights' (Inception-v3: a 299 px crop of a
    342 px resize), else 224 px. Mean and std are the weights' unless the config names others:
    the ImageNet defaults give way, anything else is an error, since a network sees its pretrained
    features only through the normalisation it was trained with.
    """
    from training.config import DEFAULT_IMAGE_SIZE, TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    changes = {}
    if weights is not None:
        wanted = weights.preprocessing
        if (config.mean, config.std) == (wanted.mean, wanted.std):
            pass
        elif (config.mean, config.std) == (fields["mean"], fields["std"]):
            changes.update(mean=wanted.mean, std=wanted.std)
        else:
            raise ValueError(f"--mean {config.mean} / --std {config.std} differ from the normalisation the weights in "
                             f"{weights.path} were trained with (mean {wanted.mean}, std {wanted.std}); leave them "
                             f"out to use the weights' own")
        if not config.image_size:
            changes["image_size"] = wanted.crop
            if not config.resize:
                changes["resize"] = wanted.resize
        elif config.image_size != wanted.crop:
            log(f"note: training at {config.image_size} px; the initial weights were trained at {wanted.crop} px")
    elif not config.image_size:
        changes["image_size"] = DEFAULT_IMAGE_SIZE
    if weights is not None and changes:
        described = ", ".join(f"{key} {value}" for key, value in changes.items())
        log(f"preprocessing from the initial weights: {described}")
    return dataclasses.replace(config, **changes) if changes else config


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def grouped(names: list[str]) -> str:
    """Tensor names grouped by module: `fc.weight, fc.bias` -> `fc (2 tensors)`; aux heads as a whole."""
    groups: dict[str, int] = {}
    for name in names:
        module = name.rsplit(".", 1)[0]
        for depth in (1, 2):  # aux heads and other large groups by their top module
            top = ".".join(name.split(".")[:depth])
            if top != module and sum(n.startswith(top + ".") for n in names) > 4:
                module = top
                break
        groups[module] = groups.get(module, 0) + 1
    return ", ".join(f"{module} ({plural(count, 'tensor')})" for module, count in groups.items())
