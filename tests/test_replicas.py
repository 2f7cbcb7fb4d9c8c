"""Two real Keel replicas behind haproxy, one lost under load (benchmarks/replicas.py measures the same
at length): a crash fails only requests that were in flight when it went, a stop (SIGTERM, as on a
rollout) fails none, and the other replica goes on answering."""

from __future__ import annotations

import os
import shutil

import pytest

from benchmarks.limit import photo_like
from benchmarks.replicas import ReplicasConfig, lose_replica
from service.inference import container_cpus

HAPROXY = shutil.which("haproxy", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (`make lb-tools` installs it as root)"),
    pytest.mark.skipif(container_cpus() < 2, reason="one CPU per replica: needs 2 CPUs"),
]


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_losing_one_of_two_replicas_fails_only_the_requests_in_flight_on_it(exported_model, tmp_path, mode):
    config = ReplicasConfig.quick(str(exported_model))
    images = [photo_like(500, 375, seed) for seed in range(4)]
    loss = lose_replica(str(exported_model), images, config, tmp_path, mode, retry_unanswered=False)
    assert loss["requests"] >= 50, loss
    # every failure was a request in flight at the loss: none sent after it (those go to the other replica)
    assert loss["failed_sent_after_loss"] == 0 and loss["failed_not_in_flight"] == 0, loss["failures"]
    assert loss["failed"] <= loss["in_flight_at_loss"]
    if mode == "stop":  # drained: nothing lost, and the replica exited on its own
        assert loss["failed"] == 0 and loss["exit_status"] == 0, loss["failures"]
    # the survivor carries the load to the end
    assert sum(loss["answered_per_bin"][-4:]) > 0
