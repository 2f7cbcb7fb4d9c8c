"""Getting image bytes out of an HTTP request, with the size cap applied while the body streams in."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request


class UploadError(ValueError):
    """A request we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def capped_body(request: Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body's chunks, refused with 413 as soon as they pass `max_bytes`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(f"request body of {declared} bytes is over the limit of {max_bytes} bytes", 413)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadError(f"request body is over the limit of {max_bytes} bytes", 413)
        yield chunk


async def read_image(request: Request, max_bytes: int, field: str = "image") -> bytes:
    """Image bytes from a multipart upload (`field`) or from a raw `image/*` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        parser = MultiPartParser(request.headers, capped_body(request, max_bytes), max_files=1, max_fields=16)
        try:
            form = await parser.parse()
        except UploadError:
            raise
        except Exception as exc:  # python-multipart and Starlette raise several kinds
            raise UploadError(f"malformed multipart body: {exc}") from None
        try:
            upload = form.get(field)
            if not isinstance(upload, UploadFile):
                raise UploadError(f"multipart body has no file field named {field!r}")
            return await upload.read()
        finally:
            await form.close()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return b"".join([chunk async for chunk in capped_body(request, max_bytes)])
    raise UploadError(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a file "
        f"field {field!r}, or the raw image with an image/* content type", 415,
    )
