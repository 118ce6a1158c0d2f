"""ONNX Runtime's spin-waiting threads against sleeping ones, in the served int8 student: throughput, latency
and the CPU the pod really uses; then a pod's capacity in long texts (what a CPU overlay pod can take).

    python benchmarks/ort_spinning.py        # after `make run`; needs wrk (apt-get install wrk)

- Two `bentoml serve` processes on the same Bento model (models/quantized/onnx_int8_static), the CPU overlay's
  settings (1 worker, 2 threads): DISTILOPS_ORT_SPIN_WAIT=1 (ONNX Runtime's default) and 0 (what distilops
  ships). Only the server under load is busy; arms are interleaved in every repeat; medians are reported.
- Load: wrk with 1, 4 and 32 clients, one real test text per request. CPU: user + system seconds of the
  server's process tree over the run, divided by its length = cores busy, what a CPU HorizontalPodAutoscaler
  reads (as a share of the pod's request, 2 cores); and CPU milliseconds per request.
- Capacity in long texts (sleeping threads): one review per request, the test_long split (200-400 words) and
  pairs of them joined (~530 words), at 8 and 32 clients: texts/s, latency and the share of 503s (shed load).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from serving import Server, bentoml_serve, free_port  # noqa: E402
from serving_benchmark import run_wrk, wrk_script  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402

CPU_REQUEST = 2  # k8s/overlays/cpu: requests.cpu


def tree_sum(pid: int, measure) -> float:  # noqa: ANN001 (a psutil.Process -> number)
    """`measure` summed over a process and all its children (BentoML's workers); one that exits meanwhile
    counts nothing."""
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += measure(process)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its children."""
    return tree_sum(pid, lambda process: sum(process.cpu_times()[:2]))


def measured_run(server: Server, script: Path, seconds: int, clients: int) -> dict:
    before, start = cpu_seconds(server.process.pid), time.perf_counter()
    result = run_wrk(server.url, script, seconds, clients)
    used, wall = cpu_seconds(server.process.pid) - before, time.perf_counter() - start
    result["cores_busy"] = used / wall
    result["cpu_utilization_of_request"] = used / wall / CPU_REQUEST
    result["cpu_ms_per_request"] = 1000 * used / max(result["requests"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", default="models/quantized/onnx_int8_static", help="the served ONNX int8 student")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="short texts to send")
    parser.add_argument("--long-data", default="data/prepared/test_long.parquet", help="long reviews")
    parser.add_argument("--clients", default="1,4,32", help="concurrent clients of the spin comparison")
    parser.add_argument("--long-clients", default="8,32", help="concurrent clients of the long-text capacity runs")
    parser.add_argument("--seconds", type=int, default=10, help="duration of one timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/ort_spinning_cpu.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("ort_spinning: error: wrk not found (apt-get install wrk)")
    clients = [int(c) for c in args.clients.split(",")]
    long_clients = [int(c) for c in args.long_clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="distilops-spin-"))
    texts = pd.read_parquet(args.data)["text"].tolist()[:500]
    reviews = pd.read_parquet(args.long_data)["text"].tolist()
    joined = [f"{a}\n\n{b}" for a, b in zip(reviews, reviews[1:] + reviews[:1], strict=True)]
    scripts = {"short": wrk_script(texts, work / "short.lua"), "long": wrk_script(reviews, work / "long.lua"),
               "long-joined": wrk_script(joined, work / "joined.lua")}
    words = {"short": statistics.median(len(t.split()) for t in texts),
             "long": statistics.median(len(t.split()) for t in reviews),
             "long-joined": statistics.median(len(t.split()) for t in joined)}
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    tag = import_model_folder(Path(args.onnx), "bench-spin:v1", labels={"registry_name": "bench",
                              "registry_version": "bench"}, metadata={})
    arms = {"spin-wait (ORT default)": "1", "sleep (distilops)": "0"}
    servers: dict[str, Server] = {}
    runs: dict[str, dict[int, list[dict]]] = {arm: {c: [] for c in clients} for arm in arms}
    capacity: dict[str, dict[int, list[dict]]] = {kind: {c: [] for c in long_clients}
                                                  for kind in ("long", "long-joined")}
    try:
        for arm, spin in arms.items():
            servers[arm] = bentoml_serve(free_port(), {**env, "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": "1",
                                                       "DISTILOPS_THREADS": "2", "DISTILOPS_ORT_SPIN_WAIT": spin},
                                         work / f"spin{spin}.log")
        for server in servers.values():
            server.wait_ready()
        for arm in arms:  # warm-up: first requests load kernels and train the batcher
            run_wrk(servers[arm].url, scripts["short"], 3, 32)
        for _ in range(args.repeats):
            for c in clients:
                for arm in arms:
                    result = measured_run(servers[arm], scripts["short"], args.seconds, c)
                    runs[arm][c].append(result)
                    print(f"{arm:24s} {c:3d} clients {result['requests_per_second']:7.1f} req/s  p50 "
                          f"{result['latency_p50_ms']:6.1f} ms  p99 {result['latency_p99_ms']:6.1f} ms  cores "
                          f"{result['cores_busy']:.2f}  {result['cpu_ms_per_request']:.2f} CPU ms/req", flush=True)
                    time.sleep(1)
            for kind in capacity:
                for c in long_clients:
                    result = measured_run(servers["sleep (distilops)"], scripts[kind], args.seconds, c)
                    result["shed_share"] = result["errors"] / max(result["requests"], 1)
                    capacity[kind][c].append(result)
                    print(f"capacity {kind:12s} {c:3d} clients {result['requests_per_second']:6.1f} texts/s  p50 "
                          f"{result['latency_p50_ms']:7.1f} ms  p99 {result['latency_p99_ms']:7.1f} ms  "
                          f"503s {result['shed_share']:.1%}", flush=True)
                    time.sleep(1)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    keys = ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "cores_busy", "cpu_utilization_of_request",
            "cpu_ms_per_request")
    summary = {arm: {str(c): {k: statistics.median(r[k] for r in runs[arm][c]) for k in keys} for c in clients}
               for arm in arms}
    on, off = summary["spin-wait (ORT default)"], summary["sleep (distilops)"]
    ratios = {f"{c} clients": {"throughput sleep/spin": off[str(c)]["requests_per_second"] /
                               on[str(c)]["requests_per_second"],
                               "cores busy sleep/spin": off[str(c)]["cores_busy"] / on[str(c)]["cores_busy"],
                               "CPU per request sleep/spin": off[str(c)]["cpu_ms_per_request"] /
                               on[str(c)]["cpu_ms_per_request"],
                               "p50 sleep/spin": off[str(c)]["latency_p50_ms"] / on[str(c)]["latency_p50_ms"]}
              for c in clients}
    capacity_summary = {kind: {"median_words": words[kind], **{
        f"{c} clients": {k: statistics.median(r[k] for r in capacity[kind][c])
                         for k in ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "shed_share",
                                   "cores_busy")} for c in long_clients}} for kind in capacity}
    result = {
        "protocol": {"server": "bentoml serve, 1 worker, 2 ONNX Runtime threads (the cpu overlay's pod)",
                     "model": args.onnx, "texts_per_request": 1, "seconds_per_run": args.seconds,
                     "repeats": args.repeats, "load_generator": "wrk -t1", "short_median_words": words["short"],
                     "cpu": "user+system seconds of the server's process tree / run length",
                     "order": "arms interleaved within each repeat; medians"},
        "hardware": hardware(os.cpu_count() or 0),
        "summary": summary,
        "ratios": ratios,
        "long_text_capacity_per_pod": capacity_summary,
        "runs": {arm: {str(c): r for c, r in by.items()} for arm, by in runs.items()},
        "capacity_runs": {kind: {str(c): r for c, r in by.items()} for kind, by in capacity.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": ratios, "long_text_capacity_per_pod": capacity_summary},
                     indent=2))


if __name__ == "__main__":
    main()
