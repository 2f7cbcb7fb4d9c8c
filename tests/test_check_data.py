"""`python -m training.check_data`: every kind of problem in an ImageFolder tree is found, and only those."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_python
from training.check_data import KINDS, main


def save(path, image: Image.Image, fmt: str = "PNG", **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)


def copy(source, target) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)


def noise(width: int = 40, height: int = 32, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    for i in range(12):
        save(root / "train" / "cat" / f"{i:02}.png", noise(seed=i))
    (root / "train" / "cat" / "garbage.jpg").write_bytes(b"this is not a JPEG")
    buffer = io.BytesIO()
    noise(64, 64, seed=50).save(buffer, "JPEG")
    (root / "train" / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    save(root / "train" / "cat" / "cmyk.jpg", noise(seed=51, mode="CMYK"), "JPEG")
    save(root / "train" / "cat" / "palette.png", noise(seed=52, mode="P"))
    save(root / "train" / "cat" / "deep.png", Image.fromarray(np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50))
    save(root / "train" / "cat" / "alpha.png", noise(seed=53, mode="RGBA"))
    save(root / "train" / "cat" / "tiny.png", noise(10, 12, seed=54))
    save(root / "train" / "cat" / "banner.png", noise(400, 60, seed=55))
    save(root / "train" / "cat" / "huge.png", noise(400, 300, seed=56))  # over --max-pixels 100000 below
    copy(root / "train" / "cat" / "00.png", root / "train" / "cat" / "00-copy.png")
    (root / "train" / "cat" / "holiday.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden: not worth a word
    copy(root / "train" / "cat" / "01.png", root / "train" / "dog" / "01.png")  # same bytes, other label
    save(root / "train" / "dog" / "02.png", noise(seed=60))
    copy(root / "train" / "cat" / "03.png", root / "val" / "cat" / "03.png")  # leaks into validation
    (root / "val" / "dog").mkdir(parents=True)
    save(root / "val" / "bird" / "00.png", noise(seed=70))
    return root


def test_every_kind_of_problem_is_found(messy, capsys):
    assert main([str(messy), "--json", "--max-pixels", "100000", "--workers", "2"]) == 1
    report = json.loads(capsys.readouterr().out)
    problems = report["problems"]
    paths = {kind: sorted(item.get("path") or " = ".join(item.get("paths", [])) or item["detail"] for item in items)
             for kind, items in problems.items()}
    assert paths["unreadable"] == ["train/cat/garbage.jpg", "train/cat/truncated.jpg"]
    assert "truncated" in next(i["detail"] for i in problems["unreadable"] if i["path"].endswith("truncated.jpg"))
    assert paths["ignored_files"] == ["train/cat/holiday.heic"]
    assert paths["huge"] == ["train/cat/huge.png"] and paths["tiny"] == ["train/cat/tiny.png"]
    assert paths["extreme_aspect"] == ["train/cat/banner.png"]
    assert paths["cmyk"] == ["train/cat/cmyk.jpg"] and paths["palette"] == ["train/cat/palette.png"]
    assert paths["high_bit_depth"] == ["train/cat/deep.png"] and paths["alpha"] == ["train/cat/alpha.png"]
    assert paths["duplicate"] == ["train/cat/00-copy.png = train/cat/00.png"]
    assert paths["conflicting_labels"] == ["train/cat/01.png = train/dog/01.png"]
    assert paths["leakage"] == ["train/cat/03.png = val/cat/03.png"]
    assert sorted(i["detail"] for i in problems["missing_class"]) == ["val/bird: not a class in train/",
                                                                      "val/dog: no images"]
    assert [i["detail"] for i in problems["imbalance"]] == ["train: 11.0x (cat 22, dog 2)"]
    assert "missing_split" not in problems  # test/ is optional
    assert report["splits"]["train"]["classes"] == {"cat": 22, "dog": 2}
    assert report["problem_count"] == sum(len(items) for items in problems.values())


def test_the_readable_report_and_the_exit_status(messy):
    result = run_python("-m", "training.check_data", str(messy), "--max-pixels", "100000")
    assert result.returncode == 1, result.stderr
    assert "leakage (1): the same file in more than one split" in result.stdout
    assert "  train/cat/garbage.jpg: not a recognised image format" in result.stdout
    assert re.search(r"^imbalance +11\.0x +1\.0x$", result.stdout, re.M)  # per split: train, val
    accepted = run_python("-m", "training.check_data", str(messy), "--max-pixels", "100000", "--ignore", *KINDS)
    assert accepted.returncode == 0, accepted.stderr  # still reported, no longer counted


def test_a_clean_tree_passes(tmp_path, capsys):
    from training.shapes import ShapesConfig, generate_dataset

    data = generate_dataset(tmp_path / "shapes", ShapesConfig(size=64, train_per_class=3, val_per_class=1,
                                                              test_per_class=1), progress=False)
    assert main([str(data), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "total" in out


@pytest.mark.parametrize("layout, message", [
    (None, "no such folder"),
    ({"val/a/x.png"}, "no train/ split"),
    ({"train/"}, "no class folders"),
    ({"train/a/"}, "no images"),
])
def test_an_unusable_tree_is_exit_2(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    for entry in layout or ():
        if entry.endswith("/"):
            (root / entry).mkdir(parents=True)
        else:
            save(root / entry, noise())
    assert main([str(root), "--workers", "1"]) == 2
    assert message in capsys.readouterr().err
