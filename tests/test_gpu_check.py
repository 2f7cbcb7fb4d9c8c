"""`make gpu-check DRY=1`: every stage of the GPU check on the CPU, so the script keeps working where CI
has no GPU; and the orchestration that keeps a GPU run's results when a stage fails or hangs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import FAILED, NO_GPU, PASSED, STAGES
from tests.conftest import REPO, run_python


@pytest.mark.slow
def test_the_dry_run_runs_every_stage_and_skips_only_the_cuda_checks(tmp_path):
    docs = {p: p.stat().st_mtime_ns for p in (REPO / "docs").glob("gpu*")}
    device_out = tmp_path / "device-out"  # as the device tool sets $OUT: what it brings back
    device_out.mkdir()
    result = run_python("-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), env={"OUT": str(device_out)}, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["dry_run"] and list(report["stages"]) == list(STAGES)
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(STAGES, "ok")
    checks = [c for s in report["stages"].values() for c in s["checks"]]
    statuses = Counter(c["status"] for c in checks)
    assert statuses[FAILED] == 0 and statuses[PASSED] >= 8 and statuses[NO_GPU] >= 10, statuses
    assert all(c["status"] == NO_GPU for c in checks if "CUDA" in c["check"])  # never "passed" on a CPU
    stages = {name: s["results"] for name, s in report["stages"].items()}
    assert stages["resume"]["deterministic"]["identical"]  # bit-equal after kill -9, as on the GPU
    assert stages["nonfinite"]["weights_and_statistics_untouched"]
    assert [row["batch_size"] for row in stages["inference"]["fp32"]["rows"]] == [1, 8, 32]
    assert set(stages["inference"]) == {"fp32", "fp16", "uint8-nhwc"}
    assert [row["concurrency"] for row in stages["service"]["servers"]["keel"]["levels"]] == [1, 4]
    page = (tmp_path / "out" / "gpu.md").read_text()
    assert "**Dry run on the CPU**" in page and "`make gpu-check DRY=1`" in page and "skipped (no GPU)" in page
    assert "## kill -9 and --resume" in page and "identical, bit for bit" in page
    brought_back = sorted(str(p.relative_to(device_out)) for p in device_out.rglob("*") if p.is_file())
    assert brought_back == ["gpu-check.log", "gpu-logs.tar.gz", "gpu.json", "gpu.md", "gpu/inference.png",
                            "gpu/service.png"]
    assert {p: p.stat().st_mtime_ns for p in (REPO / "docs").glob("gpu*")} == docs  # docs/ untouched


def test_without_a_gpu_and_without_dry_run_it_refuses_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_it_never_empties_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_a_stopped_stage_takes_its_servers_with_it():
    """A stage past its budget is stopped with everything under it, servers included, which run in
    sessions of their own (so that a signal to the stage's process group would miss them)."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
            "time.sleep(120)")
    stage = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not psutil.Process(stage.pid).children() and time.monotonic() < deadline:
        time.sleep(0.1)
    [server] = psutil.Process(stage.pid).children()
    gpu_check.stop_tree(stage)
    assert stage.returncode is not None
    server.wait(timeout=10)  # gone too (it was a child of the stage: reaped by init when the stage died)
    assert not server.is_running()


def test_the_page_renders_whatever_a_failed_or_stopped_stage_left(tmp_path):
    """A GPU run must never lose its numbers to the renderer: partial results and failed stages render."""
    results = {
        "command": "make gpu-check", "argv": "python -m benchmarks.gpu_check", "date": "today", "dry_run": False,
        "commit": "abc", "config": {"budget_s": 440, "load_repeats": 2, "load_seconds": 3}, "elapsed_s": 300,
        "stages": {
            "environment": {"status": "failed", "seconds": 3, "budget_s": 45, "error": "ImportError: no torch",
                            "checks": [], "results": {}},
            "service": {"status": "timed out", "seconds": 130, "budget_s": 130, "error": "stopped after 130 s",
                        "checks": [{"check": "the service's session runs on CUDA (/metadata)", "status": FAILED,
                                    "detail": "CPUExecutionProvider"}],
                        "results": {"pipeline": {"images_per_s": {"median": 1000.0, "min": 900.0, "max": 1100.0},
                                                 "single_image_ms": {"median": 2.0, "min": 2.0, "max": 2.0},
                                                 "threads": 16, "batch": 32, "provider": "CUDAExecutionProvider"}}},
        },
    }
    page = gpu_check.render(results, gpu_check.make_plots(results, tmp_path))
    assert "| environment | the stage itself | **failed** | ImportError: no torch |" in page
    assert "| service | the stage itself | **timed out** |" in page and "**FAILED**" in page
    assert "The in-process pipeline" in page and "1000 (900–1100) images/s" in page
