"""The batch CLI: same answers as the service, bad files recorded, every input source and output
format, and a job killed with SIGKILL that resumes to every input exactly once."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from service.inference import OnnxClassifier, top_k
from service.preprocessing import find_images, preprocess_bytes
from tests.support import REPO, classify_file, run_python
from tests.test_training import REQUIRED_TEST_ACCURACY


def batch(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_python("-m", "service.batch", "--no-progress", *args, **kwargs)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_images(shapes_data, tmp_path_factory) -> Path:
    """PNGs as generated, and photo-sized JPEGs (500 x 375: big enough for the service's reduced
    JPEG decode), in nested folders, plus one corrupt file."""
    folder = tmp_path_factory.mktemp("mixed")
    for name in ("star", "ring", "arrow"):
        for index, path in enumerate(find_images(shapes_data / "test" / name)[:6]):
            (folder / "png" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / "png" / name / path.name)
            if index < 3:
                (folder / "jpeg" / name).mkdir(parents=True, exist_ok=True)
                Image.open(path).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(
                    folder / "jpeg" / name / f"{path.stem}.jpg", quality=90)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (folder / "notes.txt").write_text("not an image: ignored")
    return folder


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
    assert "ETA" in result.stderr and "images/s" in result.stderr  # progress, then the summary
    assert "failed: corrupt.png: not a recognised image format" in result.stderr

    rows = rows_of(output)
    images = find_images(folder)
    assert [row["path"] for row in rows] == [str(p.relative_to(folder)) for p in images]
    errors = [row for row in rows if "error" in row]
    assert [row["path"] for row in errors] == ["corrupt.png"] and errors[0]["error"]

    # the same pre/post-processing as the service's core: identical answers image by image
    classifier = OnnxClassifier(exported_model, device="cpu")
    for row, path in zip(rows, images):
        if "error" not in row:
            probabilities = classifier.predict(preprocess_bytes(path.read_bytes(), classifier.info.preprocessing)[None])
            assert row["predictions"] == top_k(probabilities[0], classifier.info.labels, 3)
    correct = sum(row["predictions"][0]["label"] == row["path"].split("/")[-2] for row in rows if "error" not in row)
    assert correct / (len(rows) - 1) >= REQUIRED_TEST_ACCURACY


def test_batch_answers_equal_the_service(server, exported_model, mixed_images, tmp_path):
    """PNG and JPEG, through both decode executors: every row is what /classify answers."""
    by_thread, by_process = tmp_path / "threads.jsonl", tmp_path / "processes.jsonl"
    for output, executor in ((by_thread, "thread"), (by_process, "process")):
        result = batch("--model", str(exported_model), "--input", str(mixed_images), "--output", str(output),
                       "--batch-size", "8", "--executor", executor)
        assert result.returncode == 1, result.stderr  # corrupt.png
    assert by_thread.read_bytes() == by_process.read_bytes()
    rows = rows_of(by_thread)
    assert sum(row["path"].endswith(".jpg") for row in rows) == 9 and len(rows) == 28
    for row in rows:
        if row["path"] == "corrupt.png":
            assert "not a recognised image format" in row["error"]
        else:
            _, answer = classify_file(server.url, (mixed_images / row["path"]).read_bytes())
            assert row["predictions"] == answer["predictions"]


def test_manifests_stdin_and_csv_output(exported_model, mixed_images, tmp_path):
    pngs = [str(p.relative_to(mixed_images)) for p in find_images(mixed_images / "png")][:5]
    reference = tmp_path / "reference.jsonl"
    batch("--model", str(exported_model), "--input", str(mixed_images), "--output", str(reference))
    expected = {row["path"]: row for row in rows_of(reference)}

    # text manifest: paths relative to the manifest's folder, comments, blank lines, a duplicate
    # (answered once) and a missing file (an error row, the job goes on)
    manifest = mixed_images / "list.txt"
    manifest.write_text("# images to classify\n" + "\n".join(pngs) + f"\n\n{pngs[0]}\nmissing.png\n")
    out = tmp_path / "manifest.jsonl"
    result = batch("--model", str(exported_model), "--input", str(manifest), "--output", str(out))
    assert result.returncode == 1 and "1 duplicate" in result.stderr and "1 failed" in result.stderr
    rows = rows_of(out)
    assert [row["path"] for row in rows] == pngs + ["missing.png"]
    assert rows[:-1] == [expected[p] for p in pngs] and rows[-1] == {"path": "missing.png", "error": "no such file"}

    # CSV manifest with a header naming the `path` column, written to CSV (by extension)
    csv_manifest = tmp_path / "list.csv"
    csv_manifest.write_text("label,path\n" + "".join(f"x,{mixed_images / p}\n" for p in pngs))
    out_csv = tmp_path / "preds.csv"
    result = batch("--model", str(exported_model), "--input", str(csv_manifest), "--output", str(out_csv),
                   "--top-k", "2")
    assert result.returncode == 0, result.stderr
    table = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert list(table[0]) == ["path", "label_1", "score_1", "label_2", "score_2", "error"]
    for line, name in zip(table, pngs, strict=True):
        best = expected[name]["predictions"][:2]
        assert line["path"] == str(mixed_images / name) and line["error"] == ""
        assert [(line["label_1"], float(line["score_1"])), (line["label_2"], float(line["score_2"]))] == \
            [(p["label"], p["score"]) for p in best]

    # stdin: paths relative to the working directory; --format overrides the extension
    out_stdin = tmp_path / "stdin.txt"
    result = batch("--model", str(exported_model), "--input", "-", "--output", str(out_stdin), "--format", "jsonl",
                   input="\n".join(str(mixed_images / p) for p in pngs) + "\n")
    assert result.returncode == 0, result.stderr
    assert [row["predictions"] for row in rows_of(out_stdin)] == [expected[p]["predictions"] for p in pngs]


def test_killed_job_resumes_to_every_input_exactly_once(exported_model, mixed_images, tmp_path):
    """SIGKILL mid-job, a torn last line on top, then --resume: each input answered exactly once."""
    images = [str(p) for p in find_images(mixed_images / "png")]
    blocker = tmp_path / "blocker.png"
    os.mkfifo(blocker)  # reading it blocks until a writer comes: the job stalls at a known place
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(images[:10] + [str(blocker)] + images[10:]) + "\n")
    output = tmp_path / "preds.jsonl"
    command = [sys.executable, "-m", "service.batch", "--model", str(exported_model), "--input", str(manifest),
               "--output", str(output), "--batch-size", "4", "--no-progress"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # chunks 1-2 (8 images) are written; chunk 3 holds the blocker, so nothing after it is
        while not (output.exists() and output.read_text().count("\n") >= 8) and time.monotonic() < deadline:
            assert job.poll() is None
            time.sleep(0.1)
        time.sleep(0.3)
        assert output.read_text().count("\n") == 8
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(10)
    with open(output, "a") as file:
        file.write('{"path": "' + images[8])  # as if killed in the middle of a write

    blocker.unlink()
    shutil.copy(images[0], blocker)
    result = subprocess.run(command + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8 skipped" in result.stderr
    paths = [row["path"] for row in rows_of(output)]  # every line parses: the torn one was cut off
    assert sorted(paths) == sorted(images + [str(blocker)]) and len(paths) == len(set(paths))

    # CSV too, and resuming a complete output does nothing
    out_csv = tmp_path / "preds.csv"
    assert batch("--model", str(exported_model), "--input", str(manifest), "--output", str(out_csv)).returncode == 0
    complete = out_csv.read_text()
    lines = complete.splitlines(keepends=True)
    out_csv.write_text("".join(lines[:5]) + lines[5][:7])  # header, 4 rows and a torn fifth
    result = batch("--model", str(exported_model), "--input", str(manifest), "--output", str(out_csv), "--resume")
    assert result.returncode == 0 and "4 skipped" in result.stderr and out_csv.read_text() == complete
    result = batch("--model", str(exported_model), "--input", str(manifest), "--output", str(out_csv), "--resume")
    assert "0 images" in result.stderr and out_csv.read_text() == complete
    # another --top-k would mix two column layouts in one file: refused
    mixed = batch("--model", str(exported_model), "--input", str(manifest), "--output", str(out_csv), "--resume",
                  "--top-k", "2")
    assert mixed.returncode == 2 and "cannot resume" in mixed.stderr


def test_batch_job_reports_a_missing_model_or_input(tmp_path, exported_model):
    missing_model = batch("--model", str(tmp_path / "no.onnx"), "--input", str(tmp_path),
                          "--output", str(tmp_path / "out.jsonl"))
    assert missing_model.returncode == 2 and "no such model file" in missing_model.stderr
    missing_input = batch("--model", str(exported_model), "--input", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "out.jsonl"))
    assert missing_input.returncode == 2 and "no such input folder" in missing_input.stderr
    bad_size = batch("--model", str(exported_model), "--input", str(tmp_path), "--output", str(tmp_path / "o.jsonl"),
                     "--batch-size", "0")
    assert bad_size.returncode == 2 and "--batch-size must be at least 1" in bad_size.stderr
    for result in (missing_model, missing_input, bad_size):
        assert "Traceback" not in result.stderr
