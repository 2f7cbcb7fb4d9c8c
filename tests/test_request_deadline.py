"""The per-request timeout (uploads.RequestDeadline) in place of BentoML 1.4.39's TimeoutMiddleware.

BentoML's schedules a timer per request and never cancels it, so every answered request (its
context, tracing span, futures) stays alive for the whole timeout; measured in the service: ~16,000
finished requests held at 400 requests/s, gen-2 garbage collections of 50-110 ms, p99 doubled.
These run both middlewares around a tiny ASGI app on a real event loop and count what stays
scheduled; the BentoML check tells us when an upgrade has fixed it and the stand-in can go.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from bentoml._internal.server.http import traffic

from service.uploads import RequestDeadline, replace_bentoml_timeout

BENTOML_TIMEOUT = traffic.TimeoutMiddleware  # the original, before any replacement


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
    replace_bentoml_timeout()
    try:
        assert traffic.TimeoutMiddleware is RequestDeadline
    finally:
        traffic.TimeoutMiddleware = BENTOML_TIMEOUT
