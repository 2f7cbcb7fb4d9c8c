"""The inference engine inside each HTTP worker: one ONNX Runtime session per served model, each
behind BentoML's adaptive batcher.

The batcher is BentoML's own `CorkDispatcher`, the algorithm behind `@bentoml.api(batchable=True)`:
it learns how long a batch of n takes, waits for more requests only while that keeps within
`max_latency_ms`, and sheds (503) what cannot make it. Keel runs it in the HTTP worker instead of
behind a second BentoML service because that service boundary is an HTTP hop with pickled tensors
per request: on the CPU it cost about 3 ms of the 6 ms p50 at one client and halved throughput at 64
clients (measured with benchmarks/service_load.py against that two-service layout). The price: each
HTTP worker (KEEL_WORKERS) holds its own sessions.

Sessions load and warm up on a thread started by `start()`, so the worker answers /livez and a 503
/readyz meanwhile (and not a hanging socket during a TensorRT build); `ready` turns true after the
last warm-up. ONNX Runtime releases the GIL while it runs, so decoding goes on beside inference.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # pinned bentoml==1.4.39; tests/test_service

from service.inference import ModelInfo, ModelLoadError, OnnxClassifier

log = logging.getLogger("bentoml.keel")

BATCH_SIZES = bentoml.metrics.Histogram(
    name="keel_batch_size", documentation="Images per batch sent to ONNX Runtime, per model",
    labelnames=["model"], buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256])


class Shed(RuntimeError):
    """The batcher dropped a request that could not be answered within max_latency_ms."""


def _shed():
    raise Shed("the adaptive batcher shed the request: it could not be answered within KEEL_MAX_LATENCY_MS")


class Engine:
    def __init__(self, catalogue: dict[str, tuple[Path, ModelInfo]], device: str, cpu_threads: int,
                 tensorrt: bool, max_batch_size: int, max_latency_ms: int, warmup_sizes: list[int],
                 warmup_delay_s: float = 0.0):
        self.catalogue = catalogue
        # No spin-waiting between runs: the worker's decode threads need those CPUs. Measured on 2 cores
        # (benchmarks/service_load.py, quick-start model): +13% and +12% requests/s at 16 and 64 clients,
        # +0.6 ms p50 at one client.
        self.options = dict(device=device, threads=cpu_threads, tensorrt=tensorrt, max_batch_size=max_batch_size,
                            spinning=False)
        self.warmup_sizes, self.warmup_delay_s = warmup_sizes, warmup_delay_s
        self.max_batch_size, self.max_latency_ms = max_batch_size, max_latency_ms
        self.sessions: dict[str, OnnxClassifier] = {}
        self.warmup_ms: dict[str, dict[int, float]] = {}
        self.batchers: dict[str, Callable] = {}
        # ONNX Runtime runs on a thread of its own: in the default pool a batch would queue behind
        # every upload waiting to be decoded. One thread: the batcher sends one batch at a time.
        self.inference_thread = ThreadPoolExecutor(1, thread_name_prefix="keel-inference")
        self.ready = False

    def start(self, on_error: Callable[[str], None]) -> None:
        """Load and warm up every model on a thread; `on_error(message)` if one cannot run here."""
        threading.Thread(target=self._load, args=(on_error,), name="keel-engine-load", daemon=True).start()

    def _load(self, on_error: Callable[[str], None]) -> None:
        try:
            for name, (path, _) in self.catalogue.items():
                session = OnnxClassifier(path, **self.options)
                # Readiness waits for this: no request pays for first-run allocations or cuDNN searches.
                self.warmup_ms[name] = session.warm_up(self.warmup_sizes)
                self.sessions[name] = session
                log.info("serving model %s (version %s) from %s on %s", name, session.info.version, path,
                         session.provider)
        except ModelLoadError as exc:
            on_error(str(exc))
            return
        time.sleep(self.warmup_delay_s)
        # What the worker holds by now (modules, BentoML, the sessions) lives as long as it does; frozen,
        # a full collection scans only what requests made. Unfrozen, every full collection stalled the
        # event loop for 47-61 ms, every few seconds under load (64 px model, 16 clients: p99 46-61 ms,
        # frozen 41-44 ms).
        gc.freeze()
        self.ready = True

    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 -> N x classes probabilities, through `model`'s batcher. KeyError: not
        a served model; Shed: dropped by the batcher; RuntimeError: not loaded yet."""
        if not self.ready:
            raise RuntimeError("the models are still loading")
        batcher = self.batchers.get(model)
        if batcher is None:  # made on first use: the dispatcher binds to the running event loop
            batcher = self.batchers[model] = self._batcher(model)
        return await batcher(batch)

    def _batcher(self, model: str) -> Callable:
        session = self.sessions[model]

        def predict(batch: np.ndarray):
            return asyncio.get_running_loop().run_in_executor(self.inference_thread, session.predict, batch)

        if self.max_batch_size == 1:  # KEEL_MAX_BATCH_SIZE=1: batching off, each request on its own
            return predict
        dispatcher = CorkDispatcher(self.max_latency_ms, self.max_batch_size, fallback=_shed,
                                    get_batch_size=len, batch_dim=(0, 0))

        async def run(requests: Sequence[np.ndarray]) -> list[np.ndarray]:
            sizes = [len(r) for r in requests]
            BATCH_SIZES.labels(model=model).observe(sum(sizes))
            probabilities = await predict(np.concatenate(requests))
            return np.split(probabilities, np.cumsum(sizes)[:-1])

        return dispatcher(run)

    def describe(self, model: str) -> dict:
        """What `model`'s session really runs on, for /metadata."""
        session = self.sessions[model]
        return {"provider": session.provider, "providers": session.providers, "cpu_threads": session.threads,
                "batch_buckets": session.buckets,
                "warmup_ms": {str(size): ms for size, ms in self.warmup_ms[model].items()}}

