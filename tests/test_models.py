"""Architectures and registry: exact parameter counts, output shapes, aux-head contract, gradients."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from torch import nn

from training.models import MODELS, build_model, count_parameters
from training.models import alexnet as alexnet_module
from training.models import inception_v1 as inception_module
from training.models import inception_v3 as inception_v3_module
from training.models.alexnet import alexnet, alexnet_bn
from training.models.inception_v1 import inception_v1_bn
from training.models.inception_v3 import inception_v3
from training.models.layers import ConvBNReLU, scaled

SMALL = 0.25  # width for every test that runs a forward pass, to keep the file fast
TINY = 0.125  # Inception-v3 at 299 px (its aux head's minimum): thinner still
NUM_CLASSES = 10


def meta_params(builder, **kwargs) -> int:
    """Parameter count without allocating or initialising weights."""
    with torch.device("meta"):
        return count_parameters(builder(**kwargs))


def min_input_size(arch: str) -> int:
    """MIN_INPUT_SIZE of the module that defines `arch`'s builder."""
    return importlib.import_module(MODELS[arch].__module__).MIN_INPUT_SIZE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: intra-op threads cost more than they save, and when other processes
    # load the CPU, OpenMP's spin-waits make each op ~100x slower (seconds per test, not ms).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- parameter counts -------------------------------------------------------------------------


def test_alexnet_matches_torchvision_parameter_count():
    assert meta_params(alexnet, num_classes=1000) == 61_100_840


def test_alexnet_bn_parameter_count():
    # Five convs lose their biases (1152 values) and gain BN weight + bias (2 x 1152).
    assert meta_params(alexnet_bn, num_classes=1000) == 61_100_840 + 1152


def test_inception_v1_bn_matches_torchvision_googlenet_parameter_count():
    assert meta_params(inception_v1_bn, num_classes=1000) == 6_624_904
    # torchvision's googlenet(aux_logits=True, init_weights=True)
    assert meta_params(inception_v1_bn, num_classes=1000, aux_logits=True) == 13_004_888


def test_inception_v3_matches_torchvision_parameter_count():
    # torchvision's inception_v3() (aux_logits=True by default) and inception_v3(aux_logits=False)
    assert meta_params(inception_v3, num_classes=1000) == 27_161_264
    assert meta_params(inception_v3, num_classes=1000, aux_logits=False) == 23_834_568


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_smaller_width_has_fewer_parameters(arch):
    full = meta_params(MODELS[arch], num_classes=NUM_CLASSES, width=1.0)
    half = meta_params(MODELS[arch], num_classes=NUM_CLASSES, width=0.5)
    quarter = meta_params(MODELS[arch], num_classes=NUM_CLASSES, width=SMALL)
    assert quarter < half < full


def test_scaled():
    assert scaled(64, 1.0) == 64
    assert scaled(64, 0.5) == 32
    assert scaled(16, 0.25) == 8  # floor of 8 channels
    with pytest.raises(ValueError):
        scaled(64, 0.0)


# --- shapes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["alexnet", "alexnet_bn"])
def test_alexnet_output_shape(arch):
    model = build_model(arch, NUM_CLASSES, width=SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_inception_output_shape(size):
    model = build_model("inception_v1_bn", NUM_CLASSES, width=SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("size", [inception_v3_module.MIN_INPUT_SIZE, 128])
def test_inception_v3_output_shape(size):
    model = build_model("inception_v3", NUM_CLASSES, width=TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(
    "module, arch",
    [(alexnet_module, "alexnet"), (inception_module, "inception_v1_bn"), (inception_v3_module, "inception_v3")],
    ids=["alexnet", "inception", "inception_v3"],
)
def test_min_input_size_is_exact(module, arch):
    model = build_model(arch, NUM_CLASSES, width=SMALL).eval()
    size = module.MIN_INPUT_SIZE
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, NUM_CLASSES)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, size - 1, size - 1))


def test_inception_v3_aux_min_input_size_is_exact():
    # The aux head's 5x5/3 pool and 5x5 conv need the 17 x 17 stage at full size: 299 px.
    model = build_model("inception_v3", NUM_CLASSES, width=TINY).train()
    size = inception_v3_module.MIN_INPUT_SIZE_AUX
    with torch.no_grad():
        logits, aux = model(torch.randn(2, 3, size, size))
        assert logits.shape == aux.shape == (2, NUM_CLASSES)
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 3, size - 1, size - 1))


