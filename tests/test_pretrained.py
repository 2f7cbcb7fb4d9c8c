"""Initial weights from torchvision's files and Keel's checkpoints, checked against torchvision itself.

tests/fixtures/torchvision_manifest.json (every state-dict name and shape torchvision's models
have) and torchvision_reference.json (torchvision's logits on seeded weights and a seeded input)
were made by tools/torchvision_manifest.py with torchvision installed, since it does not import
beside the torch Keel pins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.torchvision_manifest import digest, seeded_pixels, seeded_state_dict
from training.config import TrainConfig
from training.models import MODELS, build_model
from training.pretrained import (
    LAYOUTS,
    TORCHVISION_ARCHS,
    WeightsError,
    initialise,
    keel_name,
    read_weights,
    resolve_preprocessing,
)

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "torchvision_manifest.json").read_text())["layouts"]
REFERENCE = json.loads((FIXTURES / "torchvision_reference.json").read_text())
# manifest layout -> Keel arch and builder arguments of the same layout
KEEL_OF = {
    "alexnet": ("alexnet", {}),
    "googlenet": ("inception_v1_bn", {"aux_logits": True}),
    "googlenet_no_aux": ("inception_v1_bn", {"aux_logits": False}),
    "inception_v3": ("inception_v3", {"aux_logits": True}),
    "inception_v3_no_aux": ("inception_v3", {"aux_logits": False}),
}
# Keel's model and torchvision's run the same operations on the same weights; what differs is the
# input's arithmetic (torchvision normalises with ImageNet's mean/std and transform_input maps that to
# [-1, 1]; Keel normalises with 0.5 directly), torch 2.14's kernels vs 2.13's, and the fixture's 7
# digits. Measured: 2e-7 to 4e-7 of the largest logit. Swapping two same-shaped tensors (15 random
# pairs per model) moved the logits by 1% of it or more.
LOGIT_TOLERANCE = 1e-5


def keel_meta_model(layout: str) -> torch.nn.Module:
    arch, kwargs = KEEL_OF[layout]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return MODELS[arch](num_classes=1000, **kwargs)


def torchvision_file(tmp_path: Path, layout: str, seed: int = 0, edit=None) -> Path:
    """A torchvision-format state dict of `layout` with seeded weights, saved as torch.save does."""
    state = seeded_state_dict(MANIFEST[layout]["state_dict"], seed)
    if edit:
        edit(state)
    path = tmp_path / f"{layout}-{seed}.pth"
    torch.save(state, path)
    return path


def test_every_architecture_has_a_layout():
    assert set(LAYOUTS) == set(MODELS)
    assert TORCHVISION_ARCHS == {"alexnet": "alexnet", "googlenet": "inception_v1_bn", "inception_v3": "inception_v3"}


@pytest.mark.parametrize("layout", list(KEEL_OF))
def test_key_map_covers_torchvision_one_to_one(layout):
    """Every name torchvision's state dict has maps to exactly one of Keel's, with the same shape,
    and every Keel name is reached: the table is checked against torchvision's own names."""
    arch, _ = KEEL_OF[layout]
    keel = {name: tuple(t.shape) for name, t in keel_meta_model(layout).state_dict().items()}
    mapped = {}
    for name, shape, _dtype in MANIFEST[layout]["state_dict"]:
        target = keel_name(name, LAYOUTS[arch])
        assert target is not None, f"{name}: no rule in the table"
        assert target not in mapped, f"{name} and {mapped[target][0]} both map to {target}"
        assert keel.get(target) == tuple(shape), f"{name} -> {target}: {shape} vs {keel.get(target)}"
        mapped[target] = (name, shape)
    assert set(mapped) == set(keel)


