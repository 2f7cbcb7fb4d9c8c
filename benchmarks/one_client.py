"""Where one client's time goes: Keel, Keel's engine without BentoML and the plain Starlette peer, each
with one and with two workers, at one client, in alternating order over rounds.

`python -m benchmarks.one_client --model artifacts/model.onnx [--rounds 2] --out DIR` -> DIR/one_client.json

Keel against its own engine on bare Starlette (benchmarks/engine_server.py) at the same worker count
is what BentoML's request path costs one client; Keel against the peer at each worker count is what
the worker layout costs. Results of one run: docs/benchmarks.md (design decisions).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.limit import photo_like
from benchmarks.service_load import LoadConfig, keel, measure, peer, without_bentoml


def servers(model: str, out: Path) -> dict:
    """name -> a launcher; `keel_1w` sets one worker with every CPU's ONNX Runtime threads."""
    return {
        "keel_2w": lambda: keel(model, out, "keel_2w"),
        "keel_1w": lambda: keel(model, out, "keel_1w", KEEL_WORKERS="1", KEEL_CPU_THREADS="0"),
        "engine_2w": lambda: without_bentoml(model, out, 2, 1),
        "engine_1w": lambda: without_bentoml(model, out, 1, 2),
        "peer_1w": lambda: peer(model, out, 1, "peer_1w"),
        "peer_2w": lambda: peer(model, out, 2, "peer_2w"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.one_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("KEEL_BENCH_MODEL", "artifacts/model.onnx"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("build/one-client"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images = [photo_like(500, 375, seed) for seed in range(8)]
    config = LoadConfig(model=args.model, repeats=3, run_seconds=3.0)
    launchers = servers(args.model, args.out)
    results: dict[str, list[dict]] = {name: [] for name in launchers}
    for round_ in range(args.rounds):
        order = list(launchers.items()) if round_ % 2 == 0 else list(reversed(launchers.items()))
        for name, launch in order:
            with launch() as server:
                row = measure(server, images, config, (1,), batches=name.startswith("keel"))[0]
            results[name].append(row)
            print(f"{name} round {round_ + 1}: {row['throughput']['median']:.0f} requests/s, "
                  f"p50 {row['p50_ms']['median']:.2f} ms", flush=True)
    (args.out / "one_client.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
