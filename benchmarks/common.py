"""What every benchmark shares: the machine it ran on, medians with their spread, one results format.

Each benchmark is a module `benchmarks/<name>.py` with
  main(argv=None)        `python -m benchmarks.<name> [--quick] --out DIR` writes DIR/<name>.json
                         (and any DIR/<name>*.png plots)
  render(results) -> str the Markdown section for docs/benchmarks.md (image links relative to docs/)
`make bench` runs them one after another on a quiet machine and assembles docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path


def machine() -> dict:
    """Enough to tell whether two sets of numbers are comparable."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor() or "unknown"
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info["gpu"] = "none visible" if not Path("/dev/nvidiactl").exists() else "NVIDIA device present"
    return info


def spread(samples: list[float]) -> dict:
    """Median of repeated runs with its spread (min, max, and the interquartile range when n >= 4)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    summary = {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
        summary.update(p25=q1, p75=q3)
    return summary


def fmt(summary: dict, digits: int = 1) -> str:
    """'123.4 (118.0–130.2)': median, then min–max, for a Markdown table cell."""
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def time_calls(call, seconds: float, min_calls: int = 3) -> list[float]:
    """Durations (s) of repeated `call()`s for about `seconds`, after one untimed warm-up call."""
    call()
    durations = []
    started = time.perf_counter()
    while len(durations) < min_calls or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        call()
        durations.append(time.perf_counter() - t0)
    return durations


def write_results(out: Path, name: str, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2) + "\n")
    return path
