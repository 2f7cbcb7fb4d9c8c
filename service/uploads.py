"""Getting image bytes out of an HTTP request, with the size cap applied before anything is parsed."""

from __future__ import annotations

from starlette.requests import Request


class UploadError(ValueError):
    """A request we refuse; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes` (never buffered beyond)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadError(f"request body of {declared} bytes is over the limit of {max_bytes} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadError(f"request body is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets Starlette parse a multipart form from what we already read
    return body


async def read_image(request: Request, max_bytes: int, field: str = "image") -> bytes:
    """Image bytes from a multipart upload (`field`) or from a raw `image/*` body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, max_bytes)
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as exc:
            raise UploadError(f"malformed multipart body: {exc}") from None
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise UploadError(f"multipart body has no file field named {field!r}")
        return await upload.read()
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return body
    raise UploadError(
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a file "
        f"field {field!r}, or the raw image with an image/* content type", 415,
    )
