#!/usr/bin/env bash
# Make sure the load balancer for the two-replica benchmark and test is here: haproxy from Debian
# (benchmarks/replicas.py, tests/test_replicas.py). Installs it when missing and we are root with
# apt-get (`make test` and `make bench` run this first); otherwise says what is missing and
# succeeds, and the test skips with the same reason. Never fails the caller.
set -uo pipefail
export PATH=$PATH:/usr/sbin:/sbin

command -v haproxy >/dev/null && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "load balancer: installing haproxy (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # a fresh machine may have no package lists yet
    if apt-get install -y -q --no-install-recommends haproxy >/tmp/keel-lb-tools.log 2>&1 \
        || { apt-get update -q >>/tmp/keel-lb-tools.log 2>&1 \
             && apt-get install -y -q --no-install-recommends haproxy >>/tmp/keel-lb-tools.log 2>&1; }; then
        # the package starts a system-wide haproxy on Debian; the benchmark runs its own
        command -v systemctl >/dev/null && systemctl disable --now haproxy >/dev/null 2>&1
        exit 0
    fi
    echo "load balancer: apt-get failed (log: /tmp/keel-lb-tools.log); the two-replica test will skip"
else
    echo "load balancer: haproxy missing; the two-replica test will skip (install as root: apt-get install -y haproxy)"
fi
exit 0
