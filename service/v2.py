"""The Open Inference Protocol (KServe V2 REST) for Keel's models, so that standard clients
(`tritonclient.http`, KServe's) work against Keel unchanged. Read as a spec:

  GET  /v2                                   server metadata: name, version, extensions
  GET  /v2/health/live, /v2/health/ready     200, or 400 while not ready (as /readyz); no body
  POST /v2/repository/index                  the served models: [{"name", "version", "state"}]
  GET  /v2/models/{name}[/versions/{v}]      model metadata: input `input` FP32 [-1,3,S,S],
                                             output `probabilities` FP32 [-1,classes];
                                             `parameters` carries Keel's labels and preprocessing
  GET  /v2/models/{name}[/versions/{v}]/ready   200 or 400, no body; 404 for an unknown model
  GET  /v2/models/{name}[/versions/{v}]/config   Triton's model configuration (max_batch_size...)
  POST /v2/models/{name}[/versions/{v}]/infer    preprocessed tensors in, probabilities out

Inference takes the model's input after Keel's preprocessing (`service.preprocessing`), as JSON
`data` (flat row-major or nested) or as binary tensor data, and goes through the same adaptive
batcher as /classify. Triton's extensions are implemented as Triton does them:
- binary tensor data: an input with `parameters.binary_data_size` has its little-endian bytes after
  the JSON header, whose length the `Inference-Header-Content-Length` header gives; outputs come back
  the same way when `binary_data` (per output) or `binary_data_output` (per request) is true;
- classification: `parameters.classification: k` on a requested output returns, instead of the
  probabilities, BYTES [N, k] strings "<score>:<index>:<label>", best first (score printed as
  C++'s std::to_string prints a float, 6 decimals).
Request bodies may be gzip/deflate compressed (Content-Encoding) and responses are compressed when
Accept-Encoding asks, as tritonclient's compression options expect. Bodies are capped at
KEEL_MAX_UPLOAD_BYTES (after decompression). Errors are 4xx JSON {"error": "..."} as the protocol
says: 400 for a malformed request, 404 for an unknown model, version or route, 413 for a body over
the cap; 503 (with Retry-After) when the engine cannot answer in time.
Not offered: the shared-memory extensions (400), statistics, tracing, logging and model load/unload
(404); other request parameters (priority, timeout, sequence_*) are accepted and ignored, as the
service's own request timeout and batcher govern every request alike.

Pure translation functions (request bytes -> arrays, arrays -> response bytes) come first; the
Starlette handlers at the end only add HTTP, and take the service's state (service/core.py)
explicitly.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import service
from service.core import Keel
from service.errors import ClientError, EngineUnavailable, error
from service.inference import INPUT_NAME, OUTPUT_NAME, ModelInfo
from service.uploads import capped_body

DATATYPE = "FP32"  # the only tensor type Keel models take and give (besides BYTES for classification)
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration")
PLATFORM = "onnxruntime_onnx"  # what Triton reports for an ONNX model


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # bytes after the JSON header instead of a JSON `data` list
    classification: int  # top-k strings instead of the tensor; 0 means the tensor itself


@dataclass(frozen=True)
class InferRequest:
    id: str | None  # echoed in the response when the client sent one
    batch: np.ndarray  # N x 3 x S x S float32, finite
    outputs: tuple[RequestedOutput, ...]


# ----------------------------------------------------------------------------- metadata


def server_metadata(version: str) -> dict:
    return {"name": "keel", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(info: ModelInfo) -> dict:
    size = info.preprocessing.crop
    return {
        "name": info.name,
        "versions": [info.version],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": DATATYPE, "shape": [-1, 3, size, size]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": DATATYPE, "shape": [-1, len(info.labels)]}],
        # Not part of the protocol's tensor metadata, but what a client needs to build the input
        # and read the output without Keel's code: the same values as GET /metadata.
        "parameters": {"arch": info.arch, "labels": list(info.labels),
                       "preprocessing": info.preprocessing.to_dict()},
    }


def model_config(info: ModelInfo, max_batch_size: int, max_latency_ms: int) -> dict:
    """Triton's model configuration extension, the fields clients read (Triton's image_client
    takes max_batch_size and the dims from here). Dims exclude the batch dimension, as in Triton."""
    size = info.preprocessing.crop
    return {
        "name": info.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [info.version]}},
        "max_batch_size": max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, size, size]}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [len(info.labels)]}],
        "dynamic_batching": {"max_queue_delay_microseconds": max_latency_ms * 1000},
    }


# ----------------------------------------------------------------------------- requests


def decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """The body as sent before Content-Encoding, refused with 413 past `max_bytes` (zip bombs)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ClientError(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or none", 415)
    # wbits: 16 + MAX_WBITS reads a gzip wrapper, MAX_WBITS a zlib one (HTTP's "deflate")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise ClientError(f"body is not valid {encoding} data: {exc}") from None
    if len(data) > max_bytes:
        raise ClientError(f"decompressed request body is over the limit of {max_bytes} bytes", 413)
    if not inflater.eof:
        raise ClientError(f"body is truncated {encoding} data")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON inference header and the binary tensor data after it."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ClientError(f"{HEADER_LENGTH} must be a byte count within the body's {len(body)} bytes, "
                                f"not {header_length!r}")
        header, binary = body[:int(header_length)], body[int(header_length):]
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, ValueError) as exc:
        hint = f" (binary tensor data needs the {HEADER_LENGTH} header)" if header_length is None else ""
        raise ClientError(f"inference request is not valid JSON: {exc}{hint}") from None
    if not isinstance(request, dict):
        raise ClientError("inference request must be a JSON object")
    return request, binary


