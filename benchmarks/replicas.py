"""Two Keel replicas behind one load balancer: how throughput scales, and what losing one costs.

`python -m benchmarks.replicas --model artifacts/model.onnx [--quick] --out docs/benchmarks`

The cluster shape on one machine: each replica is a real `bentoml serve` pinned to CPUs of its own
(`taskset`, as a pod gets its CPU limit; Keel sizes its workers to them), behind haproxy (Debian's;
`deploy/lb-tools.sh` installs it) balancing by least connections, health-checking /readyz every
0.5 s, and retrying a request whose connection to a replica failed on the other one (never a request
a replica already received: `retry-on conn-failure`, haproxy's default). The load generator and
haproxy share the machine's cores with the replicas, as in benchmarks/service_load.py.

1. Scaling, at 1/16/64 clients: one replica on CPU 0; two replicas on CPU 0 and CPU 1; and, for
   reference, one replica with every CPU (scaling up instead of out).
2. Losing a replica under load (two replicas, the clients keep sending): it is killed (SIGKILL,
   a crash) or stopped as a rollout or scale-down stops it (haproxy stops sending it requests, as
   Kubernetes drops the pod's endpoint during its preStop sleep; PRESTOP_S later SIGTERM, and it answers
   what it holds: service/bentoml_internals.py, close_listener_first). Every request is recorded
   with when it was sent and answered: the failures must all be requests that were in flight when
   the replica went (haproxy's count of requests in progress on it is read just before), none sent
   after. A third run kills it again with haproxy also retrying requests
   that got no answer at all (`retry-on empty-response`, on /classify only: a classification is
   safe to repeat), which turns those losses into slower answers.
The timeline plot shows answers and failures per 0.25 s around the loss.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, write_results
from benchmarks.limit import photo_like
from benchmarks.service_load import Launched, LoadConfig, keel, measure, multipart

NAME = "replicas"
HEALTH_INTERVAL_MS = 500
# A stop is a rollout's: the balancer stops sending the replica new requests (haproxy's drain state, as
# Kubernetes takes the pod out of the Service's endpoints while the preStop hook sleeps), then SIGTERM.
# Without that step a request sent on a kept-alive connection just as the replica's worker closes it
# gets no answer (tests/test_drain.py), and haproxy retries such a request only with `retry-on
# empty-response`.
PRESTOP_S = 1.0


@dataclass(frozen=True)
class ReplicasConfig:
    model: str = "artifacts/model.onnx"
    concurrency: tuple[int, ...] = (1, 16, 64)
    repeats: int = 3
    run_seconds: float = 3.0
    max_requests: int = 5000
    warmup_requests: int = 64
    loss_clients: int = 16  # clients sending while a replica is lost
    loss_seconds: float = 9.0  # each loss run; the replica goes at a third of it
    image: tuple[int, int] = (500, 375)

    @classmethod
    def quick(cls, model: str) -> ReplicasConfig:
        return cls(model=model, concurrency=(16,), repeats=1, run_seconds=0.5, max_requests=200, warmup_requests=8,
                   loss_clients=8, loss_seconds=4.0)

    def load(self) -> LoadConfig:
        return LoadConfig(model=self.model, repeats=self.repeats, run_seconds=self.run_seconds,
                          max_requests=self.max_requests, warmup_requests=self.warmup_requests)


def haproxy_config(port: int, replicas: list[Launched], stats: Path, retry_unanswered: bool = False) -> str:
    retry = ["retry-on conn-failure empty-response response-timeout",
             "http-request disable-l7-retry unless { path /classify }"] if retry_unanswered else []
    return "\n".join([
        "global", "    maxconn 4096", f"    stats socket {stats} mode 600 level admin",
        "    tune.bufsize 262144  # a whole upload fits: haproxy can only retry a request it still holds",
        "defaults", "    mode http", "    timeout connect 2s", "    timeout client 60s", "    timeout server 60s",
        "    retries 3", "    option redispatch 1  # each retry goes to another replica",
        "frontend keel", f"    bind 127.0.0.1:{port}", "    default_backend replicas",
        "backend replicas", "    balance leastconn", "    option httpchk GET /readyz",
        f"    default-server inter {HEALTH_INTERVAL_MS}ms fall 2 rise 2",
        *(f"    {line}" for line in retry),
        *(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas), ""])


class Balancer(Launched):
    """haproxy in the foreground in front of `replicas`, on a free loopback port."""

    def __init__(self, replicas: list[Launched], log_dir: Path, retry_unanswered: bool = False):
        self.config_path, self.stats = log_dir / "haproxy.cfg", log_dir / "haproxy.sock"
        super().__init__([shutil.which("haproxy", path=os.environ["PATH"] + ":/usr/sbin:/sbin") or "haproxy",
                          "-db", "-f", str(self.config_path)], {}, "/readyz", log_dir, "haproxy")
        self.config_path.write_text(haproxy_config(self.port, replicas, self.stats, retry_unanswered))

    def command(self, line: str) -> str:
        """One command to haproxy's runtime API (the stats socket), its answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode()

    def in_progress(self, server: str) -> int:
        """haproxy's count of requests in progress on `server` (scur in `show stat`)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "replicas" and row.get("svname") == server:
                return int(row["scur"] or 0)
        raise KeyError(server)


def replica(model: str, log_dir: Path, name: str, cpus: str | None) -> Launched:
    """Keel as shipped; `cpus` (taskset's list, e.g. "0") pins it as a pod's CPU limit would bound it."""
    launched = keel(model, log_dir, name)
    if cpus is not None:
        launched.argv = ["taskset", "-c", cpus, *launched.argv]
    return launched


def kill_tree(pid: int) -> None:
    """SIGKILL a replica whole, as a crashed pod or a lost node goes: the arbiter and every worker
    (circus starts the workers in process groups of their own, so killpg would spare them)."""
    import psutil

    root = psutil.Process(pid)
    processes = [*root.children(recursive=True), root]
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(process) for process in processes):
        time.sleep(0.001)  # dead (a zombie has closed its sockets too): the instant of the loss


def alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def timeline(url: str, bodies, clients: int, seconds: float, at: float, event) -> dict:
    """Closed-loop clients for `seconds`; `event()` runs (off the loop) `at` seconds in and may return
    the perf_counter() instant it acted at ("at"). Every request: (sent, done, status or error), in
    seconds from that instant."""
    import aiohttp

    records: list[tuple[float, float, int | str]] = []
    started = time.perf_counter()
    fired: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client(index: int) -> None:
            sent_count = 0
            while time.perf_counter() - started < seconds:
                body, content_type = bodies[(index + sent_count) % len(bodies)]
                sent_count += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                        await response.read()
                        status: int | str = response.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                records.append((t0, time.perf_counter(), status))

        async def trigger() -> dict:
            await asyncio.sleep(at)
            fired.append(time.perf_counter())
            return await asyncio.get_running_loop().run_in_executor(None, event)

        *_, info = await asyncio.gather(*(client(i) for i in range(clients)), trigger())
    zero = info.pop("at", fired[0])
    return {"event": info, "requests": [(s - zero, d - zero, status) for s, d, status in records]}


def lose_replica(model: str, images: list[bytes], config: ReplicasConfig, logs: Path, mode: str,
                 retry_unanswered: bool) -> dict:
    """Two pinned replicas behind haproxy; `mode` ('kill' or 'stop') the second one a third of the way in."""
    bodies = [multipart(data) for data in images]
    with replica(model, logs, "r1", "0") as first, replica(model, logs, "r2", "1") as second, \
            Balancer([first, second], logs, retry_unanswered) as balancer:
        asyncio.run(timeline(balancer.url + "/classify", bodies, config.loss_clients, 1.0, 0.5, dict))

        def lose() -> dict:
            if mode == "stop":  # a rollout: the endpoint goes first (Kubernetes, during the preStop sleep)
                balancer.command("set server replicas/r2 state drain")
                time.sleep(PRESTOP_S)
            in_progress = balancer.in_progress("r2")
            at = time.perf_counter()
            if mode == "kill":
                kill_tree(second.process.pid)
            else:  # what the kubelet does: SIGTERM to the container's main process, BentoML's arbiter
                os.kill(second.process.pid, signal.SIGTERM)
            # the loss takes from `at` to now (every process dead, for a kill): a request sent before
            # now and not answered before `at` may have been on the replica as it went
            return {"in_progress_on_lost": in_progress, "at": at, "loss_s": time.perf_counter() - at}

        result = asyncio.run(timeline(balancer.url + "/classify", bodies, config.loss_clients, config.loss_seconds,
                                      config.loss_seconds / 3, lose))
        if mode == "stop":
            second.process.wait(timeout=60)
            result["event"]["exit_status"] = second.process.returncode
    return summarize_loss(result, mode, retry_unanswered)


def summarize_loss(result: dict, mode: str, retry_unanswered: bool) -> dict:
    requests = result["requests"]
    failed = [(sent, done, status) for sent, done, status in requests if status != 200]
    end = result["event"].get("loss_s", 0.0)  # the loss spans [0, end]

    def in_flight(request) -> bool:
        return request[0] < end and request[1] > 0

    after = [r for r in requests if r[0] >= end]
    latencies_after = [done - sent for sent, done, status in after if status == 200]
    bins = np.arange(np.floor(min(r[0] for r in requests)), max(r[1] for r in requests) + 0.25, 0.25)
    return {"mode": mode, "retry_unanswered": retry_unanswered, **result["event"],
            "requests": len(requests), "failed": len(failed),
            "failed_statuses": dict(Counter(str(status) for *_, status in failed)),
            "failures": [(round(sent, 4), round(done, 4), str(status)) for sent, done, status in failed],
            "failed_sent_after_loss": sum(1 for sent, *_ in failed if sent >= end),
            "failed_not_in_flight": sum(1 for r in failed if not in_flight(r)),
            "in_flight_at_loss": sum(1 for r in requests if in_flight(r)),
            "throughput_before": sum(1 for r in requests if r[2] == 200 and r[1] < 0) / max(1e-9, -bins[0]),
            "throughput_after": sum(1 for r in after if r[2] == 200) / max(1e-9, max(r[1] for r in requests)),
            "p99_ms_after": float(np.percentile(latencies_after, 99) * 1000) if latencies_after else None,
            "bins": bins.tolist(),
            "answered_per_bin": np.histogram([d for _, d, s in requests if s == 200], bins)[0].tolist(),
            "failed_per_bin": np.histogram([d for _, d, s in failed], bins)[0].tolist()}


def run(config: ReplicasConfig, out: Path) -> dict:
    from service.inference import container_cpus

    cpus = container_cpus()
    if cpus < 2:
        raise SystemExit("benchmarks.replicas: needs 2 CPUs or more (one per replica)")
    if not shutil.which("haproxy", path=os.environ["PATH"] + ":/usr/sbin:/sbin"):
        raise SystemExit("benchmarks.replicas: haproxy not installed (deploy/lb-tools.sh installs it)")
    images = [photo_like(*config.image, seed) for seed in range(8)]
    load = config.load()
    setups = {"one": ("one replica on CPU 0", [("r1", "0")]),
              "two": ("two replicas, on CPU 0 and on CPU 1", [("r1", "0"), ("r2", "1")]),
              "one_all_cpus": (f"one replica on all {cpus} CPUs (scaling up, for reference)", [("r1", None)])}
    results: dict = {"config": asdict(config), "cpus": cpus, "scaling": {}, "loss": []}
    with tempfile.TemporaryDirectory(prefix="keel-replicas-") as tmp:
        for key, (label, members) in setups.items():
            logs = Path(tmp) / key
            logs.mkdir()
            print(f"replicas: {label}", file=sys.stderr)
            launched = [replica(config.model, logs, name, pin) for name, pin in members]
            for server in launched:
                server.__enter__()
            try:
                with Balancer(launched, logs) as balancer:
                    rows = measure(balancer, images, load, config.concurrency,
                                   processes=[balancer.process.pid] + [s.process.pid for s in launched], batches=False)
            finally:
                for server in launched:
                    server.__exit__()
            results["scaling"][key] = {"label": label, "levels": rows}
        for mode, retry in (("kill", False), ("stop", False), ("kill", True)):
            logs = Path(tmp) / f"loss-{mode}-{retry}"
            logs.mkdir()
            print(f"replicas: losing one of two under load ({mode}, retrying unanswered: {retry})", file=sys.stderr)
            loss = lose_replica(config.model, images, config, logs, mode, retry)
            results["loss"].append(loss)
            print(f"  {loss['failed']} failed of {loss['requests']} ({loss['in_progress_on_lost']} in progress on "
                  f"the lost replica; {loss['failed_not_in_flight']} failed that were not in flight)", file=sys.stderr)
    plot(results, out / f"{NAME}.png")
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = results["loss"]
    fig, axes = plt.subplots(1, 1 + len(losses), figsize=(4.2 * (1 + len(losses)), 3.8), squeeze=False)
    axes = axes[0]
    for setup in results["scaling"].values():
        rows = setup["levels"]
        axes[0].plot([r["concurrency"] for r in rows], [r["throughput"]["median"] for r in rows], "o-",
                     label=setup["label"])
    axes[0].set(title="Throughput", xlabel="concurrent clients", ylabel="requests/s", xscale="log", ylim=(0, None))
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for axis, loss in zip(axes[1:], losses):
        edges = np.asarray(loss["bins"])
        width = edges[1] - edges[0]
        axis.bar(edges[:-1], np.asarray(loss["answered_per_bin"]) / width, width=width, align="edge", label="200")
        axis.bar(edges[:-1], np.asarray(loss["failed_per_bin"]) / width, width=width, align="edge", color="C3",
                 label="failed")
        axis.axvline(0, color="black", linestyle=":")
        axis.set(title=loss_title(loss), xlabel="seconds from the loss", ylabel="answers/s")
        axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def loss_title(loss: dict) -> str:
    what = "SIGKILL (crash)" if loss["mode"] == "kill" else "SIGTERM (drain)"
    return what + (", haproxy retrying" if loss["retry_unanswered"] else "")


def render(results: dict) -> str:
    config, scaling = results["config"], results["scaling"]
    lines = ["### Two replicas behind a load balancer", "",
             f"Each replica is Keel as shipped (`bentoml serve`), pinned to its own CPUs with `taskset` as a pod's "
             f"CPU limit bounds it, behind haproxy (least connections, /readyz checked every "
             f"{HEALTH_INTERVAL_MS} ms, a request whose connection failed retried on the other replica). "
             f"{results['cpus']} CPUs in all, shared with haproxy and the load generator "
             f"({config['repeats']} runs per level of {config['run_seconds']:g} s, median (min–max)). "
             "CPU ms/request counts the replicas and haproxy.", "",
             "| setup | clients | requests/s | p50 ms | p99 ms | errors | CPU ms/request |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for setup in scaling.values():
        for r in setup["levels"]:
            lines.append(f"| {setup['label']} | {r['concurrency']} | {fmt(r['throughput'], 0)} | {fmt(r['p50_ms'])} "
                         f"| {fmt(r['p99_ms'])} | {sum(r['errors'].values())} | {r['server_cpu_ms']:.2f} |")
    one = {r["concurrency"]: r for r in scaling["one"]["levels"]}
    ratios = [f"{r['concurrency']} clients ×{r['throughput']['median'] / one[c]['throughput']['median']:.2f}"
              for r in scaling["two"]["levels"] if (c := r["concurrency"]) in one]
    lines += ["", f"- **Scaling out**: two replicas against one, same CPUs per replica: {', '.join(ratios)}. "
              "On a machine whose every core runs a replica, haproxy and the load generator take their CPU from the "
              "replicas, so this is the floor of what a second node gives.", ""]
    lines += [f"**Losing one of two replicas** while {config['loss_clients']} clients keep sending "
              f"({config['loss_seconds']:g} s, the replica goes a third of the way in):", "",
              "| how | requests | failed | of them not in flight at the loss | in flight at the loss: all clients' "
              "/ on the lost replica as it began (haproxy) | requests/s before → after | p99 ms after |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for loss in results["loss"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in loss["failed_statuses"].items())
        failed = f"{loss['failed']} ({statuses})" if statuses else "0"
        p99 = f"{loss['p99_ms_after']:.0f}" if loss["p99_ms_after"] is not None else "—"
        lines.append(f"| {loss_title(loss)} | {loss['requests']} | {failed} | {loss['failed_not_in_flight']} "
                     f"| {loss['in_flight_at_loss']} / {loss['in_progress_on_lost']} "
                     f"| {loss['throughput_before']:.0f} → {loss['throughput_after']:.0f} | {p99} |")
    lines += ["", "A crash fails the requests the lost replica held and nothing else: later ones are refused at "
              "connect and haproxy sends them to the other replica. A stop (what Kubernetes does on a rollout or a "
              "scale-down) answers what it accepted and refuses the rest at once. Retrying unanswered "
              "classifications in the balancer turns a crash's losses into slower answers.", "",
              f"![scaling and the loss of a replica](benchmarks/{NAME}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", ReplicasConfig.model),
                        help="exported .onnx model (default: $KEEL_BENCH_MODEL or %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="results folder")
    parser.add_argument("--quick", action="store_true", help="a few seconds per setup, for smoke checks")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: no such model file (make model, or --model PATH)")
    config = ReplicasConfig.quick(args.model) if args.quick else ReplicasConfig(model=args.model)
    path = write_results(args.out, NAME, {"quick": args.quick, **run(config, args.out)})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