# --- registry ---------------------------------------------------------------------------------


def test_registry_has_the_published_names():
    assert {"alexnet", "alexnet_bn", "inception_v1_bn", "inception_v3"} <= set(MODELS)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_registry_builds_every_name(arch):
    model = build_model(arch, NUM_CLASSES, width=SMALL)
    assert isinstance(model, nn.Module)
    size = max(64, min_input_size(arch))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, NUM_CLASSES)


def test_registry_rejects_unknown_names():
    message = f"unknown arch 'x'; known: {', '.join(sorted(MODELS))}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model("x", NUM_CLASSES)


def test_build_model_initialises_weights():
    model = build_model("alexnet_bn", NUM_CLASSES, width=SMALL)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
        elif isinstance(module, nn.Linear):
            assert torch.all(module.bias == 0)
            assert abs(module.weight.std().item() - 0.01) < 0.002


# --- layers and structure ---------------------------------------------------------------------


def test_alexnet_bn_has_batch_norm_and_alexnet_has_none():
    def batch_norms(model):
        return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    assert batch_norms(alexnet(NUM_CLASSES, width=SMALL)) == 0
    assert batch_norms(alexnet_bn(NUM_CLASSES, width=SMALL)) == 5


def test_inception_v1_without_batch_norm_is_the_same_network_with_biases():
    """The stability study's no-BN Inception: every BN gone (aux heads too), every conv has its bias back."""
    plain = inception_v1_bn(NUM_CLASSES, width=SMALL, aux_logits=True, batch_norm=False)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(conv.bias is not None for conv in convs)
    with_bn = inception_v1_bn(NUM_CLASSES, width=SMALL, aux_logits=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == len(convs)
    assert plain.eval()(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)


def test_conv_bias_only_without_batch_norm():
    assert ConvBNReLU(3, 8, 3, batch_norm=False)[0].bias is not None
    block = ConvBNReLU(3, 8, 3, bn_eps=0.001)
    assert block[0].bias is None and block[1].eps == 0.001


def test_conv_accepts_asymmetric_kernels():
    block = ConvBNReLU(8, 16, (1, 7), padding=(0, 3))
    assert block[0].weight.shape == (16, 8, 1, 7)
    assert block(torch.randn(2, 8, 5, 9)).shape == (2, 16, 5, 9)


# --- Inception auxiliary heads ----------------------------------------------------------------


def test_inception_without_aux_returns_tensor_in_training_mode():
    model = build_model("inception_v1_bn", NUM_CLASSES, width=SMALL).train()
    logits = model(torch.randn(2, 3, 64, 64))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("arch, width, size, outputs", [
    ("inception_v1_bn", SMALL, 64, 3),  # logits + two aux heads
    ("inception_v3", TINY, inception_v3_module.MIN_INPUT_SIZE_AUX, 2),  # logits + one aux head
])
def test_inception_aux_heads_only_in_training_mode(arch, width, size, outputs):
    model = build_model(arch, NUM_CLASSES, width=width, aux_logits=True)
    x = torch.randn(2, 3, size, size)
    trained = model.train()(x)
    assert isinstance(trained, tuple) and len(trained) == outputs
    assert all(out.shape == (2, NUM_CLASSES) for out in trained)
    with torch.no_grad():
        logits = model.eval()(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES)


def test_inception_v3_without_aux_returns_tensor_in_training_mode():
    model = build_model("inception_v3", NUM_CLASSES, width=TINY, aux_logits=False).train()
    assert model.AuxLogits is None
    logits = model(torch.randn(2, 3, 96, 96))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, model_args, size",
    [
        ("alexnet", {}, 64),
        ("alexnet_bn", {}, 64),
        ("inception_v1_bn", {"aux_logits": True}, 64),
        ("inception_v3", {"width": TINY}, inception_v3_module.MIN_INPUT_SIZE_AUX),  # aux on by default
    ],
    ids=["alexnet", "alexnet_bn", "inception_v1_bn_aux", "inception_v3_aux"],
)
def test_backward_gives_finite_gradients_everywhere(arch, model_args, size):
    model = build_model(arch, NUM_CLASSES, **{"width": SMALL, **model_args}).train()
    outputs = model(torch.randn(2, 3, size, size))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    targets = torch.tensor([0, 1])
    sum(nn.functional.cross_entropy(out, targets) for out in outputs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
