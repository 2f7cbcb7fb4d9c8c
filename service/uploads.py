"""Reading requests as Keel promises, in front of BentoML: image uploads with the size cap applied while
the body streams in, their parameters, and the guards that do this before BentoML parses anything.

What Keel promises a client, and BentoML's own request parsing (1.4.39) does not do:
- an image as a multipart file field or as the raw body with an `image/*` content type (BentoML
  reads only multipart and JSON bodies);
- `top_k` and `model` as query parameters as well as fields (BentoML reads the body only);
- 413 as soon as a body passes KEEL_MAX_UPLOAD_BYTES, before anything is decoded (BentoML reads any
  body whole);
- never fetching a URL given where a file belongs (BentoML downloads it);
- a 4xx {"error": "..."} for every bad request, saying what is wrong (BentoML answers some with a
  JSON list, some with pydantic's error list, some with 500);
- 503 with Retry-After for a request not answered within KEEL_REQUEST_TIMEOUT_S.
So `RequestGuard` reads the requests of the typed API endpoints itself, with the readers below, and
hands the method its arguments (bentoml_internals.guarded_api); `TaskUploadGuard` checks the bodies
of the batch task, which BentoML parses itself, before they reach it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from pydantic_core import core_schema
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse

from service.bentoml_internals import GUARDED_INPUT, answer_within, file_schema
from service.config import ServiceConfig
from service.errors import ClientError, error

# What a refused upload may still send, read and dropped, before the 413 goes out (see linger).
LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 2.0
MAX_FIELDS = 16  # plain (non-file) form fields in one request
MAX_JSON_BYTES = 64 * 1024  # a JSON request body (POST /metadata)


@dataclass(frozen=True)
class ImageFile:
    """An uploaded image, still encoded: the name the client gave it, and its bytes. As an API method's
    parameter type, a multipart file field (in /docs.json and to BentoML's clients)."""

    filename: str
    data: bytes

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(cls)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler) -> dict:
        return file_schema(handler.mode)


async def capped_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body's chunks, refused with 413 as soon as they pass `max_bytes`."""
    declared = request.headers.get("content-length", "")
    stream = request.stream()
    if declared.isdigit() and int(declared) > max_bytes:
        if int(declared) - max_bytes <= LINGER_BYTES:
            await linger(stream)
        raise ClientError(f"request body of {declared} bytes is over the limit of {max_bytes} bytes", 413)
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            await linger(stream)
            raise ClientError(f"request body is over the limit of {max_bytes} bytes", 413)
        yield chunk


