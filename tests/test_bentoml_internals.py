"""What service/bentoml_internals.py works around in BentoML 1.4.39 is still there (when one of these
fails after an upgrade, BentoML fixed it: drop the workaround), and the workarounds work.

The per-request timeout: BentoML's TimeoutMiddleware schedules a timer per request and never cancels
it, so every answered request (its context, tracing span, futures) stays alive for the whole timeout
(docs/upstream.md). These run both middlewares around a tiny ASGI app on a real event loop and count
what stays scheduled.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from bentoml._internal.server.http import traffic

from service.bentoml_internals import BENTOML_TIMEOUT_MIDDLEWARE as BENTOML_TIMEOUT
from service.bentoml_internals import RequestDeadline, replace_bentoml_timeout


async def answer_ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def call(middleware, scope=None) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware(scope or {"type": "http", "method": "GET", "path": "/"}, receive, send)
    return sent


def timers_left_after(middleware_class, requests: int) -> int:
    async def run() -> int:
        middleware = middleware_class(answer_ok, timeout=40)
        for _ in range(requests):
            await call(middleware)
        loop = asyncio.get_running_loop()
        return sum(not handle.cancelled() for handle in loop._scheduled)  # stdlib loop: its timer heap

    return asyncio.run(run())


def test_bentoml_timeout_middleware_still_keeps_a_live_timer_per_answered_request():
    assert timers_left_after(BENTOML_TIMEOUT, 50) == 50  # when this fails, BentoML fixed it: drop the stand-in


def test_request_deadline_leaves_no_timer_behind():
    assert timers_left_after(RequestDeadline, 50) == 0


def test_request_deadline_answers_504_json_when_the_app_is_too_slow():
    async def slow(scope, receive, send):
        await asyncio.sleep(5)

    sent = asyncio.run(call(RequestDeadline(slow, timeout=0.05)))
    assert sent[0]["status"] == 504
    assert json.loads(sent[1]["body"]) == {"error": "request not answered within 0.05 s"}


def test_request_deadline_passes_on_the_apps_own_timeout_error():
    async def failing(scope, receive, send):
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        asyncio.run(call(RequestDeadline(failing, timeout=5)))


def test_bentoml_builds_the_stand_in():
    before = traffic.TimeoutMiddleware
    replace_bentoml_timeout()
    try:
        assert traffic.TimeoutMiddleware is RequestDeadline
    finally:
        traffic.TimeoutMiddleware = before


def test_bentoml_still_rebuilds_an_api_method_on_every_access_and_the_cache_stops_it():
    import bentoml

    from service.bentoml_internals import cache_api_methods

    @bentoml.service(name="probe")
    class Probe:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    instance = Probe()
    assert Probe.inner.echo.__get__(instance, Probe.inner) is not Probe.inner.echo.__get__(instance, Probe.inner)
    cache_api_methods(instance)
    assert instance.echo is instance.echo and instance.echo("x") == "x" and instance.echo.local("y") == "y"


def test_bentoml_still_answers_its_own_4xx_with_a_json_list():
    """Why Keel's endpoints never raise BentoML's exceptions (bentoml/BentoML#4232)."""
    import bentoml
    from bentoml.exceptions import InvalidArgument
    from starlette.testclient import TestClient

    @bentoml.service(name="probe-errors", metrics={"enabled": False})  # one app with metrics per process
    class Probe:
        @bentoml.api
        def refuse(self, text: str) -> str:
            raise InvalidArgument("no")

    with TestClient(Probe.to_asgi()) as client:
        response = client.post("/refuse", json={"text": "x"})
    assert response.status_code == 400 and response.json() == [{"error": "no"}]
