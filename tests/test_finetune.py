"""Fine-tuning: frozen layers stay frozen (batch norm in eval mode through the loop's train() calls), the
head gets its learning-rate multiplier, and a real run from initial weights records where they came from."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from tests.conftest import run_python
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.finetune import FrozenBatchNorm2d, freeze_below, layer_names, parameter_groups
from training.models import build_model
from training.precision import Precision
from training.pretrained import LAYOUTS
from training.train import Trainer, make_optimizer


def batch_norms(model: nn.Module, frozen: bool) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and (type(m) is FrozenBatchNorm2d) == frozen]


def test_layers_below_the_named_one_are_frozen_and_their_batch_norm_stays_in_eval_mode():
    torch.manual_seed(0)
    model = build_model("inception_v1_bn", num_classes=10, width=0.25, aux_logits=True)
    report = freeze_below(model, "inception4e", LAYOUTS["inception_v1_bn"])
    names = [name for name, _ in model.named_parameters()]
    trunk_order = [n.split(".")[0] for n in names]
    for name, parameter in model.named_parameters():
        top = name.split(".")[0]
        below = trunk_order.index(top) < trunk_order.index("inception4e") and top not in ("aux1", "aux2", "fc")
        assert parameter.requires_grad == (not below), name
    assert report.frozen[0] == "conv1.0.weight" and report.frozen[-1].startswith("inception4d.")
    assert report.frozen_batch_norms == len(batch_norms(model, frozen=True)) > 0
    assert "held in eval mode" in report.line()

    frozen_stats = [bn.running_mean.clone() for bn in batch_norms(model, frozen=True)]
    live_stats = [bn.running_mean.clone() for bn in batch_norms(model, frozen=False)]
    for _ in range(2):  # the loop calls model.train() every epoch
        model.train()
        model(torch.randn(4, 3, 64, 64))
    assert all(not bn.training for bn in batch_norms(model, frozen=True))
    assert all(bn.training for bn in batch_norms(model, frozen=False))
    assert all(torch.equal(bn.running_mean, before) for bn, before in zip(batch_norms(model, True), frozen_stats))
    assert not any(torch.equal(bn.running_mean, before) for bn, before in zip(batch_norms(model, False), live_stats))
    # the state dict is a plain model's: checkpoints and export rebuild it without FrozenBatchNorm2d
    plain = build_model("inception_v1_bn", num_classes=10, width=0.25, aux_logits=True)
    plain.load_state_dict(model.state_dict())


def test_heads_always_train_wherever_they_are_registered():
    """Inception-v3 registers its aux head before Mixed_7a; freezing below Mixed_7a must not freeze it."""
    model = build_model("inception_v3", num_classes=10, width=0.125, aux_logits=True)
    freeze_below(model, "Mixed_7a", LAYOUTS["inception_v3"])
    assert all(p.requires_grad for p in model.AuxLogits.parameters())
    assert not any(p.requires_grad for p in model.Mixed_6e.parameters())
    assert all(p.requires_grad for p in model.Mixed_7a.parameters())
    linear_probe = build_model("alexnet_bn", num_classes=10, width=0.25)
    freeze_below(linear_probe, "classifier.fc3", LAYOUTS["alexnet_bn"])
    assert [n for n, p in linear_probe.named_parameters() if p.requires_grad] == ["classifier.fc3.weight",
                                                                                "classifier.fc3.bias"]


def test_an_unknown_layer_is_an_error_listing_the_layers():
    model = build_model("alexnet_bn", num_classes=10, width=0.25)
    assert layer_names(model, LAYOUTS["alexnet_bn"])[:2] == ["features.conv1", "features.conv2"]
    with pytest.raises(ValueError, match=r"'features.conv9': no layer .* features.conv1, features.conv2"):
        freeze_below(model, "features.conv9", LAYOUTS["alexnet_bn"])
    with pytest.raises(ValueError, match="auxiliary head"):
        freeze_below(build_model("inception_v1_bn", num_classes=10, aux_logits=True), "aux1",
                     LAYOUTS["inception_v1_bn"])


def test_head_learning_rate_multiplier_reaches_the_optimizer_step():
    model = build_model("alexnet_bn", num_classes=10, width=0.125)
    assert [g["lr_scale"] for g in parameter_groups(model, LAYOUTS["alexnet_bn"], 5e-4)] == [1.0, 1.0]  # as before
    config = TrainConfig(data="d", out="o", arch="alexnet_bn", width=0.125, head_lr_scale=10.0, optimizer="sgd")
    optimizer = make_optimizer(model, config)
    heads = {id(model.classifier.fc3.weight), id(model.classifier.fc3.bias)}
    for group in optimizer.param_groups:
        assert group["lr_scale"] == (10.0 if {id(p) for p in group["params"]} <= heads else 1.0)
        assert group["weight_decay"] == (config.weight_decay if group["params"][0].ndim > 1 else 0.0)
    trainer = Trainer(model, optimizer, config, 10, Precision.create("fp32", torch.device("cpu")), None)
    trainer.train_step(torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]), lr=0.01)
    assert sorted({round(g["lr"], 6) for g in optimizer.param_groups}) == [0.01, 0.1]


@pytest.mark.slow
def test_fine_tuning_run_from_a_keel_checkpoint_keeps_the_frozen_layers_and_records_its_source(
        small_run, shapes_data, tmp_path):
    """--init-from a trained run's best.pt on a re-labelled task, backbone frozen: the frozen tensors (batch
    norm statistics included) leave training exactly as they came, the classifier is new, the checkpoint
    and the export say where the weights came from, and a resume checks the file is still the same."""
    import shutil

    from export.onnx_export import export_checkpoint
    from service.inference import OnnxClassifier

    task = tmp_path / "task"  # another task: five of the classes, under other names
    for split, count in (("train", 24), ("val", 4)):
        for folder in sorted((shapes_data / split).iterdir())[:5]:
            (task / split / f"new_{folder.name}").mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, task / split / f"new_{folder.name}" / image.name)
    source = small_run / "best.pt"
    args = ["-m", "training", "--recipe", "training/recipes/alexnet_bn.yaml", "--data", str(task),
            "--width", "0.125", "--epochs", "2", "--batch-size", "16", "--workers", "0",
            "--trainable-from", "classifier", "--head-lr-scale", "5", "--out", str(tmp_path / "run")]
    result = run_python(*args, "--init-from", str(source), "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert f"initial weights from {source} (keel alexnet_bn" in result.stderr
    assert "re-initialised (5 classes here, other classes in the file): classifier.fc3 (2 tensors)" in result.stderr
    assert "training from classifier on:" in result.stderr

    initial, tuned = load_checkpoint(source), load_checkpoint(tmp_path / "run" / "last.pt")
    for name, tensor in initial["state_dict"].items():
        if name.startswith("features."):
            assert torch.equal(tuned["state_dict"][name], tensor), name
        elif name.startswith("classifier.fc1."):
            assert not torch.equal(tuned["state_dict"][name], tensor), name
    assert tuned["state_dict"]["classifier.fc3.weight"].shape[0] == 5
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert tuned["init_from"]["sha256"] == digest and tuned["init_from"]["file"] == "best.pt"
    assert tuned["init_from"]["reinitialised"] == ["classifier.fc3.weight", "classifier.fc3.bias"]
    # the recipe's size (96 px), not that of the 64 px checkpoint the weights came from
    assert json.loads((tmp_path / "run" / "config.json").read_text())["image_size"] == 96

    resumed = run_python(*args, "--init-from", str(source), "--resume", str(tmp_path / "run" / "last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["init_from"]["sha256"] == digest
    other = tmp_path / "other.pt"
    shutil.copy(tmp_path / "run" / "best.pt", other)
    mismatch = run_python(*args, "--init-from", str(other), "--resume", str(tmp_path / "run" / "last.pt"))
    assert mismatch.returncode == 2 and "was not initialised from" in mismatch.stderr

    model = tmp_path / "model.onnx"
    export_checkpoint(tmp_path / "run" / "best.pt", model, log=lambda message: None)
    assert OnnxClassifier(model, device="cpu").info.init_from == {"file": "best.pt", "sha256": digest,
                                                                  "source": "keel alexnet_bn"}


@pytest.mark.slow
def test_training_from_a_torchvision_file_takes_its_tensors_and_preprocessing(tmp_path):
    """`python -m training --init-from` a torchvision GoogLeNet file (aux heads included, as released): the
    run normalises with the weights' mean = std = 0.5, the frozen layers end as the file's tensors, the
    classifier is new (10 classes, not 1000) and the untrained aux heads start fresh."""
    from tests.test_pretrained import torchvision_file
    from training.pretrained import keel_name
    from training.shapes import ShapesConfig, generate_dataset

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=2, val_per_class=1,
                                                            test_per_class=0), progress=False)
    weights = torchvision_file(tmp_path, "googlenet", seed=5)
    args = ["-m", "training", "--arch", "inception_v1_bn", "--data", str(data), "--out", str(tmp_path / "run"),
            "--image-size", "64", "--resize", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--model-args", '{"aux_logits": true}', "--trainable-from", "inception5a"]
    result = run_python(*args, "--init-from", str(weights))
    assert result.returncode == 0, result.stderr
    assert "preprocessing from the initial weights: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in result.stderr
    assert "note: training at 64 px; the initial weights were trained at 224 px" in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5]
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["preprocessing"]["mean"] == (0.5, 0.5, 0.5)
    record = checkpoint["init_from"]
    assert record["source"] == "torchvision googlenet" and record["reinitialised"] == ["fc.weight", "fc.bias"]
    assert {name.split(".")[0] for name in record["initialised_fresh"] + record["dropped"]} == {"aux1", "aux2"}
    file = torch.load(weights, weights_only=True)
    for name, tensor in file.items():
        keel = keel_name(name, LAYOUTS["inception_v1_bn"])
        if not keel.startswith(("inception5", "aux", "fc")):  # frozen: exactly the file's, BN statistics too
            assert torch.equal(checkpoint["state_dict"][keel], tensor), name
    assert not torch.equal(checkpoint["state_dict"]["inception5b.branch1.0.weight"],
                           file["inception5b.branch1.conv.weight"])
    # resumed without --init-from, the run would normalise with ImageNet's mean/std: refused, not trained on
    forgot = run_python(*args, "--epochs", "2", "--resume", str(tmp_path / "run" / "last.pt"))
    assert forgot.returncode == 2 and "was trained with preprocessing" in forgot.stderr, forgot.stderr


@pytest.mark.slow
def test_transfer_study_machinery(tmp_path):
    """`python -m training.finetune_study --quick`: pre-training, the three arms, the JSON, the plot and the page."""
    from training.finetune_study import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "finetune" / "finetune.json").read_text())
    assert list(results["arms"]) == ["scratch", "frozen", "finetune"]
    assert results["arms"]["frozen"]["changes"] == {"init_from": "best.pt", "trainable_from": "classifier"}
    assert all(0 <= arm["test_acc"] <= 1 and arm["runs"][0]["curve"] for arm in results["arms"].values())
    page = (tmp_path / "finetune.md").read_text()
    assert "| frozen backbone |" in page and "finetune_inception_v3.yaml" in page
    assert (tmp_path / "finetune" / "finetune.png").stat().st_size > 10_000
