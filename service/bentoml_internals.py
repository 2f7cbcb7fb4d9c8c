"""Every place Keel uses BentoML's private code or works around its behaviour, each with its reason and
its upstream issue. Written against the pinned bentoml==1.4.39 (requirements/serve.txt); issues not
yet reported upstream are written up, ready to file, in docs/upstream.md. tests/test_bentoml_internals.py
checks that each behaviour worked around is still there, so an upgrade that fixes one fails a test
and its workaround can go.

1. `adaptive_batcher`: BentoML's adaptive batcher (CorkDispatcher), run per model inside Keel's engine
   (service/engine.py). BentoML offers it only behind `@bentoml.api(batchable=True)`, one batcher per
   endpoint and service; Keel batches per model, across endpoints (/classify, /classify_batch, /v2,
   the task). docs/upstream.md, "A public adaptive batcher". Keel adds one thing, which reads the
   dispatcher's private queue and slot: a request alone on its worker runs at once.
2. `bentoml_tracing()`: BentoML makes OpenTelemetry spans for every request even when no exporter is
   configured and its sample rate of 0 drops them all; without an exporter, Keel excludes every URL.
   docs/upstream.md, "Spans made when no exporter is configured".
3. `RequestDeadline` in place of BentoML's TimeoutMiddleware (`traffic.timeout`), which schedules a
   timer per request and never cancels it, so every answered request stays in memory until its
   timer fires. docs/upstream.md, "TimeoutMiddleware keeps every request alive for the timeout".
4. `guarded_api`: typed `@bentoml.api` methods whose arguments service/uploads.RequestGuard has
   already read from the request, because BentoML's own request parsing cannot keep Keel's promises
   (service/uploads.py says which). Uses IODescriptor.from_http_request, a private hook.
5. `cache_api_methods`: BentoML's APIMethod.__get__ rebuilds the method's callable, with an
   inspect.signature call, on every access, which is every request. docs/upstream.md,
   "APIMethod.__get__ on every request".
6. `upload_name`: the client's file name of an upload to a `@bentoml.task`, which BentoML keeps only
   inside the temporary file's name.
7. `file_schema`: how BentoML's client and its OpenAPI document recognise a file field in a JSON
   schema ("type": "file" in validation mode), which ImageFile (service/uploads.py) follows.
8. `use_bento_model_store`: inside a Bento's container image `bentoml serve` reads model tags from the
   Bento's own model store; `python -m service.doctor`, which runs outside `bentoml serve`, points
   BentoML's private container at the same store so that it resolves the same tags.
9. `close_listener_first`: graceful drain on SIGTERM. BentoML's circus arbiter closes its listening
   socket only after the last worker has exited, so during a drain new connections queue and are
   then reset instead of being refused at once; Keel closes it before signalling the workers
   (circus-tent/circus Arbiter.stop; see the function). tests/test_drain.py drives a real server.

Designed around rather than worked around: BentoML answers a 4xx BentoMLException with a JSON list
(bentoml/BentoML#4232, fix proposed in #5709) and downloads any URL given where a file is expected (by
design since #4411): Keel's endpoints never raise BentoML's exceptions, and its guard reads uploads
before BentoML could. BentoML's HTTP client drops the keys of union members and fails on an optional
list in an answer (docs/upstream.md, "The HTTP client drops fields"): service/api.py's answer types
have neither.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import typing
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import bentoml
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # 1.
from bentoml._internal.server.http import traffic as _traffic  # 3.
from pydantic import BaseModel

log = logging.getLogger("bentoml.keel")

T, R = typing.TypeVar("T"), typing.TypeVar("R")

# --- 1. the adaptive batcher ----------------------------------------------------------------------------


def adaptive_batcher(run: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_latency_ms: int, max_batch_size: int,
                     shed: Callable[[], R], alone: Callable[[], bool] | None = None) -> Callable[[T], Awaitable[R]]:
    """`run` (a batch of requests -> their answers, in order) behind BentoML's adaptive batcher: each
    call submits one request (a batch of images counts its images) and returns its answer.

    The batcher learns how long a batch of n takes, holds requests back while the oldest can still
    wait for company within `max_latency_ms`, and sheds (`shed()`) what cannot make it. One thing is
    added: when `alone()` says the request is the only one its worker has in progress (so no company
    is coming) and the batcher is idle, it runs at once, holding the batcher's one-batch-at-a-time
    slot, and skips the dispatcher's own round of hand-offs between event-loop tasks, which at one
    client was most of what batching cost in latency. Under load a request is never alone, and
    every request is batched as before. (The batcher's own state cannot tell: a worker decoding on
    its event loop brings its requests to the batcher one by one, so between two batches it always
    looks idle, and running the first request of each batch alone halved the mean batch size.)"""
    dispatcher = CorkDispatcher(max_latency_ms, max_batch_size, fallback=shed, get_batch_size=len, batch_dim=(0, 0))
    batched = dispatcher(run)

    async def submit(request: T) -> R:
        if alone is not None and alone() and not dispatcher._queue and dispatcher._sema.acquire():
            try:
                return (await run([request]))[0]
            finally:
                dispatcher._sema.release()
        return await batched(request)

    return submit


# --- 2. tracing ------------------------------------------------------------------------------------------


def bentoml_tracing() -> dict:
    """The `tracing` service config Keel hands BentoML: unchanged when an exporter is configured
    (`tracing.exporter_type` in BentoML's configuration), otherwise every URL excluded, so no spans
    are made at all (access log lines then carry no trace/span ids)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return {} if BentoMLContainer.tracing.exporter_type.get() else {"excluded_urls": "."}


# --- 3. the per-request timeout ---------------------------------------------------------------------------


class RequestDeadline:
    """ASGI middleware: every HTTP request is answered within `timeout` seconds, or gets a 504 JSON
    error. Keel's routes answer their own KEEL_REQUEST_TIMEOUT_S with a 503 first; this bounds what
    they do not cover, such as a body trickling into the batch task's endpoint. It takes BentoML's
    TimeoutMiddleware's place (same arguments) and cancels its timer when the request is answered."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        await answer_within(self.timeout, lambda send_noted: self.app(scope, receive, send_noted), send,
                            lambda: JSONResponse({"error": f"request not answered within {self.timeout:g} s"},
                                                 status_code=504)(scope, receive, send))


async def answer_within(seconds: float, call: Callable[[Callable], Awaitable[None]], send: Callable,
                        late: Callable[[], Awaitable[None]]) -> None:
    """Await `call(send)`, which answers a request through the `send` it is given, for at most `seconds`;
    past them `late()` answers instead, unless the response has begun (then there is no status left to
    change). A TimeoutError of the call's own propagates. RequestDeadline and uploads.RequestGuard use it."""
    started = False

    async def send_and_note(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    deadline = asyncio.timeout(seconds)  # its timer is cancelled on the way out
    try:
        async with deadline:
            await call(send_and_note)
    except TimeoutError:
        if not deadline.expired():  # the call's own TimeoutError, not ours
            raise
        if not started:
            await late()


BENTOML_TIMEOUT_MIDDLEWARE = _traffic.TimeoutMiddleware  # BentoML's own, kept for tests/test_bentoml_internals.py


def replace_bentoml_timeout() -> None:
    """Make BentoML build RequestDeadline where it would build its TimeoutMiddleware. BentoML imports
    the name from its traffic module each time it assembles a service's app, in the worker, after
    importing the service module: so this runs when service/service.py is imported."""
    _traffic.TimeoutMiddleware = RequestDeadline


# --- 4. and 5. typed API methods whose input Keel reads ----------------------------------------------------

GUARDED_INPUT = "keel.input"  # ASGI scope key: the method's arguments, as RequestGuard read them


def guarded_api(*, route: str, output: type[BaseModel]) -> Callable:
    """`@bentoml.api(route=route)` for a method whose arguments RequestGuard has read already, and whose
    answer is an `output` (or an error Response).

    The input model is BentoML's own, inferred from the method's signature as `@bentoml.api` does, so
    /docs.json, /schema.json and BentoML's clients describe and send exactly these arguments (a
    parameter typed ImageFile, or a list of them, is a multipart file field), and `output` describes
    the answer. Only the two ends are Keel's: `from_http_request` takes the arguments the guard left
    in the ASGI scope instead of parsing the body again (which BentoML would do into temporary files,
    after the guard has read it), and the answer goes out as the JSON pydantic writes for it, as a
    Response BentoML passes through. BentoML's own way with both (validating the arguments again,
    then an input model whose fields it reads through pydantic's deprecated instance attribute; the
    answer through its serde into a streamed response) cost more per request than the rest of its
    dispatch (docs/benchmarks.md, *Design decisions*)."""
    from _bentoml_sdk.io_models import IODescriptor
    from starlette.responses import Response

    from service.uploads import ImageFile

    def decorate(method):
        inferred = IODescriptor.from_input(method, skip_self=True)
        fields = dict(inferred.model_fields)

        async def from_http_request(cls, request, serde):
            return Arguments(fields, request.scope[GUARDED_INPUT])

        spec = type("Input", (inferred,), {"__module__": method.__module__,
                                           "from_http_request": classmethod(from_http_request)})
        spec.multipart_fields = [name for name, field in fields.items() if _mentions(field.annotation, ImageFile)]

        @functools.wraps(method)
        async def endpoint(self, *args, **kwargs):
            answer = await method(self, *args, **kwargs)
            if isinstance(answer, BaseModel):
                return Response(answer.model_dump_json(), media_type="application/json")
            return answer

        endpoint.__doc__ = inspect.cleandoc(method.__doc__ or "")  # /docs.json's description: Markdown, no indent

        return bentoml.api(route=route, input_spec=spec, output_spec=output)(endpoint)

    return decorate


class Arguments:
    """An endpoint's arguments as BentoML's dispatch reads its input model: the names in
    `model_fields`, each value an attribute."""

    def __init__(self, model_fields: dict, values: dict):
        self.model_fields = model_fields
        self.__dict__.update(values)


def _mentions(annotation, cls: type) -> bool:
    """Whether a type annotation is `cls` or holds it (list[cls], cls | None, Annotated[cls, ...])."""
    return annotation is cls or any(_mentions(arg, cls) for arg in typing.get_args(annotation))


def cache_api_methods(instance: object) -> None:
    """Resolve each API method of a service instance once, in its __init__. BentoML looks the method up
    on the instance for every request, and its descriptor rebuilds a wrapper each time (tens of
    microseconds of the request path); an attribute of the instance takes precedence over a
    descriptor without __set__. The methods then always run locally, never through BentoML's
    self-proxy (which Keel's own code does not call them through)."""
    from _bentoml_sdk.method import APIMethod

    for name, member in inspect.getmembers(type(instance)):
        if isinstance(member, APIMethod):
            vars(instance)[name] = getattr(instance, name)


# --- 6. and 7. ---------------------------------------------------------------------------------------------


def upload_name(path: Path) -> str:
    """The client's file name of an upload to a `@bentoml.task`: BentoML stores each part as tempfile's
    'tmp' + 8 random characters + the uploaded base name."""
    name = path.name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


def file_schema(mode: str, image: bool = True) -> dict:
    """A file field's JSON schema as BentoML writes it: "type": "file" in validation mode (BentoML's
    clients send such fields as file parts), binary string in serialization mode (OpenAPI)."""
    if mode == "validation":
        return {"type": "file", "format": "image" if image else "binary"}
    return {"type": "string", "format": "binary"}


def use_bento_model_store() -> None:
    """Inside a Bento's container image (BENTO_PATH set) `bentoml serve` reads model tags from the
    Bento's own model store, not from BENTOML_HOME's: the doctor resolves them there too, as
    bentoml's service loader does (bentoml/_internal/service/loader.py, pinned bentoml==1.4.39)."""
    bento = os.environ.get("BENTO_PATH")
    if not bento or not (Path(bento) / "models").is_dir():
        return
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    BentoMLContainer.model_store.set(ModelStore(Path(bento) / "models"))


def close_listener_first() -> None:
    """Patch BentoML's arbiter so that stopping it closes its listening sockets before anything else.

    Graceful drain on SIGTERM: stop listening at once, let every request already accepted finish.

    `bentoml serve` is a circus arbiter: it binds the listening socket, hands it to the HTTP worker
    processes, and on SIGTERM sends SIGTERM to each worker. A worker (uvicorn) then closes its copy
    of the socket, finishes the requests it has accepted, closes idle keep-alive connections and
    exits. The arbiter closes its own copy of the socket only after the last worker has exited
    (circus.arbiter.Arbiter.stop: watchers first, sockets last), so for the whole drain the socket
    still listens: the kernel completes new connections' handshakes and queues them, no process
    accepts them, and when the drain ends they are reset. A client that connects during a drain
    waits for it and then gets a reset, instead of a refusal it can fail over on at once.

    `close_listener_first()` makes the arbiter close its copy before it signals the workers, the
    order uvicorn keeps on its own: once the workers have closed theirs (their first step on
    SIGTERM) the socket is gone and new connections are refused, while each worker still answers
    what it accepted. Behaviour, tested against a real server under load: tests/test_drain.py.

    A workaround of BentoML 1.4.39's process manager (bentoml._internal.utils.circus.Arbiter, pinned
    in requirements/serve.txt); it runs in the `bentoml serve` process, which imports the service
    module before it starts the arbiter. Upstream: circus closes sockets after stopping watchers
    (circus-tent/circus, Arbiter.stop), and BentoML keeps that order.
    """
    from bentoml._internal.utils.circus import Arbiter  # pinned bentoml==1.4.39

    if getattr(Arbiter.stop, "keel_closes_listener_first", False):
        return
    stop = Arbiter.stop

    def stop_closing_listener_first(self):
        for name, sock in list(self.sockets.items()):
            try:
                sock.close()  # circus closes it again after the watchers: a no-op then
            except OSError as exc:
                log.warning("keel: could not close listening socket %s before draining: %s", name, exc)
        log.info("keel: stopped listening; finishing the requests in progress")
        return stop(self)

    stop_closing_listener_first.keel_closes_listener_first = True
    Arbiter.stop = stop_closing_listener_first
