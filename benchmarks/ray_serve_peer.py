"""A peer: Ray Serve with `@serve.batch` and ONNX Runtime, as Ray Serve's documentation shows it.

One deployment of `--replicas` replicas behind Ray Serve's HTTP proxy; each replica reads the
multipart upload, decodes and preprocesses it, and awaits a `@serve.batch` method that runs one
ONNX Runtime session on the batch (the "Dynamic Request Batching" guide's pattern). Started on a
local Ray instance of its own:

    python -m benchmarks.ray_serve_peer --model artifacts/model.onnx --port 8000 --replicas 2

What it shares with Keel, so that only the serving differs: the model, its preprocessing
(service.preprocessing, with the reduced-size JPEG decode), the largest batch (32), and ONNX
Runtime's threads per replica (the CPUs divided among the replicas, as Keel divides them among its
workers). The batch wait is Ray Serve's default (10 ms). Ray's dashboard is off (it serves nothing
here and costs CPU). GET /classify answers 200 once the deployment is up: the benchmark's
readiness check. A yardstick for benchmarks/service_load.py, not a way to serve models.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import numpy as np

MAX_BATCH_SIZE = 32


def build_app(model: str, threads: int, replicas: int):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Classifier:
        def __init__(self) -> None:
            import onnxruntime as ort

            from service.preprocessing import PreprocessSpec

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            metadata = self.session.get_modelmeta().custom_metadata_map
            self.spec = PreprocessSpec.from_json(metadata["keel.preprocessing"])
            self.labels = json.loads(metadata["keel.labels"])

        @serve.batch(max_batch_size=MAX_BATCH_SIZE)
        async def predict(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
            return list(self.session.run(None, {"input": np.stack(tensors)})[0])

        async def __call__(self, request: Request) -> JSONResponse:
            from service.preprocessing import ImageDecodeError, preprocess_bytes

            if request.method == "GET":
                return JSONResponse({"ready": True})
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                return JSONResponse({"error": "no file field 'image'"}, status_code=400)
            try:
                tensor = preprocess_bytes(await upload.read(), self.spec, draft=True)
            except ImageDecodeError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            probabilities = await self.predict(tensor)
            best = np.argsort(-probabilities)[:5]
            return JSONResponse({"predictions": [{"label": self.labels[i], "score": float(probabilities[i])}
                                                 for i in best]})

    return Classifier.bind()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_serve_peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/model.onnx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from service.inference import container_cpus

    cpus = container_cpus()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(os.path.abspath(args.model), max(1, cpus // args.replicas), args.replicas),
              route_prefix="/classify", name="peer")
    print(f"ray serve peer: {args.replicas} replica(s) on http://{args.host}:{args.port}/classify", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