def parse_infer_request(body: bytes, header_length: str | None, info: ModelInfo) -> InferRequest:
    """Request body -> the model's input batch and the outputs to return, every field checked."""
    request, binary = split_body(body, header_length)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ClientError("'id' must be a string")
    parameters = _parameters(request, "inference request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ClientError(f"'inputs' must be a non-empty list of tensors; this model takes one, {INPUT_NAME!r}")
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT_NAME:
        names = [tensor.get("name") if isinstance(tensor, dict) else tensor for tensor in inputs]
        raise ClientError(f"this model takes exactly one input, {INPUT_NAME!r}; got {names}")
    batch = parse_input(inputs[0], binary, info)
    default_binary = _flag(parameters, "binary_data_output", "inference request")
    outputs = request.get("outputs")
    if outputs is None:
        requested = (RequestedOutput(OUTPUT_NAME, default_binary, 0),)
    elif not isinstance(outputs, list):
        raise ClientError("'outputs' must be a list of requested outputs")
    else:
        requested = tuple(parse_output(output, default_binary, len(info.labels)) for output in outputs)
        if len(requested) > 1:  # one name, one tensor: clients key results by output name
            raise ClientError(f"output {OUTPUT_NAME!r} requested {len(requested)} times; ask for it once")
    return InferRequest(request_id, batch, requested)


def parse_input(tensor: dict, binary: bytes, info: ModelInfo) -> np.ndarray:
    """One request input tensor (JSON `data` or binary) -> N x 3 x S x S float32."""
    size = info.preprocessing.crop
    expected = [3, size, size]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype != DATATYPE:
        raise ClientError(f"input {INPUT_NAME!r} must have datatype {DATATYPE}, not {datatype!r}")
    if (not isinstance(shape, list) or len(shape) != 4 or shape[1:] != expected
            or not all(type(d) is int for d in shape) or shape[0] < 1):
        raise ClientError(f"input {INPUT_NAME!r} must have shape [N, {', '.join(map(str, expected))}] "
                            f"with N >= 1 (preprocessed {size}x{size} RGB images), not {shape}")
    count = math.prod(shape)
    parameters = _parameters(tensor, f"input {INPUT_NAME!r}")
    if "shared_memory_region" in parameters:
        raise ClientError("the shared-memory extension is not supported: send the data in the request")
    size_in_bytes = parameters.get("binary_data_size")
    data = tensor.get("data")  # null counts as absent
    if size_in_bytes is not None:
        if data is not None:
            raise ClientError(f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
        if type(size_in_bytes) is not int or size_in_bytes != count * 4:
            raise ClientError(f"input {INPUT_NAME!r}: binary_data_size must be {count * 4} "
                                f"(shape {shape} of {DATATYPE}), not {size_in_bytes!r}")
        if len(binary) != size_in_bytes:
            raise ClientError(f"binary tensor data is {len(binary)} bytes after the JSON header, "
                                f"but binary_data_size says {size_in_bytes}")
        array = np.frombuffer(binary, dtype="<f4")
    else:
        if binary:
            raise ClientError(f"{len(binary)} bytes of binary data after the JSON header, "
                                "but no input has a binary_data_size parameter")
        if data is None:
            raise ClientError(f"input {INPUT_NAME!r} has neither 'data' nor a binary_data_size parameter")
        try:
            array = np.asarray(data)
        except ValueError:  # ragged nesting
            raise ClientError(f"input {INPUT_NAME!r}: 'data' is a ragged nested list") from None
        if array.dtype.kind not in "iuf":  # booleans, strings, nulls, objects
            raise ClientError(f"input {INPUT_NAME!r}: 'data' must hold only numbers for {DATATYPE}")
        if array.size != count:
            raise ClientError(f"input {INPUT_NAME!r}: 'data' has {array.size} elements, "
                                f"shape {shape} needs {count}")
    batch = array.astype(np.float32, copy=False).reshape(shape)
    if not np.isfinite(batch).all():
        raise ClientError(f"input {INPUT_NAME!r} contains NaN or infinite values")
    return batch


def parse_output(output: object, default_binary: bool, classes: int) -> RequestedOutput:
    if not isinstance(output, dict) or output.get("name") != OUTPUT_NAME:
        name = output.get("name") if isinstance(output, dict) else output
        raise ClientError(f"unknown output {name!r}: this model has one output, {OUTPUT_NAME!r}")
    parameters = _parameters(output, f"output {OUTPUT_NAME!r}")
    if "shared_memory_region" in parameters:
        raise ClientError("the shared-memory extension is not supported: outputs come in the response")
    binary = _flag(parameters, "binary_data", f"output {OUTPUT_NAME!r}", default_binary)
    k = parameters.get("classification", 0)
    if type(k) is not int or k < 0:
        raise ClientError(f"output {OUTPUT_NAME!r}: classification must be a non-negative integer, not {k!r}")
    return RequestedOutput(OUTPUT_NAME, binary, min(k, classes))  # Triton returns at most `classes`


def _parameters(owner: dict, what: str) -> dict:
    parameters = owner.get("parameters") or {}  # KServe's client sends null for none
    if not isinstance(parameters, dict):
        raise ClientError(f"{what}: 'parameters' must be a JSON object")
    return parameters


def _flag(parameters: dict, key: str, what: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ClientError(f"{what}: parameter {key!r} must be true or false, not {value!r}")
    return value


# ----------------------------------------------------------------------------- responses


def classification_strings(probabilities: np.ndarray, labels: tuple[str, ...], k: int) -> list[list[str]]:
    """N x classes -> N x k "<score>:<index>:<label>" strings, best first, formatted as Triton does."""
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in indices] for row, indices in zip(probabilities, best)]


def serialize_bytes(strings: list[str]) -> bytes:
    """BYTES tensor elements as binary data: each a 4-byte little-endian length, then its bytes."""
    encoded = [s.encode() for s in strings]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def build_infer_response(request: InferRequest, info: ModelInfo, probabilities: np.ndarray) -> tuple[bytes, int | None]:
    """The response body and, when binary tensor data follows the JSON, the JSON's length."""
    outputs, chunks = [], []
    for requested in request.outputs:
        if requested.classification:
            strings = classification_strings(probabilities, info.labels, requested.classification)
            tensor = {"name": requested.name, "datatype": "BYTES", "shape": [len(strings), requested.classification]}
            flat = [s for row in strings for s in row]
            data = serialize_bytes(flat) if requested.binary else flat
        else:
            tensor = {"name": requested.name, "datatype": DATATYPE, "shape": list(probabilities.shape)}
            values = np.ascontiguousarray(probabilities, dtype="<f4")
            data = values.tobytes() if requested.binary else values.ravel().tolist()
        if requested.binary:
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    response = {"model_name": info.name, "model_version": info.version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


def compress(body: bytes, accept_encoding: str) -> tuple[bytes, str | None]:
    """Compress as the client's Accept-Encoding asks (gzip or deflate), else leave as is."""
    accepted = {part.split(";")[0].strip().lower() for part in accept_encoding.split(",")}
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1), "gzip"  # level 1: float data barely compresses further
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None


# ----------------------------------------------------------------------------- HTTP


def find_model(keel: Keel, request: Request) -> ModelInfo:
    """The model (and version, when the path names one) a request addresses, or 404."""
    name = request.path_params["name"]
    info = keel.models.get(name)
    if info is None:
        raise ClientError(f"unknown model {name!r}; this server has {', '.join(sorted(keel.models))}", 404)
    version = request.path_params.get("version")
    if version is not None and version != info.version:
        raise ClientError(f"model {name!r} has no version {version!r}; it has {info.version!r}", 404)
    return info


def health(ok: bool) -> Response:
    """A health answer as the protocol says: the status alone, 200 for true and a 4xx (400, as Triton
    answers) for false, and an empty body."""
    return Response(status_code=200 if ok else 400)


def routes() -> list[Route]:
    """The /v2 routes, for the Starlette app mounted in the service. Each serves the Keel in its app's
    state (`app.state.keel`), which the service sets when it has built it."""

    def handler(endpoint):
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request.app.state.keel, request)
            except (ClientError, EngineUnavailable) as exc:
                return error(exc)
        return handle

    async def server(keel: Keel, request: Request) -> Response:
        return JSONResponse(server_metadata(service.__version__))

    async def live(keel: Keel, request: Request) -> Response:
        return health(True)  # answering at all is liveness

    async def ready(keel: Keel, request: Request) -> Response:
        return health(keel.ready)  # what /readyz says: every model loaded and warm

    async def metadata(keel: Keel, request: Request) -> Response:
        return JSONResponse(model_metadata(find_model(keel, request)))

    async def index(keel: Keel, request: Request) -> Response:
        # Triton's repository index, how its clients discover the served models (loading and
        # unloading, the rest of that extension, are not offered: models are fixed at start-up)
        state = "READY" if keel.ready else "UNAVAILABLE"
        return JSONResponse([{"name": info.name, "version": info.version, "state": state}
                             for info in keel.models.values()])

    async def model_ready(keel: Keel, request: Request) -> Response:
        find_model(keel, request)  # an unknown model is a 404 with its reason, which reads as false too
        return health(keel.ready)

    async def configuration(keel: Keel, request: Request) -> Response:
        return JSONResponse(model_config(find_model(keel, request), keel.config.max_batch_size,
                                         keel.config.max_latency_ms))

    async def infer(keel: Keel, request: Request) -> Response:
        info = find_model(keel, request)
        limit = keel.config.max_upload_bytes
        body = b"".join([chunk async for chunk in capped_body(request, limit)])
        body = decompress(body, request.headers.get("content-encoding"), limit)
        # json.loads and the list -> array conversion of a large JSON tensor take long enough to
        # stall other requests on this worker's event loop
        parsed = await asyncio.to_thread(parse_infer_request, body, request.headers.get(HEADER_LENGTH), info)
        probabilities = await keel.infer(info.name, parsed.batch)
        body, header_length = build_infer_response(parsed, info, probabilities)
        body, encoding = compress(body, request.headers.get("accept-encoding", ""))
        headers = {}
        if header_length is not None:
            headers[HEADER_LENGTH] = str(header_length)
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        media_type = "application/octet-stream" if header_length is not None else "application/json"
        return Response(body, media_type=media_type, headers=headers)

    async def not_found(keel: Keel, request: Request) -> Response:
        return error(f"no such V2 endpoint: {request.method} {request.url.path}", 404)

    model_paths = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"]
    return [
        Route("/v2", handler(server), methods=["GET"]),
        Route("/v2/health/live", handler(live), methods=["GET"]),
        Route("/v2/health/ready", handler(ready), methods=["GET"]),
        Route("/v2/repository/index", handler(index), methods=["POST"]),
        *[Route(path, handler(metadata), methods=["GET"]) for path in model_paths],
        *[Route(path + "/ready", handler(model_ready), methods=["GET"]) for path in model_paths],
        *[Route(path + "/config", handler(configuration), methods=["GET"]) for path in model_paths],
        *[Route(path + "/infer", handler(infer), methods=["POST"]) for path in model_paths],
        # Anything else under /v2 (statistics, repository, shared memory...) gets the protocol's
        # JSON error, which clients can read, instead of Starlette's plain-text 404.
        Route("/v2/{rest:path}", handler(not_found), methods=["GET", "POST"]),
    ]
