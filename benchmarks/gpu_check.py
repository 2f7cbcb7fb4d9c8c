"""`make gpu-check`: Keel's CUDA path end to end on one GPU, every number written to docs/gpu.md.

`python -m benchmarks.gpu_check [--dry-run] [--out DIR] [--budget SECONDS]`   (`make gpu-check [DRY=1]`)

Made for a GPU host with no network: Python 3.12 with torch (CUDA), onnx, onnxscript, numpy, pillow
and matplotlib, and the serving wheels from `source .gpu/bin/install.sh` (../shared/gpu/prepare.sh
makes them); no virtual environment, no pip. Stages, in this order, each in its own process with
its own time budget inside one overall budget (default 440 s, under 8 minutes on one H100), so one
that fails or hangs costs only itself; every result is written as soon as its stage ends
(docs/gpu.json, docs/gpu.md, and $OUT when that is set), so nothing already measured is lost:

  environment  machine, GPU, versions; `python -m service.doctor --device cuda`: the provider a session
               really gets, and each CUDA/cuDNN library the CUDA provider needs with the file it loads
  data         the shapes data set at 224 px; photo-like 500x375 JPEGs for the serving stages
  training     alexnet_bn and inception_v1_bn at 224 px, full width, a few epochs, `--precision auto`
               (bf16 from Ampere on) and `--channels-last auto`
  export       that alexnet_bn checkpoint to fp32, fp16 and uint8-input ONNX; parity on the CUDA provider
  inference    per model: the provider, warm-up per batch bucket, images/s per batch size (the yardstick)
  transfer     host-to-GPU copy time per batch (torch): float32 NCHW against uint8 NHWC, pageable and pinned
  batch_job    `service.batch` against min(decoding alone, inference alone); target >= 90%
  service      `bentoml serve` on the GPU under 1-256 clients against the in-process pipeline
  nonfinite    a NaN step under bf16 autocast on CUDA is skipped, the weights and statistics untouched
  resume       kill -9 and `--resume` end with the same weights as an uninterrupted run

`--dry-run` runs the same stages and code on the CPU with tiny sizes (64 px, a few images, the CPU
provider, fewer clients) in a minute or two, into build/gpu-check-dry/, leaving docs/ alone; the
CUDA-only checks are reported as "skipped (no GPU)". tests/test_gpu_check.py runs it.
Exit status: 0 every stage ran and no check failed, 1 otherwise, 2 no CUDA GPU without --dry-run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NAME = "gpu"
PASSED, FAILED, NO_GPU = "passed", "failed", "skipped (no GPU)"
ARCHS = ("alexnet_bn", "inception_v1_bn")
MODEL_ARGS = {"alexnet_bn": {"dropout": 0.0}, "inception_v1_bn": {"aux_logits": False, "dropout": 0.0}}


@dataclass(frozen=True)
class CheckConfig:
    """Sizes and time budgets of one run; `dry()` is the CPU smoke version of the same stages."""

    dry_run: bool = False
    budget_s: float = 440.0  # the whole run; each stage also has its own cap (STAGE_BUDGETS)
    image_size: int = 224
    resize: int = 256
    width: float = 1.0  # the published architectures
    train_per_class: int = 64  # shapes: 10 classes
    val_per_class: int = 8
    test_per_class: int = 16  # fp16's accuracy check: one flipped answer of 160 is 0.6 points (bound: 1)
    epochs: int = 3
    batch_size: int = 64
    loader_workers: int = 8
    jpegs: int = 2048  # photo-like 500x375 JPEGs: a batch-job run of about a second on 16 cores
    inference_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    measure_seconds: float = 0.3  # per inference measurement; three of them per batch size
    transfer_batch_sizes: tuple[int, ...] = (1, 8, 32, 128, 256)
    batch_job_sizes: tuple[int, ...] = (32, 128)
    batch_repeats: int = 3
    clients: tuple[int, ...] = (1, 16, 64, 256)
    load_seconds: float = 3.0
    load_repeats: int = 2
    load_warmup: int = 64
    pipeline_images: int = 1024
    workers_variant: int = 4  # the service again with this many HTTP workers (above one client), if time is left

    @classmethod
    def dry(cls, budget_s: float) -> CheckConfig:
        return cls(dry_run=True, budget_s=budget_s, image_size=64, resize=64, width=0.125, train_per_class=6,
                   val_per_class=2, test_per_class=2, epochs=2, batch_size=16, loader_workers=0, jpegs=48,
                   inference_batch_sizes=(1, 8, 32), measure_seconds=0.02, transfer_batch_sizes=(1, 8),
                   batch_job_sizes=(32,), batch_repeats=1, clients=(1, 4), load_seconds=0.3, load_repeats=1,
                   load_warmup=4, pipeline_images=64, workers_variant=2)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


# Each stage's cap in seconds (a dry run gets twice as much on a slow CPU); a stage also stops at the
# overall budget. The serving stages come before the training-only checks, so a slow training stage
# cannot cost the measurements the fast-path decisions need.
STAGE_BUDGETS = {"environment": 45, "data": 40, "training": 100, "export": 80, "inference": 75, "transfer": 20,
                 "batch_job": 60, "service": 130, "nonfinite": 30, "resume": 120}
STAGES = tuple(STAGE_BUDGETS)
TITLES = {"environment": "Environment and doctor", "data": "Data", "training": "Training on CUDA",
          "export": "Export and parity on the CUDA provider", "inference": "Inference in-process (the yardstick)",
          "transfer": "Host-to-GPU copies", "batch_job": "The batch job against its limit",
          "service": "The HTTP service under load", "nonfinite": "A non-finite step under AMP",
          "resume": "kill -9 and --resume"}


class StageSkipped(Exception):
    """A stage cannot run: what it needs was not made by an earlier stage, or its time is up."""


# --- the orchestrator ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU, tiny, into build/")
    parser.add_argument("--out", type=Path, help="where gpu.md, gpu.json and the plots go "
                                                 "(default docs/, or build/gpu-check-dry/ with --dry-run)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 440; dry run 600)")
    parser.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE", help="run only these stages "
                        "(their inputs must exist from an earlier run in the same work folder)")
    parser.add_argument("--work", type=Path, help="scratch folder for data, runs, models and logs (emptied first; "
                                                  "default build/gpu-check/work, or build/gpu-check-dry/work)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage, in this process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    budget = args.budget or (600.0 if args.dry_run else CheckConfig.budget_s)
    config = CheckConfig.dry(budget) if args.dry_run else CheckConfig(budget_s=budget)
    if args.stage:
        return run_stage(args.stage, config, args.work, args.deadline)
    if not args.dry_run and not cuda_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is false); `make gpu-check DRY=1` "
              "runs the same stages on the CPU", file=sys.stderr)
        return 2
    out = args.out or (REPO / "build" / "gpu-check-dry" if args.dry_run else REPO / "docs")
    work = args.work or REPO / "build" / ("gpu-check-dry" if args.dry_run else "gpu-check") / "work"
    return Orchestrator(config, out, work, args.only).run()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class Orchestrator:
    def __init__(self, config: CheckConfig, out: Path, work: Path, only: list[str] | None):
        self.config, self.out, self.work = config, out.resolve(), work.resolve()
        self.stages = [s for s in STAGES if not only or s in only]
        self.env: dict[str, str] = {}
        self.started = time.monotonic()
        self.deadline = self.started + config.budget_s
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        self.results = {
            "command": "make gpu-check" + (" DRY=1" if config.dry_run else ""),
            "argv": "python -m benchmarks.gpu_check" + (" --dry-run" if config.dry_run else ""),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "dry_run": config.dry_run,
            "commit": (commit.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else ""),
            "config": asdict(config), "stage_budgets": STAGE_BUDGETS, "stages": {},
        }

    def run(self) -> int:
        if not set(self.stages) >= set(STAGES):  # a partial rerun keeps the other stages' results and work
            previous = self.out / f"{NAME}.json"
            if previous.is_file():
                self.results["stages"] = json.loads(previous.read_text()).get("stages", {})
            self.results["only"] = self.stages
            for saved in sorted((self.work / "stages").glob("*.json")):  # and the environment they set up
                if saved.stem not in self.stages:
                    self.env.update(json.loads(saved.read_text()).get("env", {}))
        elif self.work.is_dir() and any(self.work.iterdir()):
            if not (self.work / "stages").is_dir():  # never empty a folder this script did not make
                print(f"gpu_check: {self.work} is not empty and not a gpu_check work folder", file=sys.stderr)
                return 2
            shutil.rmtree(self.work)
        (self.work / "stages").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.log = open(self.work / "gpu-check.log", "a")
        self.say(f"gpu_check: {len(self.stages)} stages, budget {self.config.budget_s:.0f} s"
                 f"{' (dry run on the CPU)' if self.config.dry_run else ''}; work folder {self.work}")
        for index, stage in enumerate(self.stages, 1):
            self.results["stages"][stage] = self.run_one(stage, index)
            self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.publish()
        checks = [c for s in self.results["stages"].values() for c in s.get("checks", [])]
        failed_checks = [c["check"] for c in checks if c["status"] == FAILED]
        bad_stages = [name for name, s in self.results["stages"].items() if s["status"] != "ok"]
        self.say(f"gpu_check: done in {time.monotonic() - self.started:.0f} s; {len(checks)} checks, "
                 f"{len(failed_checks)} failed; stages not ok: {', '.join(bad_stages) or 'none'}; "
                 f"wrote {self.out / (NAME + '.md')}")
        for check in failed_checks:
            self.say(f"  failed: {check}")
        self.log.close()
        self.publish()
        return 1 if failed_checks or bad_stages else 0

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self.log.write(message + "\n")
        self.log.flush()

    def run_one(self, stage: str, index: int) -> dict:
        scale = 2 if self.config.dry_run else 1
        left = self.deadline - time.monotonic()
        budget = min(STAGE_BUDGETS[stage] * scale, left)
        record = {"budget_s": round(budget), "seconds": 0.0, "checks": []}
        if budget < 10:
            self.say(f"[{index}/{len(self.stages)}] {stage}: skipped, {left:.0f} s of the budget left")
            return {**record, "status": "skipped", "reason": f"out of time ({left:.0f} s of the overall budget left)"}
        self.say(f"[{index}/{len(self.stages)}] {stage} (up to {budget:.0f} s; "
                 f"{time.monotonic() - self.started:.0f} s used of {self.config.budget_s:.0f})")
        result_path = self.work / "stages" / f"{stage}.json"
        result_path.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage, "--work", str(self.work),
                "--deadline", str(time.time() + budget - 5), "--budget", str(self.config.budget_s)]
        argv += ["--dry-run"] if self.config.dry_run else []
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", start_new_session=True)
        stage_log = open(self.work / "logs" / f"stage-{stage}.log", "w")
        tail: list[str] = []

        def relay() -> None:  # the stage's progress, live, into the console and the logs
            for line in process.stdout:
                sys.stderr.write("    " + line)
                stage_log.write(line)
                self.log.write("    " + line)
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_tree(process)
        reader.join(timeout=10)
        stage_log.close()
        record["seconds"] = round(time.monotonic() - started, 1)
        saved = json.loads(result_path.read_text()) if result_path.is_file() else {}
        record.update(results=saved.get("results", {}), checks=saved.get("checks", []))
        self.env.update(saved.get("env", {}))
        if timed_out:
            record.update(status="timed out", error=f"stopped after its budget of {budget:.0f} s; the results "
                                                    "below are what it had measured by then")
        elif saved.get("skipped"):
            record.update(status="skipped", reason=saved["skipped"])
        elif process.returncode != 0:
            record.update(status="failed", error=saved.get("error") or "".join(tail[-15:]).strip()
                          or f"exit status {process.returncode}")
        else:
            record["status"] = "ok"
        failed = [c for c in record["checks"] if c["status"] == FAILED]
        self.say(f"    -> {record['status']}{': ' + record.get('reason', '') if record.get('reason') else ''} "
                 f"in {record['seconds']:.0f} s, checks: {len(record['checks']) - len(failed)} passed or skipped, "
                 f"{len(failed)} failed")
        return record

    def publish(self) -> None:
        """gpu.json, gpu.md and the plots into the output folder; and all of it, with the logs, into $OUT."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{NAME}.json").write_text(json.dumps(self.results, indent=2) + "\n")
        plots = make_plots(self.results, self.out / NAME)
        (self.out / f"{NAME}.md").write_text(render(self.results, plots))
        target = os.environ.get("OUT")
        if not target:
            return
        target = Path(target)
        (target / NAME).mkdir(parents=True, exist_ok=True)
        for name in (f"{NAME}.json", f"{NAME}.md"):
            shutil.copy(self.out / name, target / name)
        for plot in plots:
            shutil.copy(self.out / NAME / plot, target / NAME / plot)
        if (self.work / "gpu-check.log").is_file():
            shutil.copy(self.work / "gpu-check.log", target / "gpu-check.log")
        with tarfile.open(target / "gpu-logs.tar.gz", "w:gz") as archive:  # stage, training and server logs
            archive.add(self.work / "logs", arcname="logs")


def stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the stage and everything under it (servers run in sessions of their own), SIGKILL after 15 s."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for member in family:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=15)
    for member in alive:
        with contextlib.suppress(psutil.Error):
            member.kill()
    process.wait()


# --- one stage, in its own process ------------------------------------------------------------------------------


class Context:
    """What a stage works with: the config, the shared work folder, its results and checks so far."""

    def __init__(self, stage: str, config: CheckConfig, work: Path, deadline: float):
        self.stage, self.config, self.work, self.deadline = stage, config, work, deadline
        self.results: dict = {}
        self.checks: list[dict] = []
        self.env: dict[str, str] = {}
        self.path = work / "stages" / f"{stage}.json"

    @property
    def device(self) -> str:
        return self.config.device

    def left(self) -> float:
        return self.deadline - time.time()

    def check(self, check: str, ok: bool, detail: str = "", cuda_only: bool = False) -> bool:
        """Record a check; `cuda_only` ones are "skipped (no GPU)" in a dry run instead of passing there."""
        status = NO_GPU if cuda_only and self.config.dry_run else (PASSED if ok else FAILED)
        self.checks.append({"check": check, "status": status, "detail": detail})
        print(f"  check {status}: {check}{' (' + detail + ')' if detail else ''}", file=sys.stderr, flush=True)
        return ok

    def save(self, **extra) -> None:
        """Everything so far, atomically: a stage stopped later keeps what it had measured."""
        payload = {"results": self.results, "checks": self.checks, "env": self.env, **extra}
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(scratch, self.path)

    def python(self, *args: str, timeout: float | None = None, log: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
        """`python ARGS` from the repository root, bounded by the stage's time; output kept in logs/."""
        timeout = min(timeout or self.left(), self.left())
        if timeout <= 0:
            raise StageSkipped("out of time")
        result = subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        if log:
            (self.work / "logs" / log).write_text(result.stdout + result.stderr)
        return result

    # paths shared between stages
    @property
    def data(self) -> Path:
        return self.work / "data"

    @property
    def jpegs(self) -> Path:
        return self.work / "jpegs"

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name

    def model(self, variant: str = "") -> Path:
        return self.work / "models" / (f"model.{variant}.onnx" if variant else "model.onnx")


def run_stage(stage: str, config: CheckConfig, work: Path, deadline: float) -> int:
    # A stage stopped for its budget gets SIGTERM: unwind, so servers and pools it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ctx = Context(stage, config, work, deadline)
    try:
        STAGE_FUNCTIONS[stage](ctx)
    except StageSkipped as exc:
        ctx.save(skipped=str(exc))
        print(f"  skipped: {exc}", file=sys.stderr)
        return 0
    except BaseException as exc:
        traceback.print_exc()
        ctx.save(error=f"{type(exc).__name__}: {exc}".strip())
        return 1
    ctx.save()
    return 0


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise StageSkipped(f"{what} is missing ({path}): the stage that makes it did not finish")
    return path


# --- environment ------------------------------------------------------------------------------------------------


def stage_environment(ctx: Context) -> None:
    from importlib import metadata

    from benchmarks.common import machine
    from service.inference import container_cpus

    ctx.results["machine"] = {**machine(), "container_cpus": container_cpus()}
    versions = {}
    for package in ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "onnxscript", "numpy", "pillow", "bentoml",
                    "matplotlib", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-cuda-runtime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    ctx.results["versions"] = versions
    ctx.results["torch"] = torch_info()
    ctx.save()
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,memory.total,power.limit,clocks.max.sm,pcie.link.gen.max,compute_cap"
        result = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True,
                                timeout=30)
        ctx.results["nvidia_smi"] = (result.stdout or result.stderr).strip()

    status, report = doctor(ctx, {})
    ctx.results["doctor"] = {"exit_status": status, "report": report}
    ctx.save()
    # onnxruntime-gpu installed apart from the host's CUDA wheels (PYTHONPATH=/tmp/keel-site) does not find
    # them by itself; where the doctor found copies, the later stages get them on LD_LIBRARY_PATH, and say so.
    folders = sorted({str(Path(lib["found_in_wheels"][0]).parent)
                      for lib in report.get("cuda_libraries", {}).get("libraries", [])
                      if not lib["loaded"] and lib.get("found_in_wheels")})
    if folders and not ctx.config.dry_run:
        path = os.pathsep.join([*folders, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        ctx.env["LD_LIBRARY_PATH"] = path
        status, report = doctor(ctx, {"LD_LIBRARY_PATH": path})
        ctx.results["doctor_with_library_path"] = {"exit_status": status, "report": report, "added": folders}
    ctx.check("the doctor: every session gets CUDA with KEEL_DEVICE=cuda (exit status 0)", status == 0,
              report.get("verdict", ""), cuda_only=True)
    models = report.get("models", [])
    ctx.check("the doctor's session answers like the CPU provider's (top-1 agreement 100%)",
              all(m.get("top1_agreement_vs_cpu", 0) == 1.0 for m in models) and bool(models),
              ", ".join(f"max |dp| {m.get('max_abs_diff_vs_cpu', float('nan')):.1e}" for m in models), cuda_only=True)


def torch_info() -> dict:
    import torch

    info = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    return info


def doctor(ctx: Context, env: dict[str, str]) -> tuple[int, dict]:
    """`python -m service.doctor --json` with the built-in graph, in a process of its own (no torch in it:
    torch would load its own CUDA libraries and hide what the serving side lacks)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("KEEL_MODEL", "KEEL_MODELS")}
    result = subprocess.run([sys.executable, "-m", "service.doctor", "--json", "--device", ctx.device,
                             "--seconds", "0.2"], cwd=REPO, env={**clean, **env}, capture_output=True, text=True,
                            timeout=max(10.0, min(120.0, ctx.left())))
    log = "doctor-with-library-path.log" if env else "doctor.log"
    (ctx.work / "logs" / log).write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    try:
        return result.returncode, json.loads(result.stdout)
    except json.JSONDecodeError:
        return result.returncode, {"error": (result.stderr or result.stdout).strip()[-2000:]}


# --- data -------------------------------------------------------------------------------------------------------


def stage_data(ctx: Context) -> None:
    from concurrent.futures import ProcessPoolExecutor

    from service.inference import container_cpus

    c = ctx.config
    started = time.perf_counter()
    result = ctx.python("-m", "training.shapes", "--out", str(ctx.data), "--size", str(c.image_size),
                        "--train-per-class", str(c.train_per_class), "--val-per-class", str(c.val_per_class),
                        "--test-per-class", str(c.test_per_class), "--overwrite", log="shapes.log")
    if result.returncode != 0:
        raise RuntimeError(f"training.shapes failed: {result.stderr[-1500:]}")
    shapes_s = time.perf_counter() - started
    started = time.perf_counter()
    ctx.jpegs.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(container_cpus()) as pool:
        for index, data in enumerate(pool.map(jpeg, range(c.jpegs), chunksize=16)):
            (ctx.jpegs / f"{index:05d}.jpg").write_bytes(data)
    sizes = [p.stat().st_size for p in ctx.jpegs.iterdir()]
    ctx.results = {"shapes": {"size": c.image_size, "train": 10 * c.train_per_class, "val": 10 * c.val_per_class,
                              "test": 10 * c.test_per_class, "seconds": round(shapes_s, 1)},
                   "jpegs": {"count": len(sizes), "size": "500x375", "mean_kib": round(np.mean(sizes) / 1024, 1),
                             "seconds": round(time.perf_counter() - started, 1)}}


def jpeg(seed: int) -> bytes:
    from benchmarks.limit import photo_like

    return photo_like(500, 375, seed)


# --- training ---------------------------------------------------------------------------------------------------


def training_args(ctx: Context, arch: str, out: Path, *extra: str) -> list[str]:
    """The same training flags for the training stage and the resume stage (which compares with it)."""
    c = ctx.config
    args = ["-m", "training", "--arch", arch, "--data", str(ctx.data), "--out", str(out), "--width", str(c.width),
            "--image-size", str(c.image_size), "--resize", str(c.resize), "--epochs", str(c.epochs),
            "--batch-size", str(c.batch_size), "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.05",
            "--label-smoothing", "0", "--min-crop-scale", "0.8", "--workers", str(c.loader_workers), "--seed", "0",
            "--precision", "auto", "--channels-last", "auto", "--model-args", json.dumps(MODEL_ARGS[arch])]
    return args + (["--device", "cpu"] if c.dry_run else []) + list(extra)


def stage_training(ctx: Context) -> None:
    need(ctx.data / "dataset.json", "the shapes data set")
    import torch

    expected = "bf16" if ctx.config.dry_run or torch.cuda.is_bf16_supported() else "fp16"
    for arch in ARCHS:
        out = ctx.run_dir(arch)
        started = time.perf_counter()
        result = ctx.python(*training_args(ctx, arch, out), log=f"train-{arch}.log")
        seconds = time.perf_counter() - started
        if not ctx.check(f"{arch}: training exits 0", result.returncode == 0, result.stderr.strip()[-300:]
                         if result.returncode else ""):
            continue
        summary = json.loads((out / "summary.json").read_text())
        epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        header = re.search(r"^training .* device ([^,]+), (\w+)(, channels_last)?", result.stderr, re.M)
        device = header.group(1) if header else "unknown"
        images = 10 * ctx.config.train_per_class
        ctx.results[arch] = {
            "seconds": round(seconds, 1), "device": device, "precision": summary["precision"],
            "channels_last": summary["channels_last"], "best_val_acc": summary["best_val_acc"],
            "test_acc": summary.get("test_acc"), "stability": summary["stability"],
            "epochs": [{"epoch": e["epoch"], "seconds": e["seconds"], "images_per_s": round(images / e["seconds"], 1),
                        "train_loss": e["train_loss"], "val_acc": e["val_acc"], "skipped_steps": e["skipped_steps"]}
                       for e in epochs]}
        ctx.save()
        ctx.check(f"{arch}: trains on CUDA in {expected} with channels_last",
                  device.startswith("cuda") and summary["precision"] == expected and summary["channels_last"],
                  f"device {device}, {summary['precision']}, channels_last {summary['channels_last']}", cuda_only=True)
        finite = all(np.isfinite(e["train_loss"]) for e in epochs)
        ctx.check(f"{arch}: every step applied, losses finite", finite and summary["stability"]["skipped_steps"] == 0,
                  f"skipped {summary['stability']['skipped_steps']}, rollbacks {summary['stability']['rollbacks']}")


# --- export -----------------------------------------------------------------------------------------------------


def stage_export(ctx: Context) -> None:
    checkpoint = need(ctx.run_dir("alexnet_bn") / "best.pt", "the alexnet_bn checkpoint")
    ctx.model().parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = ctx.python("-m", "export", str(checkpoint), "--out", str(ctx.model()), "--name", "keel-gpu-check",
                        "--fp16", "--uint8-input", log="export.log")
    ctx.results["seconds"] = round(time.perf_counter() - started, 1)
    ctx.results["log"] = result.stderr.strip().splitlines()[-12:]
    ctx.check("export (fp32, fp16, uint8-input) exits 0", result.returncode == 0, result.stderr.strip()[-300:]
              if result.returncode else "")
    reports = {}
    for variant in ("", "fp16", "uint8-nhwc"):
        path = ctx.model().with_name(f"model.{variant}.parity.json" if variant else "model.parity.json")
        if path.is_file():
            reports[variant or "fp32"] = json.loads(path.read_text())
    ctx.results["reports"] = reports
    ctx.save()
    if "fp16" in reports:
        ctx.check("export verified fp16 on the CUDA provider", reports["fp16"]["provider"] == "CUDAExecutionProvider",
                  f"on {reports['fp16']['provider']}", cuda_only=True)
    if not ctx.model().is_file():
        return
    ctx.results["cuda_parity"] = cuda_parity(ctx)
    for row in ctx.results["cuda_parity"]:
        threshold = 0.99 if row["variant"] == "fp16" else 1.0
        ctx.check(f"{row['variant']} on {row['provider']}: top-1 agrees with fp32 on the CPU provider "
                  f"(>= {threshold:.0%})", row["top1_agreement"] >= threshold,
                  f"{row['top1_agreement']:.1%}, max |dp| {row['max_abs_diff']:.1e}", cuda_only=True)


def cuda_parity(ctx: Context) -> list[dict]:
    """Each variant on the GPU against fp32 on the CPU provider, on the test split, at several batch sizes
    (each is its own padded bucket, with its own cuDNN algorithms)."""
    from service.inference import OUTPUT_NAME, OnnxClassifier
    from service.preprocessing import decode_image, find_images, normalize, resize_and_crop, to_rgb

    reference = OnnxClassifier(ctx.model(), device="cpu")
    spec = reference.info.preprocessing
    crops = [resize_and_crop(to_rgb(decode_image(p.read_bytes())), spec) for p in find_images(ctx.data / "test")]
    floats = np.stack([normalize(c, spec) for c in crops])
    pixels = np.stack([np.asarray(c, dtype=np.uint8) for c in crops])
    expected = np.concatenate([reference.predict(floats[i:i + 32]) for i in range(0, len(floats), 32)])
    rows = []
    for variant in ("fp32", "fp16", "uint8-nhwc"):
        path = ctx.model("" if variant == "fp32" else variant)
        if not path.is_file():
            continue
        classifier = OnnxClassifier(path, device=ctx.device, max_batch_size=32)
        inputs = pixels if variant == "uint8-nhwc" else floats

        def predict(batch, classifier=classifier, variant=variant):
            if variant == "uint8-nhwc":  # input `image`, N x S x S x 3 uint8: not what predict() sends
                return classifier.session.run([OUTPUT_NAME], {"image": batch})[0]
            return classifier.predict(batch)

        worst, agreement = 0.0, 1.0
        for size in (1, 8, 32):
            got = np.concatenate([predict(inputs[i:i + size]) for i in range(0, len(inputs), size)])
            worst = max(worst, float(np.abs(got - expected).max()))
            agreement = min(agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
        options = classifier.session.get_provider_options().get(classifier.provider, {})
        rows.append({"variant": variant, "provider": classifier.provider, "images": len(inputs),
                     "batch_sizes": [1, 8, 32], "max_abs_diff": worst, "top1_agreement": agreement,
                     "use_tf32": options.get("use_tf32"),
                     "cudnn_conv_algo_search": options.get("cudnn_conv_algo_search")})
    return rows


# --- inference --------------------------------------------------------------------------------------------------


def stage_inference(ctx: Context) -> None:
    from benchmarks.common import spread
    from service.inference import CUDA, OUTPUT_NAME, OnnxClassifier

    need(ctx.model(), "the exported model")
    sizes = ctx.config.inference_batch_sizes
    for variant in ("fp32", "fp16", "uint8-nhwc"):
        path = ctx.model("" if variant == "fp32" else variant)
        if not path.is_file():
            continue
        if ctx.left() < 15:
            ctx.results[variant] = {"skipped": "out of time"}
            break
        started = time.perf_counter()
        classifier = OnnxClassifier(path, device=ctx.device, max_batch_size=max(sizes))
        load_ms = (time.perf_counter() - started) * 1000
        crop = classifier.info.preprocessing.crop
        rng = np.random.default_rng(0)
        if variant == "uint8-nhwc":
            data = rng.integers(0, 256, (max(sizes), crop, crop, 3), dtype=np.uint8)

            def run(batch, session=classifier.session):
                return session.run([OUTPUT_NAME], {"image": batch})[0]
        else:
            data = rng.standard_normal((max(sizes), 3, crop, crop)).astype(np.float32)
            run = classifier.predict
        buckets = classifier.buckets or list(sizes)  # the first run at each size: the cuDNN algorithm search
        if variant == "uint8-nhwc":
            warmup = {}
            for bucket in buckets:
                t0 = time.perf_counter()
                run(data[:bucket])
                warmup[str(bucket)] = round((time.perf_counter() - t0) * 1000, 1)
        else:  # as the service warms up
            warmup = {str(k): v for k, v in classifier.warm_up(buckets).items()}
        rows = []
        for n in sizes:
            batch = data[:n]
            throughput, latency = [], []
            for _ in range(3):
                durations = []
                t_end = time.perf_counter() + ctx.config.measure_seconds
                while len(durations) < 3 or time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    run(batch)
                    durations.append(time.perf_counter() - t0)
                throughput.append(n * len(durations) / sum(durations))
                latency.append(float(np.median(durations)) * 1000)
            rows.append({"batch_size": n, "images_per_s": spread(throughput), "ms_per_batch": spread(latency)})
        input_bytes = data[:1].nbytes
        ctx.results[variant] = {"provider": classifier.provider, "load_ms": round(load_ms, 1), "warmup_ms": warmup,
                                "input_bytes_per_image": input_bytes, "rows": rows,
                                "provider_options": classifier.session.get_provider_options().get(classifier.provider)}
        ctx.save()
        best = max(rows, key=lambda r: r["images_per_s"]["median"])
        print(f"  {variant}: {classifier.provider}, best {best['images_per_s']['median']:.0f} images/s at batch "
              f"{best['batch_size']}", file=sys.stderr)
        ctx.check(f"{variant} session runs on CUDA", classifier.provider == CUDA, classifier.provider, cuda_only=True)


# --- host-to-GPU copies -----------------------------------------------------------------------------------------


def stage_transfer(ctx: Context) -> None:
    """What feeding uint8 NHWC crops instead of float32 NCHW would save on the copy alone (the fast path
    decision), measured with torch: a batch from pageable memory (what ONNX Runtime copies from a numpy
    array) and from pinned memory (what a bound, preallocated buffer allows)."""
    import torch

    from benchmarks.common import spread

    device = torch.device(ctx.device)
    s = ctx.config.image_size
    rows = []
    for n in ctx.config.transfer_batch_sizes:
        for kind, host in (("float32 NCHW", torch.randn(n, 3, s, s)),
                           ("uint8 NHWC", torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8))):
            for memory in ("pageable", "pinned") if device.type == "cuda" else ("pageable",):
                source = host.pin_memory() if memory == "pinned" else host
                samples = []
                for _ in range(12):
                    t0 = time.perf_counter()
                    source.to(device, copy=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    samples.append((time.perf_counter() - t0) * 1000)
                ms = spread(samples[2:])
                rows.append({"batch_size": n, "tensor": kind, "memory": memory, "bytes": source.nbytes, "ms": ms,
                             "gb_per_s": source.nbytes / (ms["median"] / 1000) / 1e9})
        ctx.results["rows"] = rows
        ctx.save()
    ctx.check("host-to-GPU copies measured on CUDA", device.type == "cuda", cuda_only=True)


# --- the batch job ----------------------------------------------------------------------------------------------


def stage_batch_job(ctx: Context) -> None:
    from benchmarks.batch_job import BenchConfig, bench_set
    from service.inference import OnnxClassifier

    model = need(ctx.model(), "the exported model")
    need(ctx.jpegs, "the JPEGs")
    config = BenchConfig(model=str(model), data=str(ctx.data), repeats=ctx.config.batch_repeats, device=ctx.device)
    classifier = OnnxClassifier(model, device=ctx.device, max_batch_size=max(ctx.config.batch_job_sizes))
    scratch = ctx.work / "batch-job"
    scratch.mkdir(exist_ok=True)
    result = bench_set(ctx.jpegs, classifier, config, scratch, [("thread", n, 0) for n in ctx.config.batch_job_sizes])
    ctx.results = {"model": classifier.info.arch, "provider": classifier.provider, **result}
    best = max(result["jobs"], key=lambda j: j["share_of_limit"])
    ctx.check("the batch job reaches >= 90% of min(decoding alone, inference alone)", best["share_of_limit"] >= 0.9,
              f"{best['share_of_limit']:.0%} at batch size {best['batch_size']}", cuda_only=True)


# --- the HTTP service -------------------------------------------------------------------------------------------


def stage_service(ctx: Context) -> None:
    from benchmarks.limit import LimitConfig, bench_pipeline
    from benchmarks.service_load import Launched, LoadConfig, measure
    from service.inference import CUDA

    model = need(ctx.model(), "the exported model")
    c = ctx.config
    images = [p.read_bytes() for p in sorted(need(ctx.jpegs, "the JPEGs").iterdir())[:8]]
    pipeline = bench_pipeline(model, images, LimitConfig(repeats=c.load_repeats + 1, run_seconds=1.0,
                                                         pipeline_images=c.pipeline_images, pipeline_batch=32))
    ctx.results["pipeline"] = pipeline
    ctx.save()
    print(f"  in-process pipeline: {pipeline['images_per_s']['median']:.0f} images/s on {pipeline['provider']}",
          file=sys.stderr)
    load = LoadConfig(model=str(model), concurrency=c.clients, repeats=c.load_repeats, run_seconds=c.load_seconds,
                      max_requests=100_000, warmup_requests=c.load_warmup)
    logs = ctx.work / "logs"
    plan = [("keel", f"Keel as shipped (KEEL_DEVICE={ctx.device})", {}, c.clients)]
    if c.workers_variant:
        plan.append(("keel_workers", f"Keel, KEEL_WORKERS={c.workers_variant}",
                     {"KEEL_WORKERS": str(c.workers_variant)}, c.clients[1:]))
    ctx.results["servers"] = {}
    for key, label, extra, levels in plan:
        expected_s = 40 + len(levels) * (c.load_repeats * c.load_seconds + 5)
        if key != "keel" and ctx.left() < expected_s:
            ctx.results["servers"][key] = {"label": label, "skipped": f"not enough time left ({ctx.left():.0f} s)"}
            continue
        env = {"KEEL_MODEL": str(model), "KEEL_DEVICE": ctx.device, "BENTOML_HOME": str(ctx.work / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "True", **extra}
        # `python -m bentoml_cli.cli` is the `bentoml` command itself (its console-script entry point), found
        # without PATH: on the GPU host the script sits in /tmp/keel-site/bin, not beside python3.
        command = [sys.executable, "-m", "bentoml_cli.cli", "serve", "service.service:Classifier", "--host",
                   "127.0.0.1", "--port", "{port}"]
        started = time.perf_counter()
        with Launched(command, env, "/readyz", logs, f"server-{key}") as server:
            ready_s = time.perf_counter() - started
            with urllib_open(server.url + "/metadata") as response:
                metadata = json.loads(response.read())
            rows = measure(server, images, load, levels)  # multipart bodies made there
        workers = metadata.get("service", {}).get("workers")
        label += f" ({workers} HTTP worker{'s' if workers != 1 else ''})" if key == "keel" else ""
        ctx.results["servers"][key] = {"label": label, "ready_s": round(ready_s, 1), "levels": rows,
                                       "provider": metadata.get("provider"),
                                       "warmup_ms": metadata.get("batching", {}).get("warmup_ms"),
                                       "padded_to": metadata.get("batching", {}).get("padded_to"),
                                       "workers": workers}
        ctx.save()
        if key == "keel":
            ctx.check("the service's session runs on CUDA (/metadata)", metadata.get("provider") == CUDA,
                      str(metadata.get("provider")), cuda_only=True)
            errors = sum(sum(r["errors"].values()) for r in rows)
            ctx.check("no request failed under load", errors == 0, f"{errors} errors")
    keel = ctx.results["servers"]["keel"]["levels"]
    best = max(keel, key=lambda r: r["throughput"]["median"])
    one = next((r for r in keel if r["concurrency"] == 1), None)
    ctx.results["summary"] = {
        "saturation_concurrency": best["concurrency"],
        "saturation_ratio": best["throughput"]["median"] / pipeline["images_per_s"]["median"],
        "added_p50_ms_at_1": one["p50_ms"]["median"] - pipeline["single_image_ms"]["median"] if one else None}


def urllib_open(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=30)


# --- a non-finite step under AMP ----------------------------------------------------------------------------------


def stage_nonfinite(ctx: Context) -> None:
    """As tests/test_training_amp.py does on the CPU, on CUDA in bf16 with channels_last: a NaN in the input
    makes the loss NaN; the step must be skipped with the weights, batch-norm statistics and optimizer state
    untouched, and the next clean step must train."""
    import tempfile

    import torch

    from training.config import TrainConfig
    from training.models import build_model
    from training.monitor import StepLog
    from training.precision import Precision, resolve_channels_last, resolve_precision
    from training.train import Trainer, make_optimizer

    device = torch.device(ctx.device)
    # the dry run names bf16 (auto is fp32 on the CPU), to run the same autocast path, as the AMP tests do
    precision = Precision.create("bf16" if ctx.config.dry_run else resolve_precision("auto", device), device)
    layout = torch.channels_last if resolve_channels_last("auto", device) else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model("alexnet_bn", num_classes=10, width=ctx.config.width, dropout=0.0).to(device)
    model = model.to(memory_format=layout)
    config = TrainConfig(data="-", out="-", optimizer="sgd", label_smoothing=0.0, rollback_skips=5)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, make_optimizer(model, config), config, 10, precision, StepLog(Path(tmp) / "s", 1))
        s = ctx.config.image_size
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(16, 3, s, s, generator=generator).to(device, memory_format=layout)
        targets = torch.randint(0, 10, (16,), generator=generator).to(device)
        first = trainer.train_step(images, targets, lr=0.01)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        momentum = {k: v["momentum_buffer"].clone() for k, v in trainer.optimizer.state_dict()["state"].items()}
        poisoned = images.clone()
        poisoned[0, 0, 0, 0] = float("nan")
        skipped = trainer.train_step(poisoned, targets, lr=0.01)
        untouched = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        optimizer_untouched = all(torch.equal(v["momentum_buffer"], momentum[k])
                                  for k, v in trainer.optimizer.state_dict()["state"].items())
        after = trainer.train_step(images, targets, lr=0.01)
        trained = any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    ctx.results = {"device": str(device), "precision": precision.name, "channels_last": layout == torch.channels_last,
                   "first_loss": first, "skipped_step_returned": skipped, "after_loss": after,
                   "skipped": trainer.skipped, "overflows": trainer.overflows, "rollbacks": trainer.rollbacks,
                   "weights_and_statistics_untouched": untouched, "optimizer_state_untouched": optimizer_untouched,
                   "next_step_trained": trained}
    ctx.check("the NaN step is skipped (counted, no overflow, no rollback)",
              first is not None and skipped is None and trainer.skipped == 1 and trainer.overflows == 0
              and trainer.rollbacks == 0, f"skipped {trainer.skipped}, overflows {trainer.overflows}")
    ctx.check("weights, batch-norm statistics and momentum untouched by it", untouched and optimizer_untouched)
    ctx.check("the next clean step trains", after is not None and trained)
    ctx.check("it ran on CUDA in bf16 with channels_last", device.type == "cuda" and precision.name == "bf16"
              and layout == torch.channels_last, f"{device}, {precision.name}", cuda_only=True)


# --- kill -9 and --resume -----------------------------------------------------------------------------------------


def stage_resume(ctx: Context) -> None:
    """alexnet_bn (dropout 0) killed with SIGKILL after its first epoch's checkpoint and resumed: with
    `--deterministic` it must end bit-identical to an uninterrupted run; with the default kernels
    (cuDNN autotuning, atomics) the difference to the training stage's identical run is measured."""
    need(ctx.data / "dataset.json", "the shapes data set")
    pairs = [("deterministic", ["--deterministic"], None)]
    if not ctx.config.dry_run:  # on the CPU both settings are the same code: CPU kernels are deterministic
        pairs.append(("default kernels", [], ctx.run_dir("alexnet_bn") / "last.pt"))
    for label, extra, straight in pairs:
        key = label.replace(" ", "_")
        if straight is None or not straight.is_file():
            straight_dir = ctx.run_dir(f"straight-{key}")
            result = ctx.python(*training_args(ctx, "alexnet_bn", straight_dir, *extra), log=f"straight-{key}.log")
            if result.returncode != 0:
                raise RuntimeError(f"the uninterrupted {label} run failed: {result.stderr[-800:]}")
            straight = straight_dir / "last.pt"
        record = kill_and_resume(ctx, key, extra)
        record.update(compare_weights(straight, ctx.run_dir(f"resumed-{key}") / "last.pt"))
        ctx.results[key] = record
        ctx.save()
        interrupted = record["stopped_after_epoch"] < ctx.config.epochs
        detail = (f"stopped after epoch {record['stopped_after_epoch']} of {ctx.config.epochs}; "
                  + ("identical" if record["identical"] else f"max |dw| {record['max_abs_diff']:.2e} "
                     f"in {record['tensors_differing']} of {record['tensors']} tensors"))
        if label == "deterministic":
            ctx.check("kill -9 + --resume --deterministic: the same final weights, bit for bit",
                      interrupted and record["identical"], detail)
        else:
            ctx.results[key]["note"] = "informational: the default kernels are not run-to-run deterministic"
            print(f"  default kernels: {detail}", file=sys.stderr)


def kill_and_resume(ctx: Context, key: str, extra: list[str]) -> dict:
    out = ctx.run_dir(f"resumed-{key}")
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, *training_args(ctx, "alexnet_bn", out, *extra)]
    with open(ctx.work / "logs" / f"killed-{key}.log", "w") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not (out / "last.pt").exists() and process.poll() is None and ctx.left() > 0:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            process.wait()
    from training.checkpoint import load_checkpoint

    stopped = load_checkpoint(out / "last.pt")["epoch"]
    result = ctx.python(*training_args(ctx, "alexnet_bn", out, *extra, "--resume", str(out / "last.pt")),
                        log=f"resumed-{key}.log")
    if result.returncode != 0:
        raise RuntimeError(f"the resumed run failed: {result.stderr[-800:]}")
    warnings = sorted(set(re.findall(r"(\w+) does not have a deterministic implementation", result.stderr)))
    return {"stopped_after_epoch": stopped, "nondeterministic_ops_warned": warnings}


def compare_weights(first: Path, second: Path) -> dict:
    import torch

    from training.checkpoint import load_checkpoint

    a, b = load_checkpoint(first)["state_dict"], load_checkpoint(second)["state_dict"]
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a}
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    return {"identical": not differing, "tensors": len(a), "tensors_differing": len(differing),
            "max_abs_diff": max(diffs.values(), default=0.0),
            "worst_tensor": max(diffs, key=diffs.get) if diffs else None}


