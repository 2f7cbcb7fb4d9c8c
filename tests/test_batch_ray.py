"""The Ray Data engine on a small local Ray instance (2 CPUs): the same rows as the local engine."""

from __future__ import annotations

import shutil

import pytest

from service.preprocessing import find_images
from tests.test_batch import batch

pytest.importorskip("ray.data", reason="Ray is installed by requirements/ray.txt (make setup)")


def test_ray_engine_matches_the_local_engine(exported_model, shapes_data, tmp_path):
    folder = tmp_path / "images"
    for name in ("star", "ring", "cross"):
        for path in find_images(shapes_data / "test" / name)[:10]:
            (folder / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / name / path.name)
    (folder / "corrupt.png").write_bytes(b"not an image")
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert batch("--model", str(exported_model), "--input", str(folder), "--output", str(local),
                 "--batch-size", "8").returncode == 1
    result = batch("--model", str(exported_model), "--input", str(folder), "--output", str(on_ray),
                   "--batch-size", "8", "--engine", "ray", "--workers", "2", timeout=240)
    assert result.returncode == 1, result.stderr  # the corrupt file, as locally
    assert "on Ray (local instance)" in result.stderr and "1 failed" in result.stderr
    assert on_ray.read_text() == local.read_text() and len(local.read_text().splitlines()) == 31
