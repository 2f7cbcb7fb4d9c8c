"""The batch job over a folder: same answers as the service's core, bad files recorded, job goes on."""

from __future__ import annotations

import json
import shutil

from service.inference import OnnxClassifier, top_k
from service.preprocessing import find_images, preprocess_bytes
from tests.test_training import REQUIRED_TEST_ACCURACY
from tests.conftest import run_python


def test_batch_job_classifies_a_folder_and_records_bad_files(exported_model, shapes_data, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(shapes_data / "test" / "star", folder / "star")
    shutil.copytree(shapes_data / "test" / "ring", folder / "nested" / "ring")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (folder / "notes.txt").write_text("not an image: ignored")
    output = tmp_path / "preds.jsonl"

    result = run_python("-m", "service.batch", "--model", str(exported_model), "--input", str(folder),
                        "--output", str(output), "--batch-size", "7", "--top-k", "3")
    assert result.returncode == 1, result.stderr  # one file failed, and the status says so
    assert "1 failed" in result.stderr and "CPUExecutionProvider" in result.stderr

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    images = find_images(folder)
    assert [row["path"] for row in rows] == [str(p.relative_to(folder)) for p in images]
    errors = [row for row in rows if "error" in row]
    assert [row["path"] for row in errors] == ["corrupt.png"] and errors[0]["error"]

    # the same pre/post-processing as the service: identical answers image by image
    classifier = OnnxClassifier(exported_model, device="cpu")
    for row, path in zip(rows, images):
        if "error" not in row:
            probabilities = classifier.predict(preprocess_bytes(path.read_bytes(), classifier.info.preprocessing)[None])
            assert row["predictions"] == top_k(probabilities[0], classifier.info.labels, 3)
    correct = sum(row["predictions"][0]["label"] == row["path"].split("/")[-2] for row in rows if "error" not in row)
    assert correct / (len(rows) - 1) >= REQUIRED_TEST_ACCURACY


def test_batch_job_reports_a_missing_model_or_folder(tmp_path, exported_model):
    missing_model = run_python("-m", "service.batch", "--model", str(tmp_path / "no.onnx"), "--input", str(tmp_path),
                               "--output", str(tmp_path / "out.jsonl"))
    assert missing_model.returncode == 2 and "no such model file" in missing_model.stderr
    missing_input = run_python("-m", "service.batch", "--model", str(exported_model), "--input", str(tmp_path / "nope"),
                               "--output", str(tmp_path / "out.jsonl"))
    assert missing_input.returncode == 2 and "no such input folder" in missing_input.stderr
