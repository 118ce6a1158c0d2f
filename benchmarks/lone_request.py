"""A lone request: how long BentoML's batching holds it, against the model's own batch-1 time, and what changing
the batching costs at 32 clients.

    python benchmarks/lone_request.py          # after `make run`; needs wrk (apt-get install wrk)

Three `bentoml serve` processes on the same served ONNX folder, the CPU overlay's settings (1 worker, 2 threads):
  adaptive      DISTILOPS_DISPATCH=adaptive, DISTILOPS_ADAPTIVE_WAIT=1: BentoML's adaptive batching (a batch waits
                for a learned wait), calls of 4 texts
  no-lone-wait  the same, DISTILOPS_ADAPTIVE_WAIT=0: no wait while the last model calls carried one request each
                (what distilops shipped before continuous dispatch)
  continuous    DISTILOPS_DISPATCH=continuous: call threads take what waits (what distilops ships)
  naive         benchmarks/naive_server.py on the same folder: Flask, one forward pass per request (HTTP's floor)
and the model itself in this process (TextClassifier.classify, tokenization included: what one model call of one
text costs). In every repeat, interleaved: `--lone` short test texts one at a time through the model, then through
each server (one client, keep-alive, the next request once the answer is in); then wrk with `--connections`
clients on each server. Medians of the repeats; the target: lone p50 within 3 ms of the model's batch-1 p50,
32-client throughput no lower than adaptive batching's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
from serving_benchmark import run_wrk, wrk_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving import Server, batch_histogram, bentoml_serve, free_port  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402
from distilops.serving.inference import TextClassifier  # noqa: E402

BENTO_ARMS = {  # each arm's service settings
    "adaptive": {"DISTILOPS_DISPATCH": "adaptive", "DISTILOPS_ADAPTIVE_WAIT": "1", "DISTILOPS_TEXTS_PER_CALL": "4"},
    "no-lone-wait": {"DISTILOPS_DISPATCH": "adaptive", "DISTILOPS_ADAPTIVE_WAIT": "0", "DISTILOPS_TEXTS_PER_CALL": "4"},
    "continuous": {"DISTILOPS_DISPATCH": "continuous"},
}
ARMS = (*BENTO_ARMS, "naive")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def lone_requests(url: str, texts: list[str]) -> list[float]:
    """Milliseconds per request, one client, sent one after another on one kept-alive connection."""
    timings = []
    with httpx.Client(timeout=30) as client:
        for text in texts:
            start = time.perf_counter()
            response = client.post(url + "/classify", json={"texts": [text]})
            timings.append(1000 * (time.perf_counter() - start))
            response.raise_for_status()
    return timings


def model_alone(model: TextClassifier, texts: list[str]) -> list[float]:
    timings = []
    for text in texts:
        start = time.perf_counter()
        model.classify([text])
        timings.append(1000 * (time.perf_counter() - start))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", default="models/quantized/onnx_int8_static", help="the served ONNX folder")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="short texts to send")
    parser.add_argument("--lone", type=int, default=200, help="lone requests per arm and repeat")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10, help="duration of one wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (server and model alike)")
    parser.add_argument("--out", default="benchmarks/results/lone_request_cpu.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("lone_request: error: wrk not found (apt-get install wrk)")

    texts = pd.read_parquet(args.data)["text"].tolist()[:500]
    work = Path(tempfile.mkdtemp(prefix="distilops-lone-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    tag = import_model_folder(Path(args.onnx), "bench-lone:v1", labels={"registry_name": "bench",
                                                                       "registry_version": "bench"}, metadata={})
    script = wrk_script(texts, work / "post.lua")
    model = TextClassifier(args.onnx, device="cpu", threads=args.threads)
    servers: dict[str, Server] = {}
    lone: dict[str, list[float]] = {"model": [], **{arm: [] for arm in ARMS}}
    loaded: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    try:
        for arm, settings in BENTO_ARMS.items():
            servers[arm] = bentoml_serve(free_port(), {**env, "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": "1",
                                                       "DISTILOPS_THREADS": str(args.threads), **settings},
                                         work / f"{arm}.log")
        port = free_port()
        servers["naive"] = Server([sys.executable, str(ROOT / "benchmarks/naive_server.py"), "--model", args.onnx,
                                   "--engine", "distilops", "--threads", str(args.threads), "--port", str(port)],
                                  env, port, work / "naive.log", cwd=ROOT)
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up: kernels, and the batcher's own training requests
            lone_requests(server.url, texts[:20])
            run_wrk(server.url, script, 2, args.connections)
        model_alone(model, texts[:20])
        for repeat in range(args.repeats):
            sample = texts[repeat * args.lone % len(texts):][: args.lone] or texts[: args.lone]
            lone["model"].append(statistics.median(model_alone(model, sample)))
            for arm, server in servers.items():
                timings = lone_requests(server.url, sample)
                lone[arm].append(statistics.median(timings))
                print(f"{arm:12s} lone p50 {lone[arm][-1]:6.2f} ms  p90 {percentile(timings, 0.9):6.2f} ms  "
                      f"(model alone {lone['model'][-1]:5.2f} ms)", flush=True)
            for arm, server in servers.items():
                before = batch_histogram(httpx.get(server.url + "/metrics").text) if arm != "naive" else None
                result = run_wrk(server.url, script, args.seconds, args.connections)
                result["mean_requests_per_model_call"] = 1.0  # naive: one forward pass per request, by design
                if before:
                    calls, requests = batch_histogram(httpx.get(server.url + "/metrics").text)
                    result["mean_requests_per_model_call"] = (requests - before[1]) / max(calls - before[0], 1)
                loaded[arm].append(result)
                print(f"{arm:12s} {args.connections} clients {result['requests_per_second']:7.1f} req/s  p50 "
                      f"{result['latency_p50_ms']:6.1f} ms  p99 {result['latency_p99_ms']:6.1f} ms  batch "
                      f"{result['mean_requests_per_model_call']:.1f}  errors {result['errors']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    model_p50 = statistics.median(lone["model"])
    summary = {"model_batch1_p50_ms": model_p50}
    for arm in ARMS:
        summary[arm] = {
            "lone_p50_ms": statistics.median(lone[arm]),
            "lone_p50_minus_model_ms": statistics.median(lone[arm]) - model_p50,
            **{key: statistics.median(r[key] for r in loaded[arm])
               for key in ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "mean_requests_per_model_call")},
            "errors": sum(r["errors"] for r in loaded[arm])}
    result = {
        "protocol": {"served": args.onnx, "workers": 1, "threads": args.threads, "arms": BENTO_ARMS,
                     "lone_requests": args.lone,
                     "lone_client": "httpx, one connection kept alive, sequential", "clients": args.connections,
                     "seconds_per_run": args.seconds, "repeats": args.repeats, "load_generator": "wrk -t1",
                     "order": "model, then each server, interleaved in every repeat; medians of repeats"},
        "hardware": hardware(os.cpu_count() or 0),
        "summary": summary,
        "ratios": {f"{arm} / {base} {key}": summary[arm][field] / summary[base][field]
                   for arm in ("no-lone-wait", "continuous") for base in ("adaptive", "naive")
                   for key, field in (("throughput", "requests_per_second"), ("lone p50", "lone_p50_ms"),
                                      ("p99", "latency_p99_ms"))},
        "runs": {"lone_p50_ms": lone, "loaded": loaded},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