def test_leaf_names_are_anchored():
    """Only a name's last `.conv`/`.bn` is BasicConv2d's leaf: the aux head's own `conv` module stays."""
    googlenet = LAYOUTS["inception_v1_bn"]
    assert keel_name("aux1.conv.conv.weight", googlenet) == "aux1.conv.0.weight"
    assert keel_name("aux1.conv.bn.running_mean", googlenet) == "aux1.conv.1.running_mean"
    assert keel_name("inception4a.branch3.1.conv.weight", googlenet) == "inception4a.branch3.1.0.weight"
    assert keel_name("features.10.weight", LAYOUTS["alexnet"]) == "features.conv5.0.weight"
    assert keel_name("features.1.weight", LAYOUTS["alexnet"]) is None  # a ReLU has no weights
    assert keel_name("featuresX0.weight", LAYOUTS["alexnet"]) is None  # dots are dots
    assert keel_name("conv1.conv.weight.extra", googlenet) is None
    assert keel_name("AuxLogits.conv1.conv.weight", LAYOUTS["inception_v3"]) == "AuxLogits.conv1.0.weight"


@pytest.mark.parametrize("name", list(REFERENCE["models"]))
def test_logits_match_torchvision_on_the_same_weights(name, tmp_path):
    """torchvision's logits (recorded with torchvision) = Keel's, with the weights loaded via --init-from's
    path and the input normalised as the weights' preprocessing says (mean = std = 0.5 for GoogLeNet and
    Inception-v3, where torchvision's model applied transform_input to ImageNet-normalised input)."""
    reference = REFERENCE["models"][name]
    state = seeded_state_dict(MANIFEST[reference["layout"]]["state_dict"], REFERENCE["seed"])
    pixels = seeded_pixels(reference["size"], REFERENCE["seed"])
    # the generators give torch 2.14's exact tensors under this torch too, or the comparison means nothing
    assert digest(state) == reference["weights_sha256"] and digest(pixels) == reference["pixels_sha256"]
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)

    arch, kwargs = KEEL_OF[reference["layout"]]
    weights = read_weights(path, arch)
    model = build_model(arch, num_classes=1000, **kwargs)
    report = initialise(model, weights, [f"class{i}" for i in range(1000)])
    assert weights.preprocessing.crop == reference["size"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (weights.preprocessing.mean, weights.preprocessing.std))
    with torch.no_grad():
        logits = model.eval()((pixels - mean) / std)
    expected = torch.tensor(reference["logits"])
    torch.testing.assert_close(logits, expected, rtol=0, atol=LOGIT_TOLERANCE * float(expected.abs().max()))
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()
    if name == "googlenet":  # the released layout: aux heads in the file, not trained, dropped
        assert report.dropped and all(n.startswith(("aux1.", "aux2.")) for n in report.dropped)
        assert report.fresh and all(n.startswith(("aux1.", "aux2.")) for n in report.fresh)


@pytest.mark.parametrize("layout, size", [("alexnet", 64), ("googlenet_no_aux", 64), ("inception_v3", 80)])
def test_init_from_gives_the_files_tensors_and_the_direct_loads_logits(layout, size, tmp_path):
    """A random torchvision-format file -> read + initialise: every tensor identical to the file's under
    the map, and the logits identical to the same weights put into the model directly."""
    arch, kwargs = KEEL_OF[layout]
    path = torchvision_file(tmp_path, layout, seed=7)
    state = torch.load(path, weights_only=True)
    via_init = build_model(arch, num_classes=1000, **kwargs)
    report = initialise(via_init, read_weights(path, arch), [str(i) for i in range(1000)])
    assert not report.reinitialised and not report.fresh and not report.dropped
    assert len(report.loaded) == len(state)
    loaded = via_init.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[keel_name(name, LAYOUTS[arch])], tensor), name

    direct = build_model(arch, num_classes=1000, **kwargs)
    direct.load_state_dict({keel_name(name, LAYOUTS[arch]): tensor for name, tensor in state.items()})
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(via_init.eval()(x), direct.eval()(x))


