"""How a request fails: one error type for what the client sent, one for an engine that cannot answer
now, and one way to answer either over HTTP.

Every route (/classify, /classify_batch, /metadata, /v2, the batch task) and every request reader
(service/uploads.py) raises these; `error()` turns one into the JSON answer: {"error": "..."} with
the status, and Retry-After where retrying is the remedy (429, 503).
"""

from __future__ import annotations

from starlette.responses import JSONResponse

RETRY_AFTER_S = 1  # what 429 and 503 answers tell the client to wait before retrying


class ClientError(ValueError):
    """A request Keel refuses: `status` is its HTTP status (4xx), the message says what to change."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class EngineUnavailable(RuntimeError):
    """The engine could not answer in time (starting, shedding load, past the request timeout): 503,
    the client may retry."""

    status = 503


def error(problem: ClientError | EngineUnavailable | str, status: int = 400) -> JSONResponse:
    """The JSON answer for a raised error (its own status), or for a message and `status`; 429 and 503
    also say when to retry."""
    if isinstance(problem, EngineUnavailable):
        message, status = f"{problem}; retry later", problem.status
    elif isinstance(problem, ClientError):
        message, status = str(problem), problem.status
    else:
        message = problem
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)
