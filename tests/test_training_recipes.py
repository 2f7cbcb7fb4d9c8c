"""YAML recipes (one per architecture, flags override them)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.conftest import REPO, TINY_TRAINING, run_python
from training.__main__ import load_recipe, parse_args
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.models import MODELS

RECIPES = REPO / "training" / "recipes"


def test_there_is_one_valid_recipe_per_architecture():
    assert sorted(p.stem for p in RECIPES.glob("*.yaml") if not p.stem.startswith("finetune_")) == sorted(MODELS)
    for path in RECIPES.glob("*.yaml"):
        recipe = load_recipe(path)
        assert recipe["arch"] == path.stem.removeprefix("finetune_")
        TrainConfig(data="d", out="o", **recipe)  # every value passes the config's own checks


def test_fine_tuning_recipes_leave_the_preprocessing_to_the_weights():
    """One per architecture torchvision has weights for; sizes and mean/std come from --init-from's file."""
    from training.pretrained import TORCHVISION_ARCHS

    finetune = {p.stem.removeprefix("finetune_"): load_recipe(p) for p in RECIPES.glob("finetune_*.yaml")}
    assert sorted(finetune) == sorted(TORCHVISION_ARCHS.values())
    for arch, recipe in finetune.items():
        assert not {"image_size", "resize", "mean", "std", "init_from"} & set(recipe), arch
        assert recipe["width"] == 1.0 and recipe["head_lr_scale"] > 1, arch


def test_flags_override_the_recipe():
    config = parse_args(["--recipe", str(RECIPES / "alexnet_bn.yaml"), "--data", "d", "--out", "o", "--epochs", "2",
                         "--no-guard", "--precision", "bf16"])
    recipe = load_recipe(RECIPES / "alexnet_bn.yaml")
    assert config.epochs == 2 and config.guard is False and config.precision == "bf16"  # from the flags
    assert config.width == recipe["width"] == 0.25 and config.model_args == {"dropout": 0.0}  # from the recipe
    assert config.optimizer == "adamw" and config.lr == recipe["lr"]
    assert parse_args(["--data", "d", "--out", "o"]).guard is True  # the default without a recipe


def test_the_quick_start_and_the_test_run_train_the_alexnet_bn_recipe():
    """`make train` uses the recipe; the suite's tiny run is the same recipe at fewer epochs."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^TRAIN_ARGS \?= --recipe \$\(RECIPE\)", makefile, re.M)
    assert re.search(r"^RECIPE \?= training/recipes/\$\(ARCH\)\.yaml", makefile, re.M)
    recipe = load_recipe(RECIPES / "alexnet_bn.yaml")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    differs = {k for k, v in TINY_TRAINING.items() if recipe.get(k, defaults.get(k)) != v}
    # the suite trains at the data set's 64 px without EMA: a third of the recipe's time, and the
    # service tests want a model whose inference is cheap
    assert differs <= {"epochs", "workers", "seed", "image_size", "resize"}, differs
    assert recipe["image_size"] == 96 and recipe["ema_decay"] > 0 and "ema_decay" not in TINY_TRAINING


@pytest.mark.parametrize("text, message", [
    ("arch: alexnet_bn\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("epochs: ten\n", "epochs must be a int, not 'ten'"),
    ("mean: [0.5, 0.5]\n", "mean must be a list of 3 numbers"),
    ("guard: 1\n", "guard must be a bool"),
    ("- epochs\n", "a recipe is a mapping"),
    ("epochs: [1\n", "not valid YAML"),
])
def test_a_bad_recipe_is_a_clear_error_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--recipe", str(path), "--data", "d", "--out", "o"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{path}: " in error and message in error, error


def test_the_cli_names_an_unknown_recipe_key_without_a_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("arch: alexnet_bn\nepoch: 3\n")
    result = run_python("-m", "training", "--recipe", str(path), "--data", "d", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}: unknown key 'epoch'" in result.stderr
    missing = run_python("-m", "training", "--recipe", str(tmp_path / "nope.yaml"), "--data", "d", "--out", "o")
    assert missing.returncode == 2 and "nope.yaml: no such recipe file" in missing.stderr


@pytest.mark.slow  # trains
def test_inception_v3_trains_from_its_recipe(tmp_path):
    """The recipe upscales the 64 px shapes to Inception-v3's 80 px; flags shrink it to seconds."""
    from training.shapes import ShapesConfig, generate_dataset

    data = generate_dataset(tmp_path / "data", ShapesConfig(size=64, train_per_class=13, val_per_class=2,
                                                            test_per_class=1), progress=False)
    result = run_python("-m", "training", "--recipe", "training/recipes/inception_v3.yaml", "--data", str(data),
                        "--out", str(tmp_path / "run"), "--epochs", "1", "--width", "0.0625", "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["arch"] == "inception_v3" and checkpoint["preprocessing"]["crop"] == 80
    assert checkpoint["model_args"] == {"num_classes": 10, "width": 0.0625, "aux_logits": False, "dropout": 0.0}
