"""Graceful drain on SIGTERM: stop listening at once, let every request already accepted finish.

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

from __future__ import annotations

import logging

log = logging.getLogger("bentoml.keel")


def close_listener_first() -> None:
    """Patch BentoML's arbiter so that stopping it closes its listening sockets before anything else."""
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