STAGE_FUNCTIONS = {"environment": stage_environment, "data": stage_data, "training": stage_training,
                   "export": stage_export, "inference": stage_inference, "transfer": stage_transfer,
                   "batch_job": stage_batch_job, "service": stage_service, "nonfinite": stage_nonfinite,
                   "resume": stage_resume}


# --- the page -----------------------------------------------------------------------------------------------------


def make_plots(results: dict, folder: Path) -> list[str]:
    """inference.png (images/s and ms per batch, per model) and service.png (the server against the pipeline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    stages, made = results["stages"], []
    folder.mkdir(parents=True, exist_ok=True)
    inference = stages.get("inference", {}).get("results", {})
    variants = {k: v for k, v in inference.items() if isinstance(v, dict) and v.get("rows")}
    if variants:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for variant, data in variants.items():
            sizes = [r["batch_size"] for r in data["rows"]]
            left.plot(sizes, [r["images_per_s"]["median"] for r in data["rows"]], "o-", label=variant)
            right.plot(sizes, [r["ms_per_batch"]["median"] for r in data["rows"]], "o-", label=f"{variant}: inference")
        transfer = stages.get("transfer", {}).get("results", {}).get("rows", [])
        for kind, style in (("float32 NCHW", "k--"), ("uint8 NHWC", "k:")):
            rows = [r for r in transfer if r["tensor"] == kind and r["memory"] == "pageable"]
            if rows:
                right.plot([r["batch_size"] for r in rows], [r["ms"]["median"] for r in rows], style,
                           label=f"copy of the {kind} batch (pageable)")
        left.set(title="In-process images/s per batch size", xlabel="batch size", ylabel="images/s", xscale="log")
        right.set(title="ms per batch", xlabel="batch size", ylabel="ms", xscale="log", yscale="log")
        sizes = sorted({r["batch_size"] for data in variants.values() for r in data["rows"]})
        left.set_ylim(bottom=0)
        for axis in (left, right):
            axis.set_xticks(sizes, [str(n) for n in sizes])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "inference.png", dpi=110)
        plt.close(fig)
        made.append("inference.png")
    service = stages.get("service", {}).get("results", {})
    servers = {k: v for k, v in service.get("servers", {}).items() if v.get("levels")}
    if servers and service.get("pipeline"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for server in servers.values():
            x = [r["concurrency"] for r in server["levels"]]
            left.plot(x, [r["throughput"]["median"] for r in server["levels"]], "o-", label=server["label"])
            right.plot(x, [r["p99_ms"]["median"] for r in server["levels"]], "o-", label=server["label"])
        left.axhline(service["pipeline"]["images_per_s"]["median"], color="grey", linestyle=":",
                     label="in-process pipeline")
        left.set(title="requests/s", xlabel="concurrent clients", xscale="log")
        right.set(title="p99 latency (ms)", xlabel="concurrent clients", xscale="log", yscale="log")
        levels = sorted({r["concurrency"] for server in servers.values() for r in server["levels"]})
        top = max([service["pipeline"]["images_per_s"]["median"]]
                  + [r["throughput"]["max"] for server in servers.values() for r in server["levels"]])
        left.set_ylim(0, top * 1.15)
        for axis in (left, right):
            axis.set_xticks(levels, [str(n) for n in levels])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "service.png", dpi=110)
        plt.close(fig)
        made.append("service.png")
    return made


def render(results: dict, plots: list[str]) -> str:
    stages = results["stages"]
    env = stages.get("environment", {}).get("results", {})
    lines = ["# Keel on a GPU", ""]
    if results["dry_run"]:
        lines += ["**Dry run on the CPU** (`make gpu-check DRY=1`): tiny sizes and the CPU provider, to keep the "
                  "script working. None of these numbers describe a GPU.", ""]
    lines += [f"Everything on this page comes from one run of `{results['command']}` (`{results['argv']}`), on "
              f"{results['date']}, commit `{results['commit']}`: {results.get('elapsed_s', 0):.0f} s of a "
              f"{results['config']['budget_s']:.0f} s budget. The JSON beside it (`gpu.json`) has every number.", ""]
    if results.get("only"):
        lines[-2:-1] = [lines[-2] + f" That run was of {', '.join(results['only'])} only (`--only`); the other "
                                    "stages are from the run before it, on the same machine's work folder."]
    lines += machine_lines(env)
    lines += ["", "## Checks", "", "| stage | check | result | detail |", "|---|---|---|---|"]
    for stage in STAGES:
        record = stages.get(stage)
        if record is None:
            continue
        if record["status"] != "ok":
            why = record.get("reason") or record.get("error", "")
            lines.append(f"| {stage} | the stage itself | **{record['status']}** | {cell(why)} |")
        for check in record.get("checks", []):
            mark = {"passed": "passed", "failed": "**FAILED**"}.get(check["status"], check["status"])
            lines.append(f"| {stage} | {cell(check['check'])} | {mark} | {cell(check['detail'])} |")
    for stage in STAGES:
        if stage in stages:
            lines += ["", f"## {TITLES[stage]}", ""]
            lines += section(stage, stages[stage], results, plots)
    return "\n".join(lines).rstrip() + "\n"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:400]


def machine_lines(env: dict) -> list[str]:
    if not env:
        return ["(the environment stage did not run)"]
    m, t, v = env.get("machine", {}), env.get("torch", {}), env.get("versions", {})
    report = env.get("doctor", {}).get("report", {})
    nvml = report.get("gpu", {}).get("nvml", {})
    gpus = nvml.get("gpus") or []
    gpu = (f"{gpus[0]['name']} ({gpus[0]['memory_total_mib']} MiB, compute capability {gpus[0]['compute_capability']}"
           f"), driver {nvml.get('driver')} (CUDA {nvml.get('cuda_driver_version')})" if gpus else
           t.get("device") or "none")
    runtime = report.get("onnxruntime", {})
    return [f"- **GPU**: {gpu}",
            f"- **Machine**: {m.get('cpu_model')}, {m.get('cpus')} CPUs ({m.get('container_cpus')} usable), "
            f"{m.get('memory_gib')} GiB; {m.get('platform')}, Python {m.get('python')}",
            f"- **Versions**: torch {t.get('version')} (CUDA {t.get('cuda')}, cuDNN {t.get('cudnn')}); "
            f"{runtime.get('package', 'onnxruntime')} {runtime.get('version')} (built for CUDA "
            f"{runtime.get('cuda_version')}); " + ", ".join(f"{k} {v[k]}" for k in ("onnx", "onnxscript", "bentoml",
                                                                                  "numpy", "pillow") if k in v)]


def section(stage: str, record: dict, results: dict, plots: list[str]) -> list[str]:
    r = record.get("results", {})
    lines = [f"Stage {record['status']} in {record['seconds']:.0f} s (budget {record['budget_s']} s)."
             + (f" {record.get('reason') or record.get('error', '')}" if record["status"] != "ok" else ""), ""]
    renderer = {"environment": environment_lines, "data": data_lines, "training": training_lines,
                "export": export_lines, "inference": inference_lines, "transfer": transfer_lines,
                "batch_job": batch_lines, "service": service_lines, "nonfinite": nonfinite_lines,
                "resume": resume_lines}[stage]
    try:
        lines += renderer(r, results)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # partial results: say so, lose nothing
        lines += [f"(partial results; rendering stopped at {type(exc).__name__}: {exc}; see gpu.json)"]
    if stage == "inference" and "inference.png" in plots:
        lines += ["", f"![images/s and ms per batch]({NAME}/inference.png)"]
    if stage == "service" and "service.png" in plots:
        lines += ["", f"![service against the pipeline]({NAME}/service.png)"]
    return lines


def environment_lines(r: dict, results: dict) -> list[str]:
    lines = []
    for key, label in (("doctor", "`python -m service.doctor --device cuda`"),
                       ("doctor_with_library_path", "again, with the CUDA wheels' folders on LD_LIBRARY_PATH")):
        if key not in r:
            continue
        report = r[key]["report"]
        lines += [f"{label}: exit status {r[key]['exit_status']}, *{report.get('verdict', report.get('error'))}*", ""]
        if key == "doctor_with_library_path":
            lines += ["onnxruntime-gpu sits in /tmp/keel-site, apart from the host's nvidia-* wheels, so it did not "
                      f"find them by itself; the later stages ran with {', '.join(r[key]['added'])} on "
                      "LD_LIBRARY_PATH. (In the container image the wheels sit beside onnxruntime and "
                      "`onnxruntime.preload_dlls` finds them.)", ""]
        libraries = report.get("cuda_libraries", {}).get("libraries", [])
        if libraries:
            lines += ["| library | loaded from |", "|---|---|"]
            lines += [f"| {lib['name']} | {lib.get('path') if lib['loaded'] else 'NOT LOADED: ' + lib['error']} |"
                      for lib in libraries]
            lines.append("")
        for m in report.get("models", []):
            lines.append(f"Session on the built-in graph: {m['provider']}; warm-up ms {m['warmup_ms']}; "
                         + ", ".join(f"batch {t['batch_size']}: {t['images_per_s']:,.0f} images/s"
                                     for t in m["throughput"]))
    if r.get("nvidia_smi"):
        lines += ["", "```", r["nvidia_smi"], "```"]
    return lines


def data_lines(r: dict, results: dict) -> list[str]:
    s, j = r["shapes"], r["jpegs"]
    return [f"Shapes at {s['size']} px: {s['train']} training, {s['val']} validation and {s['test']} test images "
            f"(10 classes) in {s['seconds']} s; {j['count']} photo-like {j['size']} JPEGs (mean {j['mean_kib']} KiB) "
            f"for the batch job and the service, in {j['seconds']} s."]


def training_lines(r: dict, results: dict) -> list[str]:
    c = results["config"]
    lines = [f"`python -m training --arch ARCH --width {c['width']} --image-size {c['image_size']} --resize "
             f"{c['resize']} --epochs {c['epochs']} --batch-size {c['batch_size']} --precision auto --channels-last "
             f"auto --optimizer adamw --lr 0.003 --workers {c['loader_workers']}` (dropout 0, no auxiliary heads). "
             "Images/s is the training split over the epoch's time (data loading included); the first epoch "
             "includes cuDNN's autotuning.", "",
             "| model | device | precision | channels_last | epoch | seconds | images/s | train loss | val top-1 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for arch in ARCHS:
        if arch not in r:
            continue
        run = r[arch]
        for e in run["epochs"]:
            lines.append(f"| {arch} | {run['device']} | {run['precision']} | {run['channels_last']} | {e['epoch']} | "
                         f"{e['seconds']} | {e['images_per_s']:,.0f} | {e['train_loss']:.3f} | {e['val_acc']:.1%} |")
    lines.append("")
    for arch in ARCHS:
        if arch in r:
            test = r[arch].get("test_acc")
            lines.append(f"- {arch}: {r[arch]['seconds']} s in all (start-up, test evaluation and plots included); "
                         f"test top-1 {test:.1%}" if test is not None else f"- {arch}: {r[arch]['seconds']} s")
    return lines


def export_lines(r: dict, results: dict) -> list[str]:
    lines = [f"`python -m export RUN/best.pt --out model.onnx --fp16 --uint8-input` on the alexnet_bn checkpoint: "
             f"{r.get('seconds')} s.", ""]
    reports = r.get("reports", {})
    if reports:
        lines += ["| file | verified on | against | max abs Δp | top-1 agreement | test top-1 |",
                  "|---|---|---|---:|---:|---:|"]
        for variant, report in reports.items():
            parity = report.get("parity", report)
            test = report.get("test", {})
            lines.append(f"| {variant} | {report.get('provider')} | {report.get('reference')} | "
                         f"{parity['max_abs_diff']:.1e} | {parity['top1_agreement']:.1%} | "
                         + (f"{test['top1']:.1%} (fp32 {test['fp32_top1']:.1%})" if test else "—") + " |")
        lines.append("")
    rows = r.get("cuda_parity", [])
    if rows:
        lines += ["Each file on the serving device against fp32 on the CPU provider, on every test image, at batch "
                  "sizes 1, 8 and 32 (each a bucket with its own cuDNN algorithms). The export's own tolerance on "
                  "the CPU is 1e-4.", "",
                  "| file | provider | images | max abs Δp | top-1 agreement | use_tf32 |",
                  "|---|---|---:|---:|---:|---|"]
        lines += [f"| {row['variant']} | {row['provider']} | {row['images']} | {row['max_abs_diff']:.1e} | "
                  f"{row['top1_agreement']:.1%} | {row.get('use_tf32')} |" for row in rows]
    return lines


def inference_lines(r: dict, results: dict) -> list[str]:
    variants = {k: v for k, v in r.items() if isinstance(v, dict) and v.get("rows")}
    if not variants:
        return ["No measurements."]
    sizes = [row["batch_size"] for row in next(iter(variants.values()))["rows"]]
    lines = ["`OnnxClassifier.predict` on ready tensors (the service's session: the same provider options and "
             "bucket padding); the uint8 NHWC variant gets `session.run` on N x S x S x 3 uint8 crops. Images/s, "
             "median of 3 runs (min–max). This is the limit the batch job and the service are measured against.", "",
             "| batch | " + " | ".join(f"{v} images/s | {v} ms" for v in variants) + " |",
             "|---:|" + "---:|---:|" * len(variants)]
    for i, n in enumerate(sizes):
        cells = []
        for data in variants.values():
            row = data["rows"][i]
            cells += [fmt(row["images_per_s"], 0), fmt(row["ms_per_batch"], 2)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Warm-up (the first run at each padded batch size: allocation and cuDNN's exhaustive algorithm "
              "search), ms:", "", "| model | provider | load ms | " + " | ".join(
                  next(iter(variants.values()))["warmup_ms"]) + " |",
              "|---|---|---:|" + "---:|" * len(next(iter(variants.values()))["warmup_ms"])]
    for variant, data in variants.items():
        lines.append(f"| {variant} | {data['provider']} | {data['load_ms']:.0f} | "
                     + " | ".join(f"{ms:.0f}" for ms in data["warmup_ms"].values()) + " |")
    return lines


def transfer_lines(r: dict, results: dict) -> list[str]:
    rows = r.get("rows", [])
    inference = results["stages"].get("inference", {}).get("results", {})
    fp32 = {row["batch_size"]: row["ms_per_batch"]["median"] for row in inference.get("fp32", {}).get("rows", [])}
    lines = ["`tensor.to('cuda')` and a synchronize, median of 10 (min–max) after 2 untimed; the last column "
             "sets the copy against fp32 inference of the same batch (which includes ONNX Runtime's own copy "
             "of the float32 input from pageable memory).", "",
             "| batch | tensor | host memory | MB | ms | GB/s | of fp32 inference ms |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for row in rows:
        share = f"{row['ms']['median'] / fp32[row['batch_size']]:.0%}" if row["batch_size"] in fp32 else "—"
        lines.append(f"| {row['batch_size']} | {row['tensor']} | {row['memory']} | {row['bytes'] / 1e6:.1f} | "
                     f"{fmt(row['ms'], 3)} | {row['gb_per_s']:.1f} | {share} |")
    return lines


def batch_lines(r: dict, results: dict) -> list[str]:
    decode = r["decode_images_per_s"]["thread"]
    lines = [f"`service.batch` (`{r['model']}` on {r['provider']}), {r['images']} photo-like 500x375 JPEGs: "
             f"(a) decoding alone {fmt(decode, 0)} images/s with its thread pool, (b) inference alone "
             f"{fmt(r['inference_images_per_s'], 0)} images/s; the limit min(a, b) is "
             f"{r['limit_images_per_s']:.0f} images/s. Target: the job at >= 90% of it.", "",
             "| decode workers | batch size | images/s | share of min(a, b) |", "|---:|---:|---:|---:|"]
    lines += [f"| {j['workers']} threads | {j['batch_size']} | {fmt(j['images_per_s'], 0)} | "
              f"{j['share_of_limit']:.0%} |" for j in r["jobs"]]
    return lines


def service_lines(r: dict, results: dict) -> list[str]:
    p = r["pipeline"]
    c = results["config"]
    lines = [f"The in-process pipeline (decode + preprocess on {p['threads']} threads one chunk of {p['batch']} "
             f"ahead of ONNX Runtime on {p['provider']}, same JPEGs): {fmt(p['images_per_s'], 0)} images/s; one "
             f"image at a time {fmt(p['single_image_ms'], 2)} ms. Then a real `bentoml serve` on 127.0.0.1 under "
             f"closed-loop clients (benchmarks/service_load.py's generator, on the same machine), "
             f"{c['load_repeats']} runs of {c['load_seconds']:g} s per level.", "",
             "| server | clients | requests/s | of the pipeline | p50 ms | p99 ms | errors | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for server in r.get("servers", {}).values():
        if server.get("skipped"):
            lines.append(f"| {server['label']} | — | skipped: {server['skipped']} | | | | | |")
            continue
        for row in server["levels"]:
            batch = f"{row['batches']['mean_size']:.1f}" if row.get("batches") else "—"
            lines.append(f"| {server['label']} | {row['concurrency']} | {fmt(row['throughput'], 0)} | "
                         f"{row['throughput']['median'] / p['images_per_s']['median']:.0%} | {fmt(row['p50_ms'])} | "
                         f"{fmt(row['p99_ms'])} | {sum(row['errors'].values())} | {batch} |")
    keel = r.get("servers", {}).get("keel", {})
    s = r.get("summary", {})
    lines += ["", f"- Provider (`/metadata`): {keel.get('provider')}; ready {keel.get('ready_s')} s after start "
                  f"(warm-up ms per bucket {keel.get('warmup_ms')})."]
    if s:
        lines.append(f"- Keel peaks at {s['saturation_ratio']:.0%} of the pipeline (at {s['saturation_concurrency']} "
                     "clients)" + (f"; at one client its p50 is {s['added_p50_ms_at_1']:.1f} ms above the pipeline's "
                                   "single image." if s.get("added_p50_ms_at_1") is not None else "."))
    return lines


def nonfinite_lines(r: dict, results: dict) -> list[str]:
    return [f"alexnet_bn on {r['device']} in {r['precision']}, channels_last {r['channels_last']}: a clean step (loss "
            f"{r['first_loss']:.3f}), then the same batch with one NaN pixel: skipped ({r['skipped']} skipped, "
            f"{r['overflows']} overflows, {r['rollbacks']} rollbacks), weights and batch-norm statistics untouched: "
            f"{r['weights_and_statistics_untouched']}, momentum untouched: {r['optimizer_state_untouched']}; the next "
            f"clean step trained: {r['next_step_trained']}."]


def resume_lines(r: dict, results: dict) -> list[str]:
    lines = ["alexnet_bn with the training stage's flags, killed with SIGKILL as soon as its first `last.pt` exists, "
             "then the same command with `--resume RUN/last.pt`; its final `last.pt` against an uninterrupted run's.",
             "", "| kernels | stopped after epoch | final weights | nondeterministic ops torch warned about |",
             "|---|---:|---|---|"]
    for key, record in r.items():
        same = ("identical, bit for bit" if record["identical"] else
                f"max abs difference {record['max_abs_diff']:.2e} ({record['tensors_differing']} of "
                f"{record['tensors']} tensors differ; worst {record['worst_tensor']})")
        lines.append(f"| {key.replace('_', ' ')} | {record['stopped_after_epoch']} | {same} | "
                     f"{', '.join(record['nondeterministic_ops_warned']) or 'none'} |")
    lines += ["", "`--deterministic` (training/config.py) turns cuDNN's autotuner off (it times candidate kernels, so "
              "two processes can choose different ones) and asks torch for deterministic kernels (no atomic "
              "adds in any order). The check holds that run to bit equality: any difference there is state the "
              "checkpoint fails to carry."
              + (" The default kernels are faster; the row for them compares the resumed run with the training "
                 "stage's uninterrupted one (the same flags), so it shows their run-to-run difference, which no "
                 "checkpoint can remove." if "default_kernels" in r else
                 " (On the CPU both settings run the same, deterministic kernels.)")]
    return lines


def fmt(summary: dict, digits: int = 1) -> str:
    from benchmarks.common import fmt as common_fmt

    return common_fmt(summary, digits)


if __name__ == "__main__":
    sys.exit(main())