def test_other_classes_reinitialise_the_classifiers_and_the_log_says_so(tmp_path):
    path = torchvision_file(tmp_path, "googlenet")  # the released layout: with aux heads
    model = build_model("inception_v1_bn", num_classes=10, aux_logits=True)
    fresh_fc = model.fc.weight.detach().clone()
    report = initialise(model, read_weights(path, "inception_v1_bn"), [str(i) for i in range(10)])
    assert report.reinitialised == ["fc.weight", "fc.bias"]
    assert torch.equal(model.fc.weight, fresh_fc)  # the new head keeps its fresh initialisation
    # torchvision's aux heads were never trained: dropped from the file, fresh in the model
    assert {n.split(".")[0] for n in report.dropped} == {"aux1", "aux2"} and len(report.dropped) == 20
    assert {n.split(".")[0] for n in report.fresh} == {"aux1", "aux2"}
    lines = "\n".join(report.lines())
    assert "re-initialised (10 classes here, other classes in the file): fc (2 tensors)" in lines
    assert "dropped (not trained in torchvision's file): aux1 (10 tensors), aux2 (10 tensors)" in lines
    assert f"{len(report.loaded)} tensors loaded" in lines
    record = report.record()
    assert record["source"] == "torchvision googlenet" and record["file"] == path.name
    assert len(record["sha256"]) == 64 and record["reinitialised"] == ["fc.weight", "fc.bias"]


def test_inception_v3_aux_head_is_loaded_when_the_model_has_one(tmp_path):
    path = torchvision_file(tmp_path, "inception_v3")
    with_aux = build_model("inception_v3", num_classes=1000, aux_logits=True)
    report = initialise(with_aux, read_weights(path, "inception_v3"), [str(i) for i in range(1000)])
    assert not report.dropped and not report.fresh  # trained in the released file: kept
    without = build_model("inception_v3", num_classes=5, aux_logits=False)
    report = initialise(without, read_weights(path, "inception_v3"), list("abcde"))
    assert report.reinitialised == ["fc.weight", "fc.bias"]  # AuxLogits.fc is dropped with its head
    assert report.dropped and all(n.startswith("AuxLogits.") for n in report.dropped)
    assert "the model has no auxiliary heads" in "\n".join(report.lines())


def test_files_without_num_batches_tracked_or_wrapped_by_a_training_script_load(tmp_path):
    def drop_counts(state):
        for name in [n for n in state if n.endswith("num_batches_tracked")]:
            del state[name]

    bare = torchvision_file(tmp_path, "googlenet_no_aux", edit=drop_counts)
    model = build_model("inception_v1_bn", num_classes=1000)
    initialise(model, read_weights(bare, "inception_v1_bn"), [str(i) for i in range(1000)])
    state = torch.load(bare, weights_only=True)
    wrapped = tmp_path / "checkpoint.pth"  # as torchvision's reference train.py saves, after DDP
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": torch.tensor(3)}, wrapped)
    again = build_model("inception_v1_bn", num_classes=1000)
    initialise(again, read_weights(wrapped, "inception_v1_bn"), [str(i) for i in range(1000)])
    assert torch.equal(again.inception5b.branch1[0].weight, model.inception5b.branch1[0].weight)


def drop(name):
    return lambda state: state.pop(name)


