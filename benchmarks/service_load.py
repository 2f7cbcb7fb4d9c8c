"""The service under load, against its in-process limit and against the servers users would pick instead.

`python -m benchmarks.service_load --model artifacts/model.onnx [--large-model M.onnx] [--quick] --out docs/benchmarks`

Starts each server for real on 127.0.0.1 and drives it with a closed-loop load generator
(asyncio + aiohttp: `concurrency` clients, each sending its next request when the last one is
answered), every run bounded by a request count and a time:
- Keel as shipped (`bentoml serve`, adaptive batching, KEEL_* defaults);
- Keel with batching off (KEEL_MAX_BATCH_SIZE=1);
- Keel with the worker count its defaults did not choose (one worker, or one per CPU with one ONNX
  Runtime thread each), to show what the start-up choice (service/service.py) is worth;
- Keel with tighter latency budgets (KEEL_MAX_LATENCY_MS), at the higher concurrencies;
- the peers, each with one worker and with one per CPU (as a user would try both), ONNX Runtime's
  threads divided among them as Keel divides them: benchmarks/peer_server.py (plain Starlette
  under uvicorn, per-request inference), benchmarks/bentoml_docs_peer.py (the service BentoML's
  documentation shows: a typed batchable @bentoml.api taking PIL.Image) and
  benchmarks/ray_serve_peer.py (Ray Serve with @serve.batch), at PEER_CONCURRENCY clients;
- at the highest concurrency, the HTTP floor (the peer's /upload_only: the exchange alone) and
  Keel's engine without BentoML (benchmarks/engine_server.py: what BentoML's request path costs).
Every request is a multipart upload of a photo-like 500x375 JPEG, as `curl -F image=@...` sends.
Per run: throughput of good answers, p50/p90/p99 latency, errors by status; per level, the
batch sizes the adaptive batcher really formed (keel_batch_size in /metrics, before minus after).
The in-process pipeline (benchmarks/limit.py's, on the same JPEGs) is measured first; the
service's throughput at saturation is reported as a share of it, and its p50 at concurrency 1
as milliseconds added to it. With `--large-model` (a full-size network, where inference and not
HTTP is the cost) Keel as shipped, its other worker count and the peers are measured again on it.
Keel's goal against the peers: ahead of every peer (at its best worker count) on throughput and p99
at >= 16 clients, and within 10% of the best peer's throughput at 1 client; the page says whether
this run met it.
The load generator shares the machine's cores with the server, as any loopback benchmark does:
the numbers are for the whole machine, client included (whose CPU per request is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, spread, write_results
from benchmarks.limit import LimitConfig, bench_pipeline, photo_like

NAME = "service_load"
REPO = Path(__file__).resolve().parents[1]
BATCH_METRIC = "keel_batch_size"  # service/engine.py


@dataclass(frozen=True)
class LoadConfig:
    model: str = "artifacts/model.onnx"  # an exported Keel model
    concurrency: tuple[int, ...] = (1, 4, 16, 64)  # clients, each with one request in flight
    repeats: int = 3  # runs per level; medians and spread over these
    run_seconds: float = 3.0  # a run stops sending after this long...
    max_requests: int = 5000  # ...or after this many requests, whichever comes first
    warmup_requests: int = 64  # per level, untimed
    budgets_ms: tuple[int, ...] = (10, 50)  # KEEL_MAX_LATENCY_MS values tried beside the default
    budget_concurrency: tuple[int, ...] = (16, 64)
    workers_concurrency: tuple[int, ...] = (1, 16, 64)  # levels for the worker count the defaults did not pick
    floor_concurrency: tuple[int, ...] = (64,)  # levels for the HTTP floor (the peer's /upload_only)
    peer_concurrency: tuple[int, ...] = (1, 16, 64)  # levels for every peer
    peers: tuple[str, ...] = ("starlette", "bentoml_docs", "ray_serve")  # PEERS keys
    image: tuple[int, int] = (500, 375)  # JPEG size uploaded
    large_model: str = ""  # a second, full-size model: Keel, its other worker count and the peer again ("" = skip)

    @classmethod
    def quick(cls, model: str) -> LoadConfig:
        return cls(model=model, concurrency=(1, 16), repeats=2, run_seconds=0.3, max_requests=100,
                   warmup_requests=4, budgets_ms=(), budget_concurrency=(), workers_concurrency=(),
                   floor_concurrency=(), peer_concurrency=(1, 16), large_model="")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launched:
    """A server process in its own session on a free loopback port; always stopped on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_path: str, log_dir: Path, name: str,
                 cwd: Path = REPO, field: str = "image", start_timeout: float = 120):
        self.port = free_port()
        self.cwd = cwd  # the source tree it serves from (benchmarks/service_ab.py: another commit's)
        self.field, self.start_timeout = field, start_timeout  # the multipart field it reads the image from
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env, self.ready_path, self.name = {**os.environ, **env}, ready_path, name
        self.log_path = log_dir / f"{name}.log"

    def __enter__(self) -> Launched:
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"{self.name} not ready after {self.start_timeout:g} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


