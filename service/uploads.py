"""Getting image bytes out of an HTTP request, with the size cap applied while the body streams in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request


class UploadError(ValueError):
    """A request we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# What a refused upload may still send, read and dropped, before the 413 goes out (see linger).
LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 2.0


async def capped_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body's chunks, refused with 413 as soon as they pass `max_bytes`."""
    declared = request.headers.get("content-length", "")
    stream = request.stream()
    if declared.isdigit() and int(declared) > max_bytes:
        if int(declared) - max_bytes <= LINGER_BYTES:
            await linger(stream)
        raise UploadError(f"request body of {declared} bytes is over the limit of {max_bytes} bytes", 413)
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            await linger(stream)
            raise UploadError(f"request body is over the limit of {max_bytes} bytes", 413)
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


async def parse_form(headers, chunks: AsyncIterator[bytes], max_files: int, too_many: UploadError):
    """Starlette's multipart parser over `chunks`, its failures as UploadErrors (`too_many` past max_files)."""
    try:
        return await MultiPartParser(headers, chunks, max_files=max_files, max_fields=16).parse()
    except UploadError:
        raise
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise too_many from None
        raise UploadError(f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # python-multipart and Starlette raise several kinds
        raise UploadError(f"malformed multipart body: {exc}") from None


@dataclass
class Upload:
    """What a request carried: its image files in body order, and its plain form fields."""

    files: list[tuple[str, bytes]] = field(default_factory=list)  # (filename, bytes)
    fields: dict[str, str] = field(default_factory=dict)


async def read_upload(request: Request, max_bytes: int, max_files: int = 1, file_field: str | None = "image",
                      raw_body: bool = True) -> Upload:
    """The image(s) of a multipart body (the parts named `file_field`, or every file part when it
    is None), or of a raw `image/*` body when `raw_body`; refused with 413 past `max_bytes`."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await parse_form(request.headers, capped_body(request, max_bytes), max_files,
                                UploadError(f"too many images: at most {max_files} per request"))
        try:
            upload = Upload()
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if file_field is None or name == file_field:
                        upload.files.append((value.filename or name, await value.read()))
                else:
                    upload.fields[name] = value
        finally:
            await form.close()
        if not upload.files:
            wanted = f"named {file_field!r}" if file_field else "(one per image)"
            raise UploadError(f"multipart body has no file field {wanted}")
        return upload
    if raw_body and (content_type.startswith("image/") or content_type == "application/octet-stream"):
        return Upload(files=[("body", b"".join([chunk async for chunk in capped_body(request, max_bytes)]))])
    how = (f"multipart/form-data with a file field {file_field!r}, or the raw image with an image/* content type"
           if raw_body else "multipart/form-data with one file part per image")
    raise UploadError(f"unsupported content type {content_type or '(none)'!r}: send {how}", 415)


async def read_image(request: Request, max_bytes: int, field: str = "image") -> bytes:
    """Image bytes from a multipart upload (`field`) or from a raw `image/*` body."""
    return (await read_upload(request, max_bytes, 1, field)).files[0][1]


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
        import tempfile

        from starlette.responses import JSONResponse

        with tempfile.SpooledTemporaryFile(self.SPOOL_BYTES) as body:
            request = Request(scope, receive)
            try:
                async for chunk in capped_body(request, self.max_bytes):
                    body.write(chunk)
                await self.check(request.headers, body)
            except UploadError as exc:
                return await JSONResponse({"error": str(exc)}, status_code=exc.status)(scope, receive, send)
            body.seek(0)

            async def replay():
                chunk = body.read(64 * 1024)
                return {"type": "http.request", "body": chunk, "more_body": len(chunk) == 64 * 1024}

            await self.app(scope, replay, send)

    async def check(self, headers, body) -> None:
        import json

        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        body.seek(0)
        if content_type == "multipart/form-data":
            async def chunks():
                while chunk := body.read(64 * 1024):
                    yield chunk

            form = await parse_form(headers, chunks(), self.max_files,
                                    UploadError(f"too many images: at most {self.max_files} per job", 413))
            try:
                if any(not isinstance(value, UploadFile) for value in form.getlist(self.file_field)):
                    raise UploadError(f"{self.file_field!r} parts must be uploaded files; "
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
            raise UploadError('body must be multipart/form-data or a JSON object such as {"path": "folder"}; '
                              "URLs are not fetched")


class RequestDeadline:
    """ASGI middleware: every HTTP request is answered within `timeout` seconds, or gets a 504 JSON
    error. The routes answer their own KEEL_REQUEST_TIMEOUT_S with a 503 first; this bounds what they
    do not cover, such as a body trickling into a BentoML task endpoint.

    It stands in for BentoML 1.4.39's TimeoutMiddleware (`traffic.timeout`, same arguments, see
    `replace_bentoml_timeout`), which schedules a timer per request and never cancels it: each
    answered request's context (its tracing span, futures, locks) stayed alive for the whole
    timeout. At 400 requests/s and a 40 s timeout that was ~16,000 finished requests in memory, the
    RSS growth of the soak's first minute, and gen-2 garbage collections of 50-110 ms that stalled
    the worker and doubled p99 latency.
    """

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        deadline = asyncio.timeout(self.timeout)  # its timer is cancelled on the way out
        try:
            async with deadline:
                await self.app(scope, receive, send_and_note)
        except TimeoutError:
            if not deadline.expired():  # the app's own TimeoutError, not ours
                raise
            if not started:  # past the response's start there is no status left to change
                await JSONResponse({"error": f"request not answered within {self.timeout:g} s"},
                                   status_code=504)(scope, receive, send)


def replace_bentoml_timeout() -> None:
    """Make BentoML build RequestDeadline where it would build its TimeoutMiddleware (it imports the
    name from this module each time it assembles a service's middleware)."""
    from bentoml._internal.server.http import traffic  # pinned bentoml==1.4.39; tests/test_request_deadline

    traffic.TimeoutMiddleware = RequestDeadline
