"""Keel's commands as `pip install -e .` (make setup) installs them: on PATH, from any folder, each with
--version, the shared exit status for bad usage, and the same command as `python -m`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import service

pytestmark = pytest.mark.slow  # a dozen interpreters starting, most of them importing torch

COMMANDS = {"keel-train": "training", "keel-export": "export", "keel-batch": "service.batch",
            "keel-doctor": "service.doctor"}


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command, module", COMMANDS.items())
def test_each_command_runs_from_any_folder_with_version(command, module, tmp_path):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not in this tree")
    executable = Path(sys.executable).with_name(command)
    assert executable.is_file(), f"{command} is not installed: run `make setup` (pip install -e .)"
    installed = run([str(executable), "--version"], tmp_path)  # not the repository: the installed package
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.strip() == f"{command} {service.__version__}"
    as_module = run([sys.executable, "-m", module, "--version"], tmp_path)
    assert as_module.returncode == 0 and as_module.stdout.strip() == installed.stdout.strip(), as_module.stderr
    usage = run([str(executable), "--no-such-option"], tmp_path)
    assert usage.returncode == 2 and "usage:" in usage.stderr  # 2: bad usage, in every Keel command