async def linger(stream: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of a refused body, bounded in bytes and time (nginx's lingering close).

    Answering while the client is still sending and then closing makes the client's kernel reset
    the connection, and most clients then report a connection error instead of our 413. Bodies far
    over the limit are not read: those clients get the reset.
    """
    drained = 0
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            async for chunk in stream:
                drained += len(chunk)
                if drained > LINGER_BYTES:
                    return
    except Exception:  # timed out or the client went away: nothing more to do for it
        return


async def parse_form(headers, chunks: AsyncIterator[bytes], max_files: int, too_many: ClientError):
    """Starlette's multipart parser over `chunks`, its failures as ClientErrors (`too_many` past max_files)."""
    try:
        return await MultiPartParser(headers, chunks, max_files=max_files, max_fields=MAX_FIELDS).parse()
    except ClientError:
        raise
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise too_many from None
        raise ClientError(f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # python-multipart and Starlette raise several kinds
        raise ClientError(f"malformed multipart body: {exc}") from None


@dataclass
class Upload:
    """What a request carried: its image files in body order, and its plain form fields."""

    files: list[ImageFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


async def read_upload(request: Request, max_bytes: int, max_files: int = 1, file_field: str | None = "image",
                      raw_body: bool = True) -> Upload:
    """The image(s) of a multipart body (the parts named `file_field`, or every file part when it
    is None), or of a raw `image/*` body when `raw_body`; refused with 413 past `max_bytes`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await parse_form(request.headers, capped_body(request, max_bytes), max_files,
                                ClientError(f"too many images: at most {max_files} per request"))
        try:
            upload = Upload()
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if file_field is None or name == file_field:
                        upload.files.append(ImageFile(value.filename or name, await value.read()))
                else:
                    upload.fields[name] = value
        finally:
            await form.close()
        if not upload.files:
            if file_field in upload.fields:
                raise ClientError(f"{file_field!r} must be an uploaded file; URLs and other text are not fetched")
            wanted = f"named {file_field!r}" if file_field else "(one per image)"
            raise ClientError(f"multipart body has no file field {wanted}")
        return upload
    if raw_body and (content_type.startswith("image/") or content_type == "application/octet-stream"):
        return Upload(files=[ImageFile("body", b"".join([chunk async for chunk in capped_body(request, max_bytes)]))])
    how = (f"multipart/form-data with a file field {file_field!r}, or the raw image with an image/* content type"
           if raw_body else "multipart/form-data with one file part per image")
    raise ClientError(f"unsupported content type {content_type or '(none)'!r}: send {how}", 415)


# --- parameters ------------------------------------------------------------------------------------------
# A form field may come JSON-encoded, as BentoML's clients and the Swagger UI send them (`"name"`, `3`),
# or as typed (`curl -F model=name`); a query parameter always as typed.


def top_k_param(raw: str | None) -> int | None:
    """`top_k` as sent, or None when not sent; a positive integer or ClientError."""
    if raw is None or raw.strip() == "null":
        return None
    try:
        k = int(raw)
        if k < 1:
            raise ValueError
    except ValueError:
        raise ClientError(f"top_k must be a positive integer, not {raw!r}") from None
    return k


def model_param(raw: str | None) -> str | None:
    """`model` as sent (a served model's name), or None when not sent."""
    if raw is None or raw.strip() == "null":
        return None
    if raw.startswith('"'):
        try:
            decoded = json.loads(raw)
        except ValueError:
            return raw
        return decoded if isinstance(decoded, str) else raw
    return raw


def parameters(request: Request, fields: dict[str, str]) -> dict:
    """`top_k` and `model` from the form fields, else from the query string."""
    query = request.query_params
    return {"top_k": top_k_param(fields.get("top_k", query.get("top_k"))),
            "model": model_param(fields.get("model", query.get("model")))}


# --- the readers: a request -> an API method's arguments --------------------------------------------------

Reader = Callable[[Request, ServiceConfig], Awaitable[dict]]


async def read_classify(request: Request, config: ServiceConfig) -> dict:
    """POST /classify: one image (multipart field `image`, or the raw body), `top_k`, `model`."""
    parameters(request, {})  # a bad query parameter is refused before the upload is read
    upload = await read_upload(request, config.max_upload_bytes)
    return {"image": upload.files[0], **parameters(request, upload.fields)}


async def read_classify_batch(request: Request, config: ServiceConfig) -> dict:
    """POST /classify_batch: every file part of a multipart body, in order (any field name), `top_k`, `model`."""
    parameters(request, {})
    upload = await read_upload(request, config.max_upload_bytes, config.max_batch_images, None, raw_body=False)
    return {"images": upload.files, **parameters(request, upload.fields)}


async def read_metadata(request: Request, config: ServiceConfig) -> dict:
    """POST /metadata: `model` from the query string or a JSON body {"model": "name"} (both optional)."""
    body = b"".join([chunk async for chunk in capped_body(request, MAX_JSON_BYTES)]).strip()
    fields = {}
    if body:
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        if not isinstance(document, dict) or not isinstance(document.get("model", ""), str | None):
            raise ClientError('body must be a JSON object such as {"model": "name"}, or empty')
        if document.get("model") is not None:
            fields["model"] = json.dumps(document["model"])
    return {"model": parameters(request, fields)["model"]}


# --- the guards ------------------------------------------------------------------------------------------


class InProgress:
    """How many requests one worker has in progress, counted by its RequestGuard: what KEEL_MAX_CONCURRENCY
    limits, and how the engine knows a request is alone (service/engine.py)."""

    def __init__(self) -> None:
        self.count = 0

    def alone(self) -> bool:
        return self.count <= 1


class RequestGuard:
    """ASGI middleware in front of the typed API endpoints (service/service.py): reads each request to
    one of `readers`' paths with its reader, within KEEL_REQUEST_TIMEOUT_S, and either answers it
    with the reader's 4xx, or passes it on with the method's arguments in the scope (where the
    endpoint's input model takes them, bentoml_internals.guarded_api) and the body consumed. A
    request not answered within the timeout, read or not, gets 503 with Retry-After.

    It also counts this worker's requests in progress (`in_progress`, which the engine reads too) and
    keeps them within its share of KEEL_MAX_CONCURRENCY (`max_in_progress`): a request beyond it gets
    429 at once, with Retry-After (BentoML's own limit answers without one); and it completes
    BentoML's /docs.json with what the endpoints accept and answer beyond what BentoML describes
    (`document`), so that the document, and the Swagger UI reading it, say what they really do."""

    UNLIMITED = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})  # probes always get through, as in BentoML

    def __init__(self, app, readers: dict[str, Reader], config: ServiceConfig, max_in_progress: int,
                 in_progress: InProgress):
        self.app, self.readers, self.config = app, readers, config
        self.max_in_progress, self.in_progress = max_in_progress, in_progress

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.UNLIMITED:
            return await self.app(scope, receive, send)
        if self.in_progress.count >= self.max_in_progress:
            return await error(f"{self.in_progress.count} requests are in progress on this worker, its share of "
                               "KEEL_MAX_CONCURRENCY; retry later", 429)(scope, receive, send)
        self.in_progress.count += 1
        try:
            await self.guard(scope, receive, send)
        finally:
            self.in_progress.count -= 1

    async def guard(self, scope, receive, send):
        if scope["method"] == "GET" and scope["path"] == "/docs.json":
            return await self.documented(scope, receive, send)
        reader = self.readers.get(scope["path"]) if scope["method"] == "POST" else None
        if reader is None:
            return await self.app(scope, receive, send)
        timeout = self.config.request_timeout_s

        async def read_then_run(send_noted):
            scope[GUARDED_INPUT] = await reader(Request(scope, receive), self.config)
            await self.app(scope, _consumed, send_noted)

        try:
            await answer_within(timeout, read_then_run, send, lambda: error(
                f"request not answered within the timeout of {timeout:g} s; retry later", 503)(scope, receive, send))
        except ClientError as exc:
            return await error(exc)(scope, receive, send)

    async def documented(self, scope, receive, send):
        """BentoML's /docs.json, completed by `document`."""
        messages = []

        async def keep(message):
            messages.append(message)

        await self.app(scope, receive, keep)
        start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
        if start["status"] != 200:
            for message in messages:
                await send(message)
            return
        await JSONResponse(document(json.loads(body), set(self.readers)))(scope, receive, send)


ERRORS = {  # what the guard, and BentoML in front of it, answer beyond BentoML's own 400, 404 and 500
    "413": "the request body is over KEEL_MAX_UPLOAD_BYTES (refused as soon as it passes the limit)",
    "415": "another content type than the endpoint takes",
    "429": "KEEL_MAX_CONCURRENCY requests are already in progress",
    "503": "the models are still loading, the adaptive batcher shed the request, or it was not answered within "
           "KEEL_REQUEST_TIMEOUT_S; retry after Retry-After seconds",
}


def document(openapi: dict, guarded: set[str]) -> dict:
    """BentoML's OpenAPI document with what the guarded endpoints also do: every plain field is a query
    parameter too, /classify takes the raw image as its body, GET /metadata answers as POST does,
    and the statuses in ERRORS, each {"error": "..."}."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = {"type": "object", "required": ["error"], "description": "A request Keel did not answer",
                        "properties": {"error": {"type": "string", "description": "what is wrong, for a person"}}}
    error_response = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    retry = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    for path in sorted(guarded & set(openapi.get("paths", {}))):
        operation = openapi["paths"][path]["post"]
        body = operation["requestBody"]["content"]
        schema = next(iter(body.values()))["schema"]
        operation["parameters"] = [
            {"name": name, "in": "query", "required": False, "description": field.get("description", ""),
             "schema": {key: value for key, value in field.items() if key in ("type", "minimum", "examples")}}
            for name, field in schema.get("properties", {}).items() if field.get("format") != "binary"
            and field.get("type") != "array"]
        if path == "/classify":
            body["image/*"] = {"schema": {"type": "string", "format": "binary",
                                          "description": "the image itself, with its own content type"}}
        for status, description in ERRORS.items():
            operation["responses"][status] = {"description": description, **error_response,
                                              **({"headers": retry} if status in ("429", "503") else {})}
        if path == "/metadata":
            openapi["paths"][path]["get"] = {
                **{key: value for key, value in operation.items() if key not in ("requestBody", "responses")},
                "responses": {status: response for status, response in operation["responses"].items()
                              if status not in ("400", "413", "415")},  # no body to be wrong
                "operationId": operation.get("operationId", "metadata") + "_get"}
    return openapi


async def _consumed() -> dict:
    """`receive` for an app handed a request whose body the guard has read."""
    return {"type": "http.request", "body": b"", "more_body": False}


class TaskUploadGuard:
    """ASGI middleware in front of BentoML's own parsing of the `batch` task's requests.

    BentoML 1.4.39 parses those bodies itself, and (a) downloads any URL sent where a file is expected
    (a string in the `images` field, or a JSON body that is just a URL), (b) answers a malformed
    multipart body with 500, and only once the task runs for /batch/submit. Keel fetches no URLs and
    answers bad input with a 4xx, so this reads such a request first (capped, spooled to disk past
    8 MiB), refuses it with a 4xx JSON error when it is malformed or names a URL, and otherwise
    replays the body unchanged to BentoML.
    """

    SPOOL_BYTES = 8 * 1024 * 1024

    def __init__(self, app, paths: set[str], file_field: str, max_bytes: int, max_files: int):
        self.app, self.paths, self.file_field = app, paths, file_field
        self.max_bytes, self.max_files = max_bytes, max_files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        with tempfile.SpooledTemporaryFile(self.SPOOL_BYTES) as body:
            request = Request(scope, receive)
            try:
                async for chunk in capped_body(request, self.max_bytes):
                    body.write(chunk)
                await self.check(request.headers, body)
            except ClientError as exc:
                return await error(exc)(scope, receive, send)
            body.seek(0)

            async def replay():
                chunk = body.read(64 * 1024)
                return {"type": "http.request", "body": chunk, "more_body": len(chunk) == 64 * 1024}

            await self.app(scope, replay, send)

    async def check(self, headers, body) -> None:
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        body.seek(0)
        if content_type == "multipart/form-data":
            async def chunks():
                while chunk := body.read(64 * 1024):
                    yield chunk

            form = await parse_form(headers, chunks(), self.max_files,
                                    ClientError(f"too many images: at most {self.max_files} per job", 413))
            try:
                if any(not isinstance(value, UploadFile) for value in form.getlist(self.file_field)):
                    raise ClientError(f"{self.file_field!r} parts must be uploaded files; "
                                      "URLs and other text are not fetched")
            finally:
                await form.close()
            return
        raw = body.read().strip()
        if not raw:
            return
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise ClientError('body must be multipart/form-data or a JSON object such as {"path": "folder"}; '
                              "URLs are not fetched")
        if document.get(self.file_field):  # strings where uploads belong: names of files Keel must not read
            raise ClientError(f"{self.file_field!r} must be uploaded as multipart file parts; a folder or "
                              'manifest on the server goes in "path"')
