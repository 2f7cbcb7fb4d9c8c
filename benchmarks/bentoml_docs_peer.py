"""A peer: the service a BentoML user writes from BentoML's documentation.

A typed `@bentoml.api(batchable=True)` endpoint taking `PIL.Image` uploads, BentoML's adaptive
batching merging concurrent requests into one list, and one ONNX Runtime session inside, as the
"Adaptive batching" and "Input and output types" guides show. Each request sends one image as the
multipart field `images` (a batchable endpoint's parameter is the list the batcher builds):

    PEER_MODEL=artifacts/model.onnx PEER_WORKERS=1 bentoml serve benchmarks.bentoml_docs_peer:DocsClassifier

What it shares with Keel, so that only the serving differs: the model, its preprocessing
(service.preprocessing, with the reduced-size JPEG decode Keel uses by default), the batch limits
(32 images, Keel's KEEL_MAX_BATCH_SIZE) and ONNX Runtime's threads per worker (the CPUs divided
among the workers, as Keel chooses). What it does not have is everything else Keel adds (upload
limits, errors as JSON, shedding policy, deadlines, /metadata, the V2 protocol).
A yardstick for benchmarks/service_load.py, not a way to serve models.
"""

from __future__ import annotations

import json
import math
import os

import bentoml
import numpy as np
from PIL.Image import Image

from service.inference import container_cpus
from service.preprocessing import DRAFT_FACTOR, PreprocessSpec, preprocess

MODEL = os.environ.get("PEER_MODEL", "artifacts/model.onnx")
WORKERS = int(os.environ.get("PEER_WORKERS", "1"))


@bentoml.service(name="docs_classifier", workers=WORKERS, traffic={"timeout": 60})
class DocsClassifier:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, container_cpus() // WORKERS)
        self.session = ort.InferenceSession(MODEL, options, providers=["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.spec = PreprocessSpec.from_json(metadata["keel.preprocessing"])
        self.labels = json.loads(metadata["keel.labels"])

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=32, max_latency_ms=10000)
    def classify(self, images: list[Image]) -> list[list[dict]]:
        batch = np.stack([preprocess(self.reduced(image), self.spec) for image in images])
        probabilities = self.session.run(None, {"input": batch})[0]
        return [[{"label": self.labels[i], "score": float(p[i])} for i in np.argsort(-p)[:5]] for p in probabilities]

    def reduced(self, image: Image) -> Image:
        """Keel's reduced-size JPEG decode (service.preprocessing.decode_image) on the image BentoML opened."""
        width, height = image.size
        if image.format == "JPEG" and min(width, height) >= 2 * DRAFT_FACTOR * self.spec.resize:
            scale = DRAFT_FACTOR * self.spec.resize / min(width, height)
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        return image
