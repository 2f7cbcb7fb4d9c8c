"""Graceful drain: SIGTERM to a real `bentoml serve` under load (tests/test_container.py does the same
to the container).

What a rollout or a scale-down needs from a replica that is told to stop:
- every request it has accepted gets its answer: requests held half-uploaded across the signal
  (their connection already served a request, so a worker has accepted it) finish with 200;
- new connections are refused at once, not queued behind the drain and reset when it ends
  (service/bentoml_internals.py, close_listener_first), so a client or a load balancer fails over to another replica;
- it exits on its own, with status 0, well within the Kubernetes grace period
  (deploy/kubernetes/base/deployment.yaml) less the preStop sleep that precedes SIGTERM there.

A request that arrives on an idle keep-alive connection as a worker closes it has not been read by
the server: it gets no answer at all (the connection is reset), never an error status, and a client
may retry it. The load clients check exactly that: every answer they get is a whole 200 (or 503),
every other outcome a connection error without a byte of answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from benchmarks.limit import photo_like
from benchmarks.service_load import multipart
from tests.support import Server
from tests.test_kubernetes import grace_budget_s

pytestmark = pytest.mark.slow

HELD = 4  # requests held half-uploaded across the signal
LOAD_CLIENTS = 16  # closed-loop clients on keep-alive connections, sending all along
# New connections are tried from REFUSE_FROM_S after the signal (by then every worker has begun its
# shutdown: uvicorn looks for the signal every 0.1 s) until the held requests are released.
REFUSE_FROM_S, RELEASE_AT_S = 0.5, 2.0


@dataclass
class DrainReport:
    held: list[tuple[int, dict]] = field(default_factory=list)  # (status, answer) of each held request
    load: list[tuple[float, int | str]] = field(default_factory=list)  # (sent, status or error), time from signal
    new: list[tuple[float, str, float]] = field(default_factory=list)  # (tried, outcome, seconds to it)
    exit_status: int | None = None
    exit_after_s: float | None = None  # signal to exit


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length (every answer of the service has one)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("closed without an answer")
    status, length = int(status_line.split()[1]), 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def held_request(port: int, body: bytes, content_type: str, released: asyncio.Event,
                       started: asyncio.Queue) -> tuple[int, dict]:
    """A /classify whose first half is sent before the signal and the rest after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /livez HTTP/1.1\r\nHost: keel\r\n\r\n")  # answered: a worker holds this connection
        status, _ = await asyncio.wait_for(read_response(reader), 30)
        assert status == 200
        head = (f"POST /classify HTTP/1.1\r\nHost: keel\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        writer.write(head + body[:len(body) // 2])
        await writer.drain()
        await started.put(None)
        await released.wait()
        writer.write(body[len(body) // 2:])
        await writer.drain()
        status, answer = await asyncio.wait_for(read_response(reader), 30)
        return status, json.loads(answer)
    finally:
        writer.close()


async def new_connection(port: int, body: bytes, content_type: str) -> str:
    """'refused', or the status of a whole request sent on a new connection, or the error it met."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except ConnectionRefusedError:
        return "refused"
    try:
        writer.write((f"POST /classify HTTP/1.1\r\nHost: keel\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()
        status, _ = await asyncio.wait_for(read_response(reader), 5)
        return str(status)
    except (OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    finally:
        writer.close()


async def load_client(url: str, session, body: bytes, content_type: str, report: DrainReport,
                      clock: Callable[[], float], stop: asyncio.Event) -> None:
    import aiohttp

    while not stop.is_set():
        sent = clock()
        try:
            async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                answer = await response.read()
                if response.status == 200:
                    assert json.loads(answer)["predictions"]
                outcome: int | str = response.status
        except (aiohttp.ClientConnectionError, OSError) as exc:  # no answer at all: refused, reset, closed
            outcome = type(exc).__name__
            await asyncio.sleep(0.05)
        report.load.append((sent, outcome))


def drain_under_load(port: int, send_sigterm: Callable[[], None], wait_exit: Callable[[float], int | None],
                     timeout: float = 60) -> DrainReport:
    """Load the server on `port`, hold HELD requests half-sent, `send_sigterm()`, try new connections,
    release the held requests, and wait (`wait_exit(timeout)` -> exit status) for the process to end."""
    import aiohttp

    body, content_type = multipart(photo_like(500, 375, 0))
    report = DrainReport()
    signalled: list[float] = []

    def clock() -> float:  # seconds since the signal (negative before it)
        return time.monotonic() - (signalled[0] if signalled else time.monotonic() + 1e9)

    async def run() -> None:
        released, stop, started = asyncio.Event(), asyncio.Event(), asyncio.Queue()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=LOAD_CLIENTS),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            url = f"http://127.0.0.1:{port}/classify"
            load = [asyncio.create_task(load_client(url, session, body, content_type, report, clock, stop))
                    for _ in range(LOAD_CLIENTS)]
            held = [asyncio.create_task(held_request(port, body, content_type, released, started))
                    for _ in range(HELD)]
            for _ in range(HELD):
                await asyncio.wait_for(started.get(), 30)
            await asyncio.sleep(1.0)  # under load, and the held requests' first halves read by now
            loop = asyncio.get_running_loop()
            signalled.append(time.monotonic())
            await loop.run_in_executor(None, send_sigterm)
            await asyncio.sleep(REFUSE_FROM_S)
            while clock() < RELEASE_AT_S - 0.2:
                tried = clock()
                outcome = await new_connection(port, body, content_type)
                report.new.append((tried, outcome, clock() - tried))
                await asyncio.sleep(0.05)
            await asyncio.sleep(max(0.0, RELEASE_AT_S - clock()))
            released.set()
            report.held = list(await asyncio.gather(*held))
            stop.set()
            await asyncio.gather(*load)
            report.exit_status = await loop.run_in_executor(None, wait_exit, timeout)
            report.exit_after_s = clock()

    asyncio.run(run())
    return report


def check_drain(report: DrainReport, log: str) -> None:
    """The drain contract (module docstring) on a report of drain_under_load."""
    assert len(report.held) == HELD
    for status, answer in report.held:  # accepted before the signal: answered in full
        assert status == 200 and answer["predictions"], (status, answer)
    assert report.new, "no new connection was tried"
    for tried, outcome, seconds in report.new:  # refused at once, while the held requests were still open
        assert outcome == "refused" and seconds < 1.0, (tried, outcome, seconds)
    before = [outcome for sent, outcome in report.load if sent < 0]
    assert before and all(outcome in (200, 503) or isinstance(outcome, str) for outcome in before)
    answered_before = [outcome for outcome in before if outcome == 200]
    assert len(answered_before) > LOAD_CLIENTS, f"too little load before the signal: {before}"
    for sent, outcome in report.load:  # an answer is whole and 200 or 503; anything else is no answer at all
        assert outcome in (200, 503) or outcome in ("ClientOSError", "ServerDisconnectedError",
                                                     "ClientConnectorError", "ConnectionResetError"), (sent, outcome)
    assert report.exit_status == 0, f"exit status {report.exit_status}:\n{log[-3000:]}"
    assert report.exit_after_s is not None and report.exit_after_s < grace_budget_s(), report.exit_after_s
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def draining_server(exported_model, tmp_path):
    # two workers: the listening socket is shared by three processes, and each worker drains its own
    srv = Server({"KEEL_MODEL": str(exported_model), "BENTOML_HOME": str(tmp_path / "bentoml"),
                  "BENTOML_DO_NOT_TRACK": "True", "KEEL_WORKERS": "2", "KEEL_CPU_THREADS": "1"},
                 tmp_path / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_sigterm_under_load_answers_accepted_requests_and_refuses_new_ones(draining_server):
    process = draining_server.process

    def wait_exit(timeout: float) -> int | None:
        try:
            return process.wait(timeout=timeout)
        except Exception:
            return None

    report = drain_under_load(draining_server.port, lambda: os.kill(process.pid, signal.SIGTERM), wait_exit)
    check_drain(report, draining_server.output())
    # gone: the port is closed
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", draining_server.port), timeout=2):
        pass
