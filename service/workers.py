"""How many HTTP worker processes serve, with how many ONNX Runtime threads each, and where each one
decodes uploads: the policy, and the code that applies it.

With KEEL_WORKERS=0 (the default) `bentoml serve` chooses once, in its own process, before it starts
any worker: it times every model on one CPU thread. A model that costs less than CHEAP_INFERENCE_MS
per image leaves a worker's time to its request path (HTTP, multipart, decoding: Python under one
GIL per process), so such models get one worker per CPU with one ONNX Runtime thread each. Any
other model, and any GPU, gets one worker with every CPU: it forms the largest batches and holds one
copy of the weights. The workers inherit the choice through KEEL_WORKERS and KEEL_CPU_THREADS in
their environment, so a respawned worker does not time the models again. What each choice was worth
on the benchmark machine: docs/benchmarks.md (*Design decisions*, and the worker-count rows of *The
service under load*).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.config import ServiceConfig
from service.inference import CUDA, TENSORRT, OnnxClassifier, container_cpus, gpu_visible, select_providers

log = logging.getLogger("bentoml.keel")

# Below this many ms of one CPU thread per image, inference is not what a worker spends its time on:
# one Python process cannot keep the CPUs busy with HTTP and decoding, and more processes can.
CHEAP_INFERENCE_MS = 1.0


@dataclass(frozen=True)
class WorkerPlan:
    workers: int  # HTTP worker processes
    cpu_threads: int  # ONNX Runtime intra-op threads per CPU session; 0: every CPU the container may use
    decode_on_loop: bool  # decode uploads on the worker's event loop (no thread hand-offs), see decode_on_loop()
    reason: str = "set by KEEL_WORKERS"


def plan_workers(config: ServiceConfig, models: dict[str, Path]) -> WorkerPlan:
    """KEEL_WORKERS and KEEL_CPU_THREADS as set, or with KEEL_WORKERS=0 chosen from what `models`
    (serving name -> .onnx file) cost on this machine's CPU."""
    cpus = container_cpus()
    if config.workers:
        return WorkerPlan(config.workers, config.cpu_threads, decode_on_loop(config.workers, cpus))
    providers = select_providers(config.device, ort.get_available_providers(), gpu_visible(), config.tensorrt)
    if CUDA in providers or TENSORRT in providers:  # one process owns the GPU and batches for it
        workers, reason = 1, "a GPU: one process owns it and batches for it"
    else:
        costs = {name: cpu_cost_ms(path) for name, path in models.items()}
        workers = auto_workers(list(costs.values()), cpus)
        reason = (f"inference per image on one CPU thread: {', '.join(f'{n} {ms:.2f} ms' for n, ms in costs.items())} "
                  f"(one worker per CPU below {CHEAP_INFERENCE_MS:g} ms)")
    threads = config.cpu_threads or (cpus // workers if workers > 1 else 0)  # 0: every CPU, one worker
    return WorkerPlan(workers, threads, decode_on_loop(workers, cpus), reason)


def hand_down(plan: WorkerPlan) -> None:
    """Log the choice and give it to the worker processes `bentoml serve` starts next: they inherit
    this process's environment, and read KEEL_WORKERS / KEEL_CPU_THREADS instead of timing again."""
    log.info("keel: %d HTTP worker(s) with %s ONNX Runtime thread(s) each, decoding uploads on %s; %s "
             "(KEEL_WORKERS overrides)", plan.workers, plan.cpu_threads or "every CPU's",
             "each worker's event loop" if plan.decode_on_loop else "threads", plan.reason)
    os.environ.update(KEEL_WORKERS=str(plan.workers), KEEL_CPU_THREADS=str(plan.cpu_threads))


def cpu_cost_ms(path: str | Path, batch: int = 8) -> float:
    """Milliseconds of one CPU thread per image, at `batch` images per run (best of 3 after a warm-up)."""
    classifier = OnnxClassifier(path, device="cpu", threads=1, spinning=False)
    crop = classifier.info.preprocessing.crop
    inputs = np.zeros((batch, 3, crop, crop), np.float32)
    classifier.predict(inputs)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        classifier.predict(inputs)
        best = min(best, time.perf_counter() - started)
    return best / batch * 1000


def auto_workers(costs_ms: list[float], cpus: int) -> int:
    """HTTP workers for models costing `costs_ms` per image on the CPU: one per CPU when every
    one is cheap (each worker then runs ONNX Runtime on one thread), else one worker with them all."""
    return cpus if costs_ms and max(costs_ms) < CHEAP_INFERENCE_MS else 1


def decode_on_loop(workers: int, cpus: int) -> bool:
    """Whether an HTTP worker decodes uploads on its event loop instead of on threads: when the workers
    have a CPU each (or less), a thread pool cannot decode in parallel, and handing every upload to a
    thread and back only costs thread wake-ups and GIL hand-offs. The price: a huge image holds its
    worker's other requests until it is decoded (bounded by KEEL_MAX_PIXELS)."""
    return workers >= cpus
