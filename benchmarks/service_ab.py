"""The service at two commits under the same load, interleaved: did a change cost throughput or latency?

`python -m benchmarks.service_ab --base REV [--model M.onnx] [--large-model L.onnx] [--quick] --out DIR`

`--base` (any git revision) is extracted into a temporary folder; it and this working tree are served
side by side with the same virtual environment, the same models and the same settings (Keel's
defaults), beside the plain Starlette peer (benchmarks/peer_server.py). Then, for `rounds` rounds,
each load scenario (`concurrency` clients for `run_seconds`) runs against the base, the working tree
and the peer, in an order that alternates from round to round, so that whatever else the machine is
doing falls on all of them alike. Per scenario and server: the median over rounds of throughput, p50
and p99 latency and the server's CPU time per answered request (all its processes), and the working
tree's ratios to the base and to the peer. Writes DIR/service_ab.json and DIR/service_ab.md.

With `--large-model`, the same again for a full-size model (where inference, not the request path,
is the cost). Uploads are the photo-like 500x375 JPEG of benchmarks/service_load.py, as multipart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import spread, write_results
from benchmarks.limit import photo_like
from benchmarks.service_load import REPO, drive, keel, multipart, peer, tree_cpu_seconds

NAME = "service_ab"


def extract(revision: str, into: Path) -> str:
    """`revision`'s tree, as `git archive` gives it, in `into`; its full commit hash."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def working_tree() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return head + (" with uncommitted changes" if dirty else "")


def one_run(server, bodies, concurrency: int, seconds: float) -> dict:
    cpu = tree_cpu_seconds(server.process.pid)
    run = asyncio.run(drive(server.url + "/classify", bodies, concurrency, seconds, 10 ** 9))
    run["server_cpu_ms"] = (tree_cpu_seconds(server.process.pid) - cpu) / max(1, run["ok"]) * 1000
    return run


def compare(model: str, concurrency: tuple[int, ...], rounds: int, seconds: float, base_tree: Path,
            bodies, logs: Path) -> dict:
    names = ("base", "new", "peer")
    results: dict = {str(c): {name: [] for name in names} for c in concurrency}
    with keel(model, logs, "base", cwd=base_tree) as base, keel(model, logs, "new") as new, peer(model, logs) as plain:
        servers = {"base": base, "new": new, "peer": plain}
        for server in servers.values():  # warm-up: connections, batchers, caches
            asyncio.run(drive(server.url + "/classify", bodies, max(concurrency), 30, 200))
        for index in range(rounds):
            order = list(names) if index % 2 == 0 else list(reversed(names))
            for c in concurrency:
                for name in order:
                    run = one_run(servers[name], bodies, c, seconds)
                    results[str(c)][name].append(run)
                    print(f"  round {index + 1}/{rounds}, {c} clients, {name}: {run['throughput']:.0f} requests/s, "
                          f"p50 {run['p50']:.2f} ms, {run['server_cpu_ms']:.2f} ms CPU per request", file=sys.stderr)
    summary = {}
    for c, by_server in results.items():
        row = {}
        for name, runs in by_server.items():
            row[name] = {metric: spread([r[metric] for r in runs])
                         for metric in ("throughput", "p50", "p99", "server_cpu_ms")}
            row[name]["errors"] = sum(sum(r["errors"].values()) for r in runs)
        row["new_vs_base"] = {metric: ratio(row, "new", "base", metric) for metric in ("throughput", "p50",
                                                                                       "server_cpu_ms")}
        row["new_vs_peer"] = {metric: ratio(row, "new", "peer", metric) for metric in ("throughput", "p50")}
        summary[c] = row
    return {"model": model, "summary": summary}


def ratio(row: dict, a: str, b: str, metric: str) -> float:
    return row[a][metric]["median"] / row[b][metric]["median"]


def render(results: dict) -> str:
    lines = ["### The request path, before and after: interleaved A/B", "",
             f"Base `{results['base'][:12]}` against `{results['new']}`, served side by side with Keel's defaults, "
             f"beside the plain Starlette peer; {results['config']['rounds']} rounds of "
             f"{results['config']['run_seconds']:g} s per scenario, alternating the order, median (min–max) over "
             "rounds. CPU: the server's processes' CPU time per answered request.", ""]
    for scenario in results["scenarios"]:
        lines += [f"**{Path(scenario['model']).parent.name}/{Path(scenario['model']).name}**", "",
                  "| clients | server | requests/s | p50 ms | p99 ms | CPU ms/request | errors |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for c, row in scenario["summary"].items():
            for name in ("base", "new", "peer"):
                r = row[name]
                lines.append(f"| {c} | {name} | {r['throughput']['median']:.0f} ({r['throughput']['min']:.0f}–"
                             f"{r['throughput']['max']:.0f}) | {r['p50']['median']:.2f} | {r['p99']['median']:.2f} | "
                             f"{r['server_cpu_ms']['median']:.2f} | {r['errors']} |")
        lines.append("")
        for c, row in scenario["summary"].items():
            ab, vs_peer = row["new_vs_base"], row["new_vs_peer"]
            lines.append(f"- {c} clients: new / base throughput ×{ab['throughput']:.3f}, p50 ×{ab['p50']:.3f}, "
                         f"CPU per request ×{ab['server_cpu_ms']:.3f}; new / peer p50 ×{vs_peer['p50']:.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", "artifacts/model.onnx"),
                        help="exported .onnx model (default: $KEEL_BENCH_MODEL or %(default)s)")
    parser.add_argument("--large-model", default=os.environ.get("KEEL_BENCH_LARGE_MODEL", ""),
                        help="a full-size exported model to compare on too")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64], help="load levels (concurrent clients)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s: a smoke check, not for comparison")
    parser.add_argument("--out", type=Path, default=Path("build/service-ab"), help="results folder")
    args = parser.parse_args(argv)
    models = [m for m in (args.model, args.large_model) if m]
    for model in models:
        if not Path(model).is_file():
            parser.error(f"{model}: no such model file")
    rounds, seconds = (2, 1.0) if args.quick else (args.rounds, args.run_seconds)
    bodies = [multipart(photo_like(500, 375, seed)) for seed in range(8)]
    with tempfile.TemporaryDirectory(prefix="keel-ab-") as tmp:
        base_tree = Path(tmp) / "base"
        base_tree.mkdir()
        base = extract(args.base, base_tree)
        logs = Path(tmp) / "logs"
        logs.mkdir()
        scenarios = []
        for model in models:
            print(f"service_ab: {model}, base {base[:12]} against the working tree", file=sys.stderr)
            scenarios.append(compare(str(Path(model).resolve()), tuple(args.clients), rounds, seconds, base_tree,
                                     bodies, logs))
    results = {"base": base, "new": working_tree(), "quick": args.quick,
               "config": {"rounds": rounds, "run_seconds": seconds, "concurrency": args.clients},
               "scenarios": scenarios}
    path = write_results(args.out, NAME, results)
    (args.out / f"{NAME}.md").write_text(render(json.loads(path.read_text())) + "\n")
    print(f"wrote {path} and {args.out / (NAME + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
