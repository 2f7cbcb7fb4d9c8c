"""The built-in shapes data set: layout, determinism, safe writes, and that it is not trivially easy."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import shapes
from training.shapes import CLASSES, SPLITS, ShapesConfig, generate_dataset, render_sample, sample_rng

SMALL = ShapesConfig(size=32, train_per_class=3, val_per_class=2, test_per_class=1, seed=0)


def pixels(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def test_layout_counts_images_and_metadata(tmp_path):
    out = generate_dataset(tmp_path / "shapes", SMALL, progress=False)

    assert out == (tmp_path / "shapes").resolve()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # readable like any directory mkdir makes
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "test", "train", "val"]
    for split in SPLITS:
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            files = sorted(p.name for p in (out / split / name).iterdir())
            assert files == [f"{i:05d}.png" for i in range(SMALL.per_class(split))]
            for file in files:
                with Image.open(out / split / name / file) as image:
                    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))

    metadata = json.loads((out / "dataset.json").read_text())
    assert metadata["classes"] == list(CLASSES) == sorted(CLASSES)  # indices match ImageFolder's
    assert metadata["splits"] == {"train": 30, "val": 20, "test": 10}
    assert metadata["config"] == {"size": 32, "train_per_class": 3, "val_per_class": 2, "test_per_class": 1,
                                  "seed": 0, "noise_std": 8.0}
    assert ShapesConfig(**metadata["config"]) == SMALL


def test_at_least_ten_distinct_classes_and_unknown_names_fail():
    assert len(set(CLASSES)) >= 10 and "diamond" not in CLASSES  # a diamond is a rotated square
    for name in CLASSES:
        image = render_sample(name, np.random.default_rng(0), 48)
        assert (image.mode, image.size) == ("RGB", (48, 48))
    with pytest.raises(ValueError, match="unknown shape"):
        render_sample("blob", np.random.default_rng(0), 48)


def test_same_seed_gives_identical_pixels_and_another_seed_does_not(tmp_path):
    first = pixels(generate_dataset(tmp_path / "a", SMALL, progress=False))
    second = pixels(generate_dataset(tmp_path / "b", SMALL, progress=False))
    other = pixels(generate_dataset(tmp_path / "c", replace(SMALL, seed=1), progress=False))

    assert first.keys() == second.keys() == other.keys() and len(first) == 60
    for key in first:
        assert np.array_equal(first[key], second[key]), key
        assert not np.array_equal(first[key], other[key]), key


def test_each_image_depends_only_on_its_own_position(tmp_path):
    # no shared generator: any one image can be regenerated alone, whatever the generation order
    out = generate_dataset(tmp_path / "shapes", SMALL, progress=False)
    for split_index, split, class_index, name, i in [(0, "train", 8, "star", 2), (2, "test", 6, "ring", 0)]:
        alone = render_sample(name, sample_rng(SMALL.seed, split_index, class_index, i), SMALL.size, SMALL.noise_std)
        assert np.array_equal(np.asarray(alone), np.asarray(Image.open(out / split / name / f"{i:05d}.png")))


def test_refuses_a_non_empty_directory_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "shapes"
    out.mkdir()
    generate_dataset(out, SMALL, progress=False)  # an empty directory is fine
    (out / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(out, SMALL, progress=False)
    assert (out / "notes.txt").read_text() == "mine"

    generate_dataset(out, SMALL, progress=False, overwrite=True)
    assert not (out / "notes.txt").exists() and len(list(out.rglob("*.png"))) == 60
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no staging or old directory left


def test_an_interrupted_run_leaves_nothing_that_looks_like_a_data_set(tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return render_sample(*args, **kwargs)

    monkeypatch.setattr(shapes, "render_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "shapes", SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_reports_and_refuses_to_clobber(tmp_path, capsys):
    args = ["--out", str(tmp_path / "cli"), "--size", "24", "--train-per-class", "2", "--val-per-class", "1",
            "--test-per-class", "1", "--seed", "3"]
    shapes.main(args)
    captured = capsys.readouterr()
    assert "wrote 40 images" in captured.out and str(tmp_path / "cli") in captured.out
    assert "40/40 images" in captured.err  # the progress line
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["config"]["seed"] == 3
    assert Image.open(tmp_path / "cli" / "val" / "arrow" / "00000.png").size == (24, 24)

    with pytest.raises(SystemExit) as exit_info:
        shapes.main(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    shapes.main(args + ["--overwrite"])


def rendered(seed: int, split_index: int, per_class: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = [np.asarray(render_sample(name, sample_rng(seed, split_index, c, i), size))
              for c, name in enumerate(CLASSES) for i in range(per_class)]
    x = torch.tensor(np.stack(images), dtype=torch.float32).flatten(1) / 255.0
    return x, torch.arange(len(CLASSES)).repeat_interleave(per_class)


@pytest.mark.slow  # trains
def test_a_linear_model_on_raw_pixels_does_not_solve_it():
    # Measured with exactly this setup on seeds 0-3: test accuracy 0.11-0.15 (chance is 0.10) while
    # training accuracy is above 0.99; weight decay, or 500 train images per class, gives 0.10-0.16.
    # A small CNN trained on 500 per class at 32 px reaches 0.97 on such test images: the data is
    # learnable, only its class-free variation defeats the linear model. The 0.25 limit is ~5 standard
    # errors above those; already making every shape centred, large and on a solid background, with
    # no strokes (colour and rotation still random), lifts the linear model to ~0.25.
    torch.manual_seed(0)
    x_train, y_train = rendered(0, 0, 100, 32)
    x_test, y_test = rendered(0, 2, 30, 32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    model = torch.nn.Linear(x_train.shape[1], len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):  # full batch
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()

    with torch.no_grad():
        train_accuracy = (model(x_train).argmax(1) == y_train).float().mean().item()
        test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert train_accuracy > 0.95  # the model was really fitted: it memorises the training set
    assert test_accuracy < 0.25, f"a linear model reached {test_accuracy:.2f}: the data set is too easy"
