"""The inference engine inside each HTTP worker: one ONNX Runtime session per served model, each
behind BentoML's adaptive batcher.

The batcher is BentoML's own `CorkDispatcher`, the algorithm behind `@bentoml.api(batchable=True)`
(bentoml_internals.adaptive_batcher): it learns how long a batch of n takes, waits for more requests
only while that keeps within `max_latency_ms`, and sheds (503) what cannot make it; a request alone
on its worker runs at once. Keel runs it in the HTTP worker instead of
behind a second BentoML service because that service boundary is an HTTP hop with pickled tensors
per request, which on the CPU cost more than inference itself (docs/benchmarks.md, *Design
decisions*). The price: each HTTP worker (KEEL_WORKERS) holds its own sessions.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import prometheus_client

from service.bentoml_internals import adaptive_batcher
from service.errors import EngineUnavailable
from service.inference import ModelLoadError, OnnxClassifier, batch_buckets

log = logging.getLogger("bentoml.keel")


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto | cpu | cuda, as KEEL_DEVICE
    cpu_threads: int = 0  # ONNX Runtime threads per CPU session; 0: every CPU the container may use
    tensorrt: bool = False  # TensorRT before CUDA where ONNX Runtime has it
    max_batch_size: int = 32  # largest batch the batcher forms; 1 turns batching off
    max_latency_ms: int = 10000  # the batcher's queueing budget: a request expected to wait longer is shed
    warmup_delay_s: float = 0.0  # testing only: hold readiness this much longer after warm-up

    @property
    def warmup_sizes(self) -> list[int]:
        """The batch sizes warmed up before `ready`: every size a GPU session runs (all padded to these)."""
        return batch_buckets(self.max_batch_size)


_batch_sizes: prometheus_client.Histogram | None = None


def batch_size_histogram(max_batch_size: int) -> prometheus_client.Histogram:
    """keel_batch_size on /metrics: images per batch sent to ONNX Runtime, per model. Its buckets are
    the batch sizes warmed up, up to KEEL_MAX_BATCH_SIZE itself (a full batch). Made once per
    process, by its first engine (a worker serves one configuration)."""
    global _batch_sizes
    if _batch_sizes is None:
        _batch_sizes = prometheus_client.Histogram(
            "keel_batch_size", "Images per batch sent to ONNX Runtime, per model", labelnames=["model"],
            buckets=batch_buckets(max_batch_size))
    return _batch_sizes


class Engine:
    def __init__(self, models: dict[str, Path], options: EngineOptions = EngineOptions(),
                 alone: Callable[[], bool] | None = None):
        """`models`: serving name -> exported .onnx file. `alone()`: whether the request being submitted
        is the only one its worker has in progress, so it may skip the batcher's wait (None: never)."""
        self.models, self.options, self.alone = models, options, alone
        self.sessions: dict[str, OnnxClassifier] = {}
        self.warmup_ms: dict[str, dict[int, float]] = {}
        self.batchers: dict[str, Callable] = {}
        self.batch_sizes = batch_size_histogram(options.max_batch_size)
        # ONNX Runtime runs on a thread of its own: in the default pool a batch would queue behind
        # every upload waiting to be decoded. One thread: the batcher sends one batch at a time.
        self.inference_thread = ThreadPoolExecutor(1, thread_name_prefix="keel-inference")
        self.ready = False

    def start(self, on_error: Callable[[str], None]) -> None:
        """Load and warm up every model on a thread; `on_error(message)` if one cannot run here."""
        threading.Thread(target=self._load, args=(on_error,), name="keel-engine-load", daemon=True).start()

    def _load(self, on_error: Callable[[str], None]) -> None:
        options = self.options
        try:
            for name, path in self.models.items():
                # No spin-waiting between runs: the worker's decoding needs those CPUs.
                session = OnnxClassifier(path, device=options.device, threads=options.cpu_threads,
                                         tensorrt=options.tensorrt, max_batch_size=options.max_batch_size,
                                         spinning=False)
                # Readiness waits for this: no request pays for first-run allocations or cuDNN searches.
                self.warmup_ms[name] = session.warm_up(options.warmup_sizes)
                self.sessions[name] = session
                log.info("serving model %s (version %s) from %s on %s", name, session.info.version, path,
                         session.provider)
        except ModelLoadError as exc:
            on_error(str(exc))
            return
        time.sleep(options.warmup_delay_s)
        # What the worker holds by now (modules, BentoML, the sessions) lives as long as it does; frozen,
        # a full collection scans only what requests made, and no longer stalls the event loop for tens
        # of milliseconds every few seconds under load.
        gc.freeze()
        self.ready = True

    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 -> N x classes probabilities, through `model`'s batcher. KeyError: not
        a served model; EngineUnavailable: still loading, or shed by the batcher."""
        if not self.ready:
            raise EngineUnavailable("inference engine unavailable: the models are still loading")
        batcher = self.batchers.get(model)
        if batcher is None:  # made on first use: the dispatcher binds to the running event loop
            batcher = self.batchers[model] = self._batcher(model)
        return await batcher(batch)

    def _batcher(self, model: str) -> Callable:
        session = self.sessions[model]

        def predict(batch: np.ndarray):
            return asyncio.get_running_loop().run_in_executor(self.inference_thread, session.predict, batch)

        if self.options.max_batch_size == 1:  # KEEL_MAX_BATCH_SIZE=1: batching off, each request on its own
            return predict
        observe = self.batch_sizes.labels(model=model).observe

        async def run(requests: Sequence[np.ndarray]) -> list[np.ndarray]:
            sizes = [len(r) for r in requests]
            observe(sum(sizes))
            probabilities = await predict(requests[0] if len(requests) == 1 else np.concatenate(requests))
            return np.split(probabilities, np.cumsum(sizes)[:-1]) if len(requests) > 1 else [probabilities]

        return adaptive_batcher(run, self.options.max_latency_ms, self.options.max_batch_size, _shed, self.alone)

    def describe(self, model: str) -> dict:
        """What `model`'s session really runs on, for /metadata."""
        session = self.sessions[model]
        return {"provider": session.provider, "providers": session.providers, "cpu_threads": session.threads,
                "batch_buckets": session.buckets,
                "warmup_ms": {str(size): ms for size, ms in self.warmup_ms[model].items()}}


def _shed():
    raise EngineUnavailable("the adaptive batcher shed the request: it could not be answered within "
                            "KEEL_MAX_LATENCY_MS")