# case -> (arch, the words the error must contain, how to make the file: a layout and an edit, or a writer)
BAD_FILES = {
    "missing_file": ("inception_v1_bn", "no such weights file", None),
    "corrupt": ("inception_v1_bn", "not a readable weights file", lambda p: p.write_bytes(b"not a torch file")),
    "not_a_state_dict": ("inception_v1_bn", "neither a Keel checkpoint nor a state dict",
                         lambda p: torch.save([1, 2, 3], p)),
    "unexpected_key": ("inception_v1_bn", "unexpected key extra.weight",
                       ("googlenet_no_aux", lambda s: s.update({"extra.weight": torch.zeros(1)}))),
    "missing_key": ("inception_v1_bn", "missing inception4c.branch2.1.0.weight",
                    ("googlenet_no_aux", drop("inception4c.branch2.1.conv.weight"))),
    "wrong_shape": ("inception_v1_bn", "conv3.0.weight is [192, 64, 2, 2] in the file, [192, 64, 3, 3]",
                    ("googlenet_no_aux", lambda s: s.update({"conv3.conv.weight": torch.zeros(192, 64, 2, 2)}))),
    "other_model": ("inception_v3", "looks like torchvision's googlenet: use --arch inception_v1_bn",
                    ("googlenet_no_aux", None)),
    "no_torchvision_model": ("alexnet_bn", "torchvision has no alexnet_bn", ("alexnet", None)),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_files_that_do_not_fit_are_refused_naming_the_file_and_the_key(case, tmp_path):
    arch, expected, make = BAD_FILES[case]
    path = tmp_path / f"{case}.pth"
    if isinstance(make, tuple):
        path = torchvision_file(tmp_path, make[0], edit=make[1]).rename(path)
    elif make:
        make(path)
    with pytest.raises(WeightsError) as error:
        weights = read_weights(path, arch)
        initialise(build_model(arch, num_classes=1000), weights, [str(i) for i in range(1000)])
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value), str(error.value)


def test_keel_checkpoint_of_the_same_arch_keeps_its_classifier_only_for_the_same_labels(small_run):
    best = small_run / "best.pt"
    checkpoint = torch.load(best, weights_only=True)
    weights = read_weights(best, "alexnet_bn")
    assert weights.source == "keel alexnet_bn" and weights.labels == checkpoint["labels"]
    same = build_model("alexnet_bn", **checkpoint["model_args"])
    report = initialise(same, weights, checkpoint["labels"])
    assert not report.reinitialised and len(report.loaded) == len(checkpoint["state_dict"])
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(same.state_dict()[name], tensor), name
    # another task with as many classes: the old classifier would answer the old classes' names
    other = build_model("alexnet_bn", **checkpoint["model_args"])
    report = initialise(other, weights, [f"new{i}" for i in range(10)])
    assert report.reinitialised == ["classifier.fc3.weight", "classifier.fc3.bias"]
    with pytest.raises(WeightsError, match="a Keel checkpoint of alexnet_bn, not inception_v3"):
        read_weights(best, "inception_v3")
    wider = build_model("alexnet_bn", **{**checkpoint["model_args"], "width": 0.25})
    with pytest.raises(WeightsError, match="it was built with .*'width': 0.125"):
        initialise(wider, weights, checkpoint["labels"])


def test_preprocessing_comes_with_the_weights_unless_the_config_says_otherwise(tmp_path):
    config = TrainConfig(data="d", out="o", arch="inception_v3")
    assert resolve_preprocessing(config, None).image_size == 224 and config.resize_to == 256  # no weights: ImageNet's
    v3 = read_weights(torchvision_file(tmp_path, "inception_v3_no_aux"), "inception_v3")
    resolved = resolve_preprocessing(config, v3, log=lambda m: None)
    assert (resolved.image_size, resolved.resize_to, resolved.mean, resolved.std) == (299, 342, (0.5,) * 3, (0.5,) * 3)
    notes = []
    smaller = resolve_preprocessing(TrainConfig(data="d", out="o", image_size=160), v3, log=notes.append)
    assert (smaller.image_size, smaller.resize_to, smaller.mean) == (160, 183, (0.5,) * 3)
    assert any("trained at 299 px" in note for note in notes)
    with pytest.raises(ValueError, match=r"differ from the normalisation the weights .* were trained with"):
        resolve_preprocessing(TrainConfig(data="d", out="o", mean=(0.4, 0.4, 0.4)), v3)
    alexnet = read_weights(torchvision_file(tmp_path, "alexnet"), "alexnet")
    resolved = resolve_preprocessing(TrainConfig(data="d", out="o", arch="alexnet"), alexnet, log=lambda m: None)
    assert (resolved.image_size, resolved.resize_to, resolved.mean) == (224, 256, (0.485, 0.456, 0.406))