def keel(model: str, log_dir: Path, name: str, cwd: Path = REPO, **env: str) -> Launched:
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    return Launched([bentoml, "serve", "service.service:Classifier", "--host", "127.0.0.1", "--port", "{port}"],
                    {"KEEL_MODEL": str(Path(model).resolve()), "BENTOML_HOME": str(log_dir / "bentoml"),
                     "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(cwd), **env}, "/readyz", log_dir, name, cwd)


def peer(model: str, log_dir: Path, workers: int = 1, name: str = "peer") -> Launched:
    """The plain Starlette peer (benchmarks/peer_server.py) under uvicorn with `workers` processes."""
    from service.inference import container_cpus

    return Launched([sys.executable, "-m", "uvicorn", "benchmarks.peer_server:app", "--workers", str(workers),
                     "--host", "127.0.0.1", "--port", "{port}"],
                    {"PEER_MODEL": str(Path(model).resolve()),
                     "PEER_THREADS": str(max(1, container_cpus() // workers))},
                    "/healthz", log_dir, name)


def bentoml_docs(model: str, log_dir: Path, workers: int, name: str) -> Launched:
    """BentoML's documented way (benchmarks/bentoml_docs_peer.py): `bentoml serve` with `workers` workers."""
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    return Launched([bentoml, "serve", "benchmarks.bentoml_docs_peer:DocsClassifier", "--host", "127.0.0.1",
                     "--port", "{port}"],
                    {"PEER_MODEL": str(Path(model).resolve()), "PEER_WORKERS": str(workers),
                     "BENTOML_HOME": str(log_dir / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"},
                    "/readyz", log_dir, name, field="images")


def ray_serve(model: str, log_dir: Path, replicas: int, name: str) -> Launched:
    """Ray Serve with @serve.batch (benchmarks/ray_serve_peer.py) on a local Ray of its own, `replicas` replicas."""
    return Launched([sys.executable, "-m", "benchmarks.ray_serve_peer", "--model", str(Path(model).resolve()),
                     "--port", "{port}", "--replicas", str(replicas)], {"RAY_USAGE_STATS_ENABLED": "0"},
                    "/classify", log_dir, name, start_timeout=300)


# The peers: key -> (label, launcher(model, log_dir, workers, name), what "workers" are called there)
PEERS = {
    "starlette": ("Peer: plain Starlette + ONNX Runtime, uvicorn, per-request", peer, "uvicorn worker"),
    "bentoml_docs": ("Peer: BentoML's documented service, batchable @bentoml.api taking PIL.Image", bentoml_docs,
                     "worker"),
    "ray_serve": ("Peer: Ray Serve, @serve.batch", ray_serve, "replica"),
}


def without_bentoml(model: str, log_dir: Path, workers: int, threads: int) -> Launched:
    """Keel's engine, uploads and decoding on bare uvicorn + Starlette (benchmarks/engine_server.py)."""
    return Launched([sys.executable, "-m", "uvicorn", "benchmarks.engine_server:app", "--workers", str(workers),
                     "--host", "127.0.0.1", "--port", "{port}"],
                    {"ENGINE_MODEL": str(Path(model).resolve()), "ENGINE_WORKERS": str(workers),
                     "ENGINE_THREADS": str(threads)}, "/readyz", log_dir, "without_bentoml")


def multipart(data: bytes, field: str = "image") -> tuple[bytes, str]:
    """A multipart body built once, so the client spends its CPU on sending, not encoding."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="photo.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def drive(url: str, bodies: list[tuple[bytes, str]], concurrency: int, seconds: float,
                max_requests: int) -> dict:
    """Closed-loop load: `concurrency` clients until `seconds` pass or `max_requests` are sent."""
    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    sent = 0
    cpu_before = process_cpu_seconds()
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def client() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                body, content_type = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": content_type}) as response:
                        await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    status = type(exc).__name__
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                statuses[status] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    client_cpu = process_cpu_seconds() - cpu_before
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {"requests": sent, "ok": len(latencies), "seconds": elapsed, "throughput": len(latencies) / elapsed,
            "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)),
            "errors": {str(k): v for k, v in statuses.items() if k != 200}, "client_cpu_s": client_cpu}


def process_cpu_seconds() -> float:
    """CPU time of this process, all its threads (the load generator's cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a server: its process and every process under it (BentoML's workers)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # gone meanwhile
            pass
    return total


def tree_pss_mib(pid: int) -> float | None:
    """Memory of a server: the proportional set size of its process and every process under it (shared
    pages split among the processes sharing them, so the sum is what they hold together)."""
    import psutil

    total = 0
    try:
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            try:
                total += process.memory_full_info().pss
            except psutil.Error:  # gone meanwhile
                pass
    except (psutil.Error, AttributeError):  # no PSS outside Linux
        return None
    return round(total / 2**20, 1)


def served_workers(url: str) -> tuple[int, int]:
    """The HTTP workers a running Keel chose, and ONNX Runtime threads per worker (its /metadata)."""
    import json

    with urllib.request.urlopen(url + "/metadata", timeout=10) as response:
        meta = json.loads(response.read())
    return meta["service"]["workers"], meta["cpu_threads"]


def batch_histogram(url: str) -> dict[str, float]:
    """Keel's cumulative histogram of formed batch sizes (service/engine.py): {le: count, 'sum': ..., 'count': ...}."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            lines = response.read().decode().splitlines()
    except OSError:
        return {}
    totals: Counter = Counter()
    for line in lines:
        if not line.startswith(BATCH_METRIC):
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith(BATCH_METRIC + "_bucket"):
            totals[name.split('le="', 1)[1].split('"', 1)[0]] += float(value)
        elif name.startswith(BATCH_METRIC + "_sum"):
            totals["sum"] += float(value)
        elif name.startswith(BATCH_METRIC + "_count"):
            totals["count"] += float(value)
    return dict(totals)


def batches_between(before: dict, after: dict) -> dict | None:
    """Batches formed between two scrapes: how many, mean size, and the count per size bucket."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    if not delta.get("count"):
        return None
    buckets = sorted((float(k), v) for k, v in delta.items() if k not in ("sum", "count"))
    per_bucket, below = {}, 0.0
    for le, cumulative in buckets:  # cumulative -> per bucket
        if cumulative - below:
            per_bucket["+Inf" if le == float("inf") else f"<={le:g}"] = int(cumulative - below)
        below = cumulative
    return {"batches": int(delta["count"]), "mean_size": delta["sum"] / delta["count"], "per_bucket": per_bucket}


def measure(server: Launched, images: list[bytes], config: LoadConfig, levels: tuple[int, ...],
            path: str = "/classify", processes: list[int] | None = None, batches: bool = True) -> list[dict]:
    """Each level: untimed warm-up, then `config.repeats` runs. `processes`: the process trees whose CPU
    and memory count as the server's (default: the launched process); `batches`: read Keel's batch
    histogram from the server's /metrics (not through a load balancer, which shows one replica's)."""
    url = server.url + path
    bodies = [multipart(data, server.field) for data in images]
    processes = processes or [server.process.pid]
    rows = []
    for concurrency in levels:
        asyncio.run(drive(url, bodies, concurrency, 30, config.warmup_requests))
        before = batch_histogram(server.url) if batches else {}
        server_cpu = sum(tree_cpu_seconds(pid) for pid in processes)
        runs = [asyncio.run(drive(url, bodies, concurrency, config.run_seconds, config.max_requests))
                for _ in range(config.repeats)]
        server_cpu = sum(tree_cpu_seconds(pid) for pid in processes) - server_cpu
        answered = max(1, sum(r["ok"] for r in runs))
        errors: Counter = Counter()
        for run in runs:
            errors.update(run["errors"])
        row = {"concurrency": concurrency, "requests": sum(r["requests"] for r in runs), "errors": dict(errors),
               "throughput": spread([r["throughput"] for r in runs]),
               **{f"{p}_ms": spread([r[p] for r in runs if not np.isnan(r[p])] or [float("nan")])
                  for p in ("p50", "p90", "p99")},
               "batches": batches_between(before, batch_histogram(server.url)) if batches else None,
               # CPU per good answer, over all runs of the level: where the machine's time went
               "server_cpu_ms": server_cpu / answered * 1000,
               "client_cpu_ms": sum(r["client_cpu_s"] for r in runs) / answered * 1000,
               "server_pss_mib": sum(tree_pss_mib(pid) or 0 for pid in processes) or None}
        rows.append(row)
        batch = f", mean batch {row['batches']['mean_size']:.1f}" if row["batches"] else ""
        print(f"  {server.name} c={concurrency:3d}: {fmt(row['throughput'])} req/s, p50 {fmt(row['p50_ms'])} ms, "
              f"p99 {fmt(row['p99_ms'])} ms, errors {sum(errors.values())}{batch}", file=sys.stderr)
    return rows


def run(config: LoadConfig, out: Path) -> dict:
    images = [photo_like(*config.image, seed) for seed in range(8)]
    results = {"config": asdict(config), **scenario(config.model, config, images, full=True)}
    plot(results, out / f"{NAME}.png")
    if config.large_model:
        results["large"] = scenario(config.large_model, config, images, full=False)
        plot(results["large"], out / f"{NAME}_large.png")
    plot_peers([results] + ([results["large"]] if config.large_model else []), out / f"{NAME}_peers.png")
    return results


def scenario(model: str, config: LoadConfig, images: list[bytes], full: bool) -> dict:
    """One model: its in-process pipeline, then Keel as shipped and the peer under the same load;
    `full` adds Keel's variants (batching off, latency budgets); both get the other worker count."""
    from service.inference import container_cpus, read_model_info

    model_info = read_model_info(model)
    print(f"service_load: {model_info.name} ({model_info.arch}, {model_info.preprocessing.crop} px): in-process "
          f"pipeline on {config.image[0]}x{config.image[1]} JPEGs", file=sys.stderr)
    pipeline = bench_pipeline(model, images,
                              LimitConfig(repeats=config.repeats, run_seconds=min(config.run_seconds, 2.0),
                                          pipeline_images=128 if config.repeats < 3 or not full else 512))
    info = {"name": model_info.name, "arch": model_info.arch, "crop": model_info.preprocessing.crop,
            "mib": round(Path(model).stat().st_size / 2**20, 1), "provider": pipeline["provider"]}
    print(f"  pipeline: {fmt(pipeline['images_per_s'])} images/s, one image {fmt(pipeline['single_image_ms'], 2)} ms",
          file=sys.stderr)

    servers = {}
    with tempfile.TemporaryDirectory(prefix="keel-bench-") as tmp:
        logs = Path(tmp)
        with keel(model, logs, "keel") as server:
            workers, threads = served_workers(server.url)
            servers["keel"] = {"label": f"Keel (defaults: {workers} HTTP worker{'s' if workers > 1 else ''}, chosen at "
                                        "start-up)", "workers": workers,
                               "levels": measure(server, images, config, config.concurrency)}
        # the worker count the defaults did not choose, to show what the choice is worth
        cpus = container_cpus()
        other = (("keel_workers_other", "Keel, 1 HTTP worker (KEEL_WORKERS=1)",
                  keel(model, logs, "keel_workers_other", KEEL_WORKERS="1"))
                 if workers > 1 else
                 ("keel_workers_other", f"Keel, one HTTP worker per CPU (KEEL_WORKERS={cpus} KEEL_CPU_THREADS=1)",
                  keel(model, logs, "keel_workers_other", KEEL_WORKERS=str(cpus), KEEL_CPU_THREADS="1")))
        plan = []
        if full:
            plan += [("keel_unbatched", "Keel, batching off (KEEL_MAX_BATCH_SIZE=1)",
                      keel(model, logs, "keel_unbatched", KEEL_MAX_BATCH_SIZE="1"), config.concurrency)]
        if cpus > 1:
            plan += [(*other, config.workers_concurrency)]
        for kind in config.peers:  # each peer with one worker and with one per CPU
            label, launcher, unit = PEERS[kind]
            for count in sorted({1, cpus}):
                key = f"peer_{kind}_{count}"
                plan += [(key, f"{label}, {count} {unit}{'s' if count > 1 else ''}",
                          launcher(model, logs, count, key), config.peer_concurrency)]
        if full:
            plan += [(f"keel_budget_{ms}ms", f"Keel, KEEL_MAX_LATENCY_MS={ms}",
                      keel(model, logs, f"keel_budget_{ms}ms", KEEL_MAX_LATENCY_MS=str(ms)),
                      config.budget_concurrency) for ms in config.budgets_ms]
            plan += [("floor", "HTTP floor: the peer reading the upload and answering without decoding or inference",
                      peer(model, logs), config.floor_concurrency, "/upload_only")]
            plan += [("without_bentoml", f"Keel's engine without BentoML: bare Starlette, {workers} uvicorn "
                      f"worker{'s' if workers > 1 else ''}", without_bentoml(model, logs, workers, threads),
                      config.floor_concurrency)]
        for key, label, launcher, levels, *path in plan:
            if not levels:
                continue
            with launcher as server:
                servers[key] = {"label": label, "levels": measure(server, images, config, levels, *path)}

    return {"model": info, "pipeline": pipeline, "servers": servers,
            "summary": summarize(pipeline, servers, container_cpus())}


def summarize(pipeline: dict, servers: dict, cpus: int) -> dict:
    """The targets' figures: Keel's peak against the pipeline and against what the CPUs allow, its
    added latency at one client, and how it stands against the best peer at each level (the goal)."""
    keel_rows = servers["keel"]["levels"]
    best = max(keel_rows, key=lambda r: r["throughput"]["median"])
    c1 = next((r for r in keel_rows if r["concurrency"] == 1), None)
    summary = {
        "saturation_concurrency": best["concurrency"],
        "saturation_ratio": best["throughput"]["median"] / pipeline["images_per_s"]["median"],
        "added_p50_ms_at_1": (c1["p50_ms"]["median"] - pipeline["single_image_ms"]["median"]) if c1 else None,
    }
    if "floor" in servers:
        # The floor's own throughput is one Python process's (its GIL), not the machine's: what bounds
        # a server is CPU time. Per request: the pipeline's work plus the bare exchange (server + client).
        floor = max(servers["floor"]["levels"], key=lambda r: r["throughput"]["median"])
        per_request = pipeline["cpu_ms_per_image"]["median"] + floor["server_cpu_ms"] + floor["client_cpu_ms"]
        summary["bare_request_cpu_ms"] = per_request
        summary["cpu_bound"] = cpus * 1000 / per_request
        summary["cpu_bound_ratio"] = best["throughput"]["median"] / summary["cpu_bound"]
        # what a request may cost in all (server + load generator) for the service to reach 80% of the pipeline
        summary["request_cpu_ms_at_80"] = cpus * 1000 / (0.8 * pipeline["images_per_s"]["median"])
    if "without_bentoml" in servers:
        bare = max(servers["without_bentoml"]["levels"], key=lambda r: r["throughput"]["median"])
        summary["without_bentoml_ratio"] = bare["throughput"]["median"] / pipeline["images_per_s"]["median"]
    peers = {key: server for key, server in servers.items() if key.startswith("peer_")}
    if peers:
        summary["vs_peers"], summary["goal_misses"] = against_peers(keel_rows, peers)
        summary["goal_met"] = not summary["goal_misses"]
    return summary


def against_peers(keel_rows: list[dict], peers: dict) -> tuple[dict, list[str]]:
    """Per level the peers were measured at: the best peer on throughput and on p99 (each peer at
    whichever worker count did best there) and Keel's ratios to them; and where Keel misses its goal
    (ahead on both at >= 16 clients, throughput within 10% of the best at 1 client)."""
    table, misses = {}, []
    levels = sorted({r["concurrency"] for server in peers.values() for r in server["levels"]})
    for level in levels:
        keel = next((r for r in keel_rows if r["concurrency"] == level), None)
        rows = [(key, r) for key, server in peers.items() for r in server["levels"] if r["concurrency"] == level]
        if keel is None or not rows:
            continue
        fastest = max(rows, key=lambda kr: kr[1]["throughput"]["median"])
        steadiest = min(rows, key=lambda kr: kr[1]["p99_ms"]["median"])
        entry = table[str(level)] = {
            "best_throughput": {"server": fastest[0], "value": fastest[1]["throughput"]["median"]},
            "best_p99": {"server": steadiest[0], "value": steadiest[1]["p99_ms"]["median"]},
            "throughput_ratio": keel["throughput"]["median"] / fastest[1]["throughput"]["median"],
            "p99_ratio": keel["p99_ms"]["median"] / steadiest[1]["p99_ms"]["median"]}
        if level >= 16 and entry["throughput_ratio"] <= 1:
            misses.append(f"throughput at {level} clients: {entry['throughput_ratio']:.2f}x "
                          f"{peers[fastest[0]]['label']}'s")
        if level >= 16 and entry["p99_ratio"] >= 1:
            misses.append(f"p99 at {level} clients: {entry['p99_ratio']:.2f}x {peers[steadiest[0]]['label']}'s")
        if level == 1 and entry["throughput_ratio"] < 0.9:
            misses.append(f"throughput at 1 client: {entry['throughput_ratio']:.2f}x "
                          f"{peers[fastest[0]]['label']}'s (goal >= 0.90)")
    return table, misses


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, style in (("keel", "o-"), ("keel_unbatched", "s--"), ("keel_workers_other", "d-."),
                       ("peer_starlette_1", "^-")):
        if key not in results["servers"]:
            continue
        rows = results["servers"][key]["levels"]
        x = [r["concurrency"] for r in rows]
        for axis, metric in ((left, "throughput"), (right, "p99_ms")):
            median = np.asarray([r[metric]["median"] for r in rows])
            err = [median - [r[metric]["min"] for r in rows], np.asarray([r[metric]["max"] for r in rows]) - median]
            axis.errorbar(x, median, yerr=err, fmt=style, capsize=3, label=results["servers"][key]["label"])
    left.axhline(results["pipeline"]["images_per_s"]["median"], color="grey", linestyle=":",
                 label="in-process pipeline (limit)")
    if results["summary"].get("cpu_bound"):
        left.axhline(results["summary"]["cpu_bound"], color="black", linestyle="--", linewidth=0.8,
                     label="what the CPUs allow: pipeline + bare HTTP exchange")
    left.set(title="Throughput (median, min–max bars)", xlabel="concurrent clients", ylabel="requests/s",
             xscale="log", ylim=(0, results["pipeline"]["images_per_s"]["median"] * 1.5))  # room for the legend
    right.set(title="p99 latency (median, min–max bars)", xlabel="concurrent clients", ylabel="ms",
              xscale="log", yscale="log")
    for axis in (left, right):
        levels = sorted({r["concurrency"] for server in results["servers"].values() for r in server["levels"]})
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.grid(alpha=0.3)
    left.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_peers(scenarios: list[dict], path: Path) -> None:
    """Keel against every peer: throughput and p99 per level, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 4.4 * len(scenarios)), squeeze=False)
    for (left, right), results in zip(axes, scenarios):
        keys = ["keel"] + [key for key in results["servers"] if key.startswith("peer_")]
        for index, key in enumerate(keys):
            rows = results["servers"][key]["levels"]
            x = [r["concurrency"] for r in rows]
            kind = (index - 1) // 2  # peers come in pairs: one worker, one per CPU
            style = dict(marker="o", linewidth=2.5, color="black") if key == "keel" else dict(
                marker="s^Dv"[kind % 4], linestyle="-" if key.endswith("_1") else "--", color=f"C{kind}")
            for axis, metric in ((left, "throughput"), (right, "p99_ms")):
                axis.plot(x, [r[metric]["median"] for r in rows], label=results["servers"][key]["label"], **style)
        title = model_text(results["model"]) if results.get("model") else ""
        left.set(title=f"Throughput\n{title}", xlabel="concurrent clients", ylabel="requests/s", xscale="log")
        right.set(title=f"p99 latency\n{title}", xlabel="concurrent clients", ylabel="ms", xscale="log",
                  yscale="log")
        for axis in (left, right):
            levels = sorted({r["concurrency"] for server in results["servers"].values() for r in server["levels"]})
            axis.set_xticks(levels, [str(c) for c in levels])
            axis.grid(alpha=0.3)
        left.set_ylim(bottom=0)
    axes[0][1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results: dict) -> str:
    config = results["config"]
    lines = [
        "### The service under load, and the servers users would pick instead",
        "",
        f"Closed-loop clients (asyncio + aiohttp, on the same machine) upload a {config['image'][0]}x"
        f"{config['image'][1]} photo-like JPEG as multipart; each run stops after {config['run_seconds']:g} s or "
        f"{config['max_requests']} requests; {config['repeats']} runs per level, median (min–max). "
        "Throughput counts good answers only; latency is the client's, request sent to answer read. "
        "\"batches\" is the mean batch size the adaptive batcher formed (Keel's `keel_batch_size` histogram "
        "in `/metrics`). The load generator runs on the same cores as the server; \"CPU ms/request\" is the "
        "server's processes' CPU time per good answer, plus the load generator's; \"MiB\" is the memory the "
        "server's processes hold together (proportional set size) after the level's runs.",
        "",
        "The peers, on the same model, JPEGs, preprocessing (Keel's, reduced-size JPEG decode included), load "
        "generator and machine, in the same run, each with one worker and with one per CPU (ONNX Runtime's "
        "threads divided among them): a plain Starlette app under uvicorn with per-request inference "
        "(`benchmarks/peer_server.py`); the service BentoML's documentation shows, a typed "
        "`@bentoml.api(batchable=True)` taking `PIL.Image` (`benchmarks/bentoml_docs_peer.py`); Ray Serve with "
        "`@serve.batch` (`benchmarks/ray_serve_peer.py`, its processes' CPU included). Keel's goal: ahead of "
        "every peer on throughput and p99 at >= 16 clients, and within 10% of the best peer's throughput at "
        "1 client, each peer at whichever worker count did best at that level.",
        "",
    ]
    if results.get("model"):
        lines += [f"**{model_text(results['model'])}**, the benchmarks' 64 px model (the quick-start architecture): "
                  "inference is a fraction of a millisecond, so this measures the HTTP path.", ""]
    lines += scenario_lines(results, "")
    if results.get("large"):
        lines += [f"**{model_text(results['large']['model'])}**: a full-size network (one epoch on a few "
                  "images: speed does not depend on the weights), where inference is the cost, as in most "
                  "deployments.", ""]
        lines += scenario_lines(results["large"], "_large")
    if any(key.startswith("peer_") and key != "peer_starlette_1" for key in results.get("servers", {})):
        lines += ["![Keel against the peers: throughput and p99 vs concurrency](benchmarks/service_load_peers.png)", ""]
    return "\n".join(lines)


def model_text(info: dict) -> str:
    return f"{info['arch']} at {info['crop']} px ({info['mib']} MiB, {info['provider']})"


def scenario_lines(results: dict, suffix: str) -> list[str]:
    summary, pipeline = results["summary"], results["pipeline"]
    lines = ["| server | clients | requests/s | p50 ms | p90 ms | p99 ms | errors | batches | CPU ms/request | MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for server in results["servers"].values():
        for r in server["levels"]:
            errors = sum(r["errors"].values())
            error_text = f"{errors} ({', '.join(f'{k}: {v}' for k, v in r['errors'].items())})" if errors else "0"
            batch = f"{r['batches']['mean_size']:.1f}" if r.get("batches") else "—"
            memory = f"{r['server_pss_mib']:.0f}" if r.get("server_pss_mib") else "—"
            lines.append(f"| {server['label']} | {r['concurrency']} | {fmt(r['throughput'], 0)} | {fmt(r['p50_ms'])} "
                         f"| {fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {error_text} | {batch} | {cpu_text(r)} "
                         f"| {memory} |")
    ratio = summary["saturation_ratio"]
    best = next(r for r in results["servers"]["keel"]["levels"]
                if r["concurrency"] == summary["saturation_concurrency"])
    lines += ["", f"- **Against the limit**: the in-process pipeline (preprocess + inference, same JPEGs) does "
              f"{fmt(pipeline['images_per_s'], 0)} images/s; Keel peaks at {ratio:.0%} of it "
              f"(at {summary['saturation_concurrency']} clients; target ≥ 80%: "
              f"{'met' if ratio >= 0.8 else 'not met'})."]
    if pipeline.get("cpu_ms_per_image") and best.get("server_cpu_ms"):
        lines.append(f"- **Where the CPU goes**: the pipeline spends {pipeline['cpu_ms_per_image']['median']:.2f} ms "
                     f"of CPU per image; Keel at {best['concurrency']} clients {best['server_cpu_ms']:.2f} ms per "
                     f"request (the rest is the HTTP path), and the load generator "
                     f"{best['client_cpu_ms']:.2f} ms of the same cores.")
    if summary.get("cpu_bound"):
        floor = max(results["servers"]["floor"]["levels"], key=lambda r: r["throughput"]["median"])
        lines.append(f"- **What the CPUs allow**: a bare Starlette handler reading the same uploads and answering at "
                     f"once (no decoding, no inference; uvicorn with its access log, as Keel keeps one) costs "
                     f"{cpu_text(floor)} ms of CPU per request (server + load generator; its "
                     f"{fmt(floor['throughput'], 0)} requests/s are one Python process's). With the pipeline's "
                     f"{pipeline['cpu_ms_per_image']['median']:.2f} ms per image, these CPUs could answer at most "
                     f"{summary['cpu_bound']:.0f} requests/s "
                     f"({summary['cpu_bound'] / pipeline['images_per_s']['median']:.0%} "
                     f"of the pipeline) if a server spent nothing more. Keel's requests cost {cpu_text(best)} ms "
                     f"and it reaches {summary['cpu_bound_ratio']:.0%} of that bound: the difference is its own "
                     f"request path (BentoML's middleware, multipart parsing, the adaptive batcher and its hand-off to "
                     f"the inference thread).")
        if ratio < 0.8:
            bare, allowed = summary["bare_request_cpu_ms"], summary["request_cpu_ms_at_80"]
            spent = best["server_cpu_ms"] + best["client_cpu_ms"]
            lines.append(f"- **What 80% would take**: at 80% of the pipeline's rate these CPUs leave "
                         f"{allowed:.2f} ms of CPU per request, server and load generator together: "
                         f"{allowed - bare:.2f} ms above the pipeline's work plus the bare exchange, for everything a "
                         f"serving stack adds to a bare handler. Keel spends {spent - bare:.2f} ms there.")
    if summary.get("without_bentoml_ratio") is not None:
        engine = max(results["servers"]["without_bentoml"]["levels"], key=lambda r: r["throughput"]["median"])
        lines.append(f"- **Without BentoML**: Keel's own upload reading, decoding, batcher and engine behind a bare "
                     f"Starlette app (uvicorn's access log; no BentoML metrics, concurrency limit, deadline or "
                     f"request context) cost {cpu_text(engine)} ms per request and reach "
                     f"{summary['without_bentoml_ratio']:.0%} of the pipeline at {engine['concurrency']} clients, "
                     f"against Keel's {ratio:.0%}: BentoML's request path costs "
                     f"{best['server_cpu_ms'] - engine['server_cpu_ms']:.2f} ms of server CPU per request.")
    if summary.get("added_p50_ms_at_1") is not None:
        added = summary["added_p50_ms_at_1"]
        lines.append(f"- **Added latency**: at 1 client Keel's p50 is {added:.1f} ms above the in-process "
                     f"single-image time of {pipeline['single_image_ms']['median']:.2f} ms (target < 5 ms: "
                     f"{'met' if added < 5 else 'not met'}).")
    if summary.get("vs_peers"):
        lines += peer_lines(results)
    budgets = [(key, row) for key, server in results["servers"].items() if key.startswith("keel_budget_")
               for row in server["levels"]]
    if budgets:
        key, row = max(budgets, key=lambda kr: sum(kr[1]["errors"].values()) / max(1, kr[1]["requests"]))
        shed = sum(row["errors"].values()) / max(1, row["requests"])
        lines.append(f"- **Latency budgets**: a budget the load cannot meet is kept by shedding (503). A shed "
                     f"request has been read and decoded already, so the sheds cost CPU: with "
                     f"{key.removeprefix('keel_budget_').replace('ms', ' ms')} at {row['concurrency']} clients, "
                     f"{shed:.0%} of requests were shed and {fmt(row['throughput'], 0)} good answers/s remained. "
                     "Keep KEEL_MAX_LATENCY_MS at a bound clients would rather fail than wait past, not a target.")
    lines += ["", f"![throughput and p99 vs concurrency](benchmarks/{NAME}{suffix}.png)", ""]
    return lines


def peer_lines(results: dict) -> list[str]:
    """Keel against the best peer at each level, and whether this run met the goal."""
    summary, servers = results["summary"], results["servers"]
    keel = {str(r["concurrency"]): r for r in servers["keel"]["levels"]}
    goal = "**met**" if summary["goal_met"] else "**not met** (" + "; ".join(summary["goal_misses"]) + ")"
    lines = [f"- **Against the peers**: Keel's goal {goal} in this run.", "",
             "| clients | Keel requests/s | best peer | its requests/s | Keel / best | Keel p99 ms | lowest-p99 peer "
             "| its p99 ms | Keel / lowest |", "|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for level, entry in summary["vs_peers"].items():
        fast, steady = entry["best_throughput"], entry["best_p99"]
        lines.append(f"| {level} | {keel[level]['throughput']['median']:.0f} | {servers[fast['server']]['label']} "
                     f"| {fast['value']:.0f} | ×{entry['throughput_ratio']:.2f} "
                     f"| {keel[level]['p99_ms']['median']:.1f} "
                     f"| {servers[steady['server']]['label']} | {steady['value']:.1f} | ×{entry['p99_ratio']:.2f} |")
    return lines + [""]


def cpu_text(row: dict) -> str:
    """Server + client CPU per answered request ("—" for results from before it was measured)."""
    if row.get("server_cpu_ms") is None:
        return "—"
    return f"{row['server_cpu_ms']:.2f} + {row['client_cpu_ms']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", LoadConfig.model),
                        help="exported .onnx model (default: $KEEL_BENCH_MODEL or %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="results folder")
    parser.add_argument("--large-model", default=os.environ.get("KEEL_BENCH_LARGE_MODEL", ""),
                        help="a full-size exported model to measure too (default: $KEEL_BENCH_LARGE_MODEL)")
    parser.add_argument("--quick", action="store_true", help="a few seconds per server, for smoke checks")
    args = parser.parse_args(argv)
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: no such model file (make model, or --model PATH)")
    config = LoadConfig.quick(args.model) if args.quick else LoadConfig(model=args.model, large_model=args.large_model)
    path = write_results(args.out, NAME, {"quick": args.quick, **run(config, args.out)})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
