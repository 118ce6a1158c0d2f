"""Where a BentoML worker's time goes under load: py-spy samples of every Python thread, and CPU seconds per thread.

    python benchmarks/profile_worker.py        # after `make run`; needs wrk and py-spy (pip install py-spy), root
                                               # or ptrace rights over the worker

One `bentoml serve` of the served ONNX folder (CPU overlay settings: 1 worker, --threads ONNX Runtime threads; any
--env KEY=VALUE on top), warmed up, then wrk with --clients connections for --seconds while py-spy records the
worker (`--idle`: waiting counts too, so the fractions are of wall time) and /proc gives each thread's CPU seconds
(ONNX Runtime's own pool threads are native: only /proc sees them). Each sample is put in the first part whose
pattern its stack holds, innermost frame first (PARTS below). The summary (fractions per thread and part, CPU per
thread, throughput during the profile) goes to --out; the raw samples are not kept.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from serving_benchmark import run_wrk, wrk_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving import bentoml_serve, free_port  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402

# (part, substrings of a frame): a sample goes to the part of its innermost frame that matches one; order matters
# only between patterns of one frame. The event loop's idle wait is `select`; the model thread's is Condition.wait.
PARTS = (
    ("idle (waiting for work)", ("EpollSelector.select", "Condition.wait", "Event.wait", "queue.py", "sleep (",
                                 "_worker (concurrent/futures/thread.py")),
    ("model: ONNX Runtime run", ("Session.run", "OnnxModel.__call__")),
    ("model: tokenization and padding", ("TextEncoder.__call__",)),
    ("live fidelity bookkeeping (Classifier.observe)", ("Classifier.observe", "Metrics.observe", "LiveDrift",
                                                        "Shadow.offer")),
    ("model call: answers as Classification objects", ("TextClassifier.classify", "length_groups",
                                                       "Classifier.classify")),
    ("Prometheus metrics (BentoML's and ours)", ("prometheus_client/",)),
    ("OpenTelemetry tracing", ("opentelemetry/",)),
    ("batching dispatcher (BentoML)", ("marshal/dispatcher.py",)),
    ("request validation and JSON (pydantic, BentoML IO)", ("pydantic", "_bentoml_sdk/io_models.py",
                                                            "_bentoml_sdk/validators", "json/")),
    ("HTTP: uvicorn, h11, starlette, middleware", ("uvicorn/", "h11/", "starlette/", "distilops/serving/service.py",
                                                   "traffic.py", "_bentoml_impl/server/app.py")),
    ("event loop itself (asyncio, anyio)", ("asyncio/", "anyio/")),
)
OTHER = "other"


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for part, patterns in PARTS:
            if any(p in frame for p in patterns):
                return part
    return OTHER


def summarize(raw: str) -> dict[int, dict]:
    """py-spy's raw output (`thread (tid): name;frame;...;frame count` per line) -> per thread id: its name, samples
    and the fraction of them per part."""
    names: dict[int, str] = {}
    by_thread: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread, *frames = stack.split(";")
        tid, _, name = thread.removeprefix("thread (").partition("): ")
        tid = int(tid, 0)
        names[tid] = name
        by_thread[tid][part_of(frames)] += int(count)
    summary = {}
    for tid, parts in by_thread.items():
        total = sum(parts.values())
        summary[tid] = {"thread": names[tid], "samples": total,
                        "fractions": {part: round(n / total, 4) for part, n in parts.most_common()}}
    return summary


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far per thread id of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    seconds: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        utime, stime = (int(v) for v in stat[stat.rindex(")") + 2:].split()[11:13])
        seconds[int(task.name)] = (utime + stime) / tick
    return seconds


def worker_pid(server_pid: int) -> int:
    """The BentoML worker process under `bentoml serve` (its child running _bentoml_impl.worker.service)."""
    for _ in range(50):
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if "_bentoml_impl.worker.service" in cmd and ppid == server_pid:
                    return int(proc.name)
        time.sleep(0.2)
    raise RuntimeError(f"no BentoML worker under process {server_pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", default="models/quantized/onnx_int8_static", help="the served ONNX folder")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="short texts to send")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15, help="profiled duration")
    parser.add_argument("--warmup-seconds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE: a service setting on top")
    parser.add_argument("--out", default="benchmarks/results/profile_worker_cpu.json")
    args = parser.parse_args()
    for tool in ("wrk", "py-spy"):
        if not shutil.which(tool):
            sys.exit(f"profile_worker: error: {tool} not found (wrk: apt-get install wrk; py-spy: pip install py-spy)")
    if any("=" not in item for item in args.env):
        sys.exit(f"profile_worker: error: --env takes KEY=VALUE, got {args.env}")

    work = Path(tempfile.mkdtemp(prefix="distilops-profile-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    tag = import_model_folder(Path(args.onnx), "bench-profile:v1", labels={"registry_name": "bench",
                                                                          "registry_version": "bench"}, metadata={})
    settings = dict(item.split("=", 1) for item in args.env)
    script = wrk_script(pd.read_parquet(args.data)["text"].tolist()[:500], work / "post.lua")
    server = bentoml_serve(free_port(), {**env, "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": "1",
                                         "DISTILOPS_THREADS": str(args.threads), **settings}, work / "bento.log")
    try:
        server.wait_ready()
        pid = worker_pid(server.process.pid)
        run_wrk(server.url, script, args.warmup_seconds, args.clients)
        raw = work / "samples.txt"
        cpu_before, load, start = thread_cpu(pid), os.getloadavg()[0], time.monotonic()
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(args.rate), "--format", "raw",
                                "--idle", "--threads", "--nonblocking", "--duration", str(args.seconds),
                                "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load_result = run_wrk(server.url, script, args.seconds, args.clients)
        cpu_after, wall = thread_cpu(pid), time.monotonic() - start
        _, spy_errors = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            sys.exit(f"profile_worker: error: py-spy failed ({spy.returncode}): {spy_errors.strip()[-500:]}")
        samples = raw.read_text()
    finally:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)

    python = summarize(samples)
    cores = {tid: (cpu_after[tid] - cpu_before.get(tid, 0.0)) / wall for tid in cpu_after}
    for tid, profile in python.items():
        profile["cores_busy"] = round(cores.get(tid, 0.0), 3)
    native = sorted((round(c, 3) for tid, c in cores.items() if tid not in python and c > 0.005), reverse=True)
    result = {
        "protocol": {"served": args.onnx, "workers": 1, "threads": args.threads, "clients": args.clients,
                     "seconds": args.seconds,
                     "sampler": f"py-spy record --idle --threads --nonblocking, {args.rate} Hz",
                     "settings": settings, "load_generator": "wrk -t1, one short test text per request",
                     "parts": {part: list(patterns) for part, patterns in PARTS}},
        "hardware": hardware(os.cpu_count() or 0),
        "load_average_1min_before": load,
        "under_profile": load_result,
        "cores_busy_worker_total": round(sum(cores.values()), 3),
        "cores_busy_native_threads": native,  # ONNX Runtime's pool (py-spy does not see them)
        "python_threads": {f"{p['thread']} ({tid})": p for tid, p in python.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("under_profile", "cores_busy_worker_total", "cores_busy_native_threads",
                                             "python_threads")}, indent=2))


if __name__ == "__main__":
    main()
