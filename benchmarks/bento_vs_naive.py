"""BentoML against a naive server on the same served model, at several client counts, short texts and a long mix.

    python benchmarks/bento_vs_naive.py        # after `make run`; needs wrk (apt-get install wrk)
    python benchmarks/bento_vs_naive.py --arm before:src=/path/to/other/checkout/src   # the code before a change

Arms, all on one ONNX folder (the served static int8 student by default), one process each:
  naive        benchmarks/naive_server.py: Flask, threaded, one forward pass per request (ONNX Runtime threads as
               the service's)
  bento        `bentoml serve` of this checkout's service with the CPU overlay's settings (1 worker, --threads)
  NAME         each --arm NAME:KEY=VALUE,...: the service again with these environment settings; the key `src`
               serves another checkout's src/ (the code before a change), same settings otherwise
Load: wrk (one thread) with each of --clients connections, one real test text per request; with --long-fraction
> 0 a second mix where that share of requests carries a long review instead (read in windows). Every arm, client
count and mix is interleaved in every repeat (the arms' order rotating); medians of the repeats, with every run's
numbers and the load average before it. The issue 27 target: at 32 clients BentoML's throughput >= 1.0x and p99
<= the naive server's.
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
from ort_spinning import measured_run
from serving_benchmark import run_wrk, wrk_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving import Server, batch_histogram, bentoml_serve, free_port  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402

KEYS = ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "cores_busy", "cpu_ms_per_request",
        "mean_requests_per_model_call")


def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    """NAME:KEY=VALUE,KEY=VALUE -> (NAME, {KEY: VALUE}); a clear error for anything else."""
    name, _, rest = spec.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    if not name or name in ("naive", "bento") or len(settings) != len([i for i in rest.split(",") if i]):
        raise SystemExit(f"bento_vs_naive: error: --arm {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...] with a "
                         "NAME other than naive and bento")
    return name, settings


def line(result: dict) -> str:
    return (f"{result['requests_per_second']:7.1f} req/s  p50 {result['latency_p50_ms']:7.1f} ms  p99 "
            f"{result['latency_p99_ms']:7.1f} ms  batch {result['mean_requests_per_model_call']:5.1f}  cores "
            f"{result['cores_busy']:.2f}  cpu/req {result['cpu_ms_per_request']:5.2f} ms  errors {result['errors']}  "
            f"load {result['load_average_1min_before']:.1f}")


def serve_bento(port: int, env: dict, log: Path, src: str | None) -> Server:
    if not src:
        return bentoml_serve(port, env, log)
    return bentoml_serve(port, {**env, "PYTHONPATH": src}, log, cwd=Path(src))


def summarize(runs: dict, seconds: float) -> tuple[dict, dict, dict]:
    """Medians per mix, client count and arm; every BentoML arm's ratios to the naive server in the same repeat; the
    load average before the runs. `ok_per_second`: 2xx answers a second (requests less errors: 503s of shed load,
    and socket errors and timeouts, which wrk does not count as requests, so it errs low)."""
    summary: dict = {}
    ratios: dict = {}
    for by_clients in runs.values():
        for by_arm in by_clients.values():
            for results in by_arm.values():
                for r in results:
                    r["ok_per_second"] = max(0, r["requests"] - r["errors"]) / seconds
    for mix, by_clients in runs.items():
        for n, by_arm in by_clients.items():
            cell = summary.setdefault(mix, {}).setdefault(n, {})
            for arm, results in by_arm.items():
                cell[arm] = {key: statistics.median(r[key] for r in results) for key in (*KEYS, "ok_per_second")}
                cell[arm]["errors"] = sum(r["errors"] for r in results)
            for arm in by_arm:
                if arm == "naive":
                    continue
                pairs = list(zip(by_arm[arm], by_arm["naive"], strict=True))  # same repeat, back to back
                per_repeat = {
                    "throughput": [a["requests_per_second"] / b["requests_per_second"] for a, b in pairs],
                    "ok_throughput": [a["ok_per_second"] / max(b["ok_per_second"], 1e-9) for a, b in pairs],
                    "p99": [a["latency_p99_ms"] / b["latency_p99_ms"] for a, b in pairs],
                    "cpu_per_request": [a["cpu_ms_per_request"] / b["cpu_ms_per_request"] for a, b in pairs]}
                ratios.setdefault(mix, {}).setdefault(n, {})[f"{arm} / naive"] = {
                    **{f"{key}_median": statistics.median(values) for key, values in per_repeat.items()},
                    **{f"{key}_per_repeat": values for key, values in per_repeat.items()}}
    loads = [r["load_average_1min_before"] for c in runs.values() for a in c.values() for rs in a.values() for r in rs]
    return summary, ratios, {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", default="models/quantized/onnx_int8_static", help="the served ONNX folder")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="short texts to send")
    parser.add_argument("--long-data", default="data/prepared/test_long.parquet", help="long reviews for the mix")
    parser.add_argument("--long-fraction", type=float, default=0.1, help="share of long requests in the mix "
                        "(0 = short texts only)")
    parser.add_argument("--clients", default="1,8,32,128", help="comma-separated client counts")
    parser.add_argument("--seconds", type=int, default=10, help="duration of one wrk run")
    parser.add_argument("--warmup-seconds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (every arm)")
    parser.add_argument("--arm", action="append", default=[], help="NAME:KEY=VALUE,... another BentoML arm")
    parser.add_argument("--out", default="benchmarks/results/bento_vs_naive_cpu.json")
    parser.add_argument("--summarize-again", action="store_true", help="measure nothing: recompute --out's summary "
                        "and ratios from its runs (after this script's summary changed)")
    args = parser.parse_args()
    if args.summarize_again:
        stored = json.loads(Path(args.out).read_text())
        stored["summary"], stored["ratios"], stored["load_average_1min"] = summarize(
            stored["runs"], stored["protocol"]["seconds_per_run"])
        Path(args.out).write_text(json.dumps(stored, indent=2) + "\n")
        return
    if not shutil.which("wrk"):
        sys.exit("bento_vs_naive: error: wrk not found (apt-get install wrk)")
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        sys.exit(f"bento_vs_naive: error: --clients {args.clients!r}: expected whole numbers like 1,8,32,128")
    if not clients or min(clients) < 1:
        sys.exit(f"bento_vs_naive: error: --clients {args.clients!r}: every count must be >= 1")
    extra = dict(parse_arm(spec) for spec in args.arm)
    described = {name: dict(settings) for name, settings in extra.items()}  # before `src` is taken out

    work = Path(tempfile.mkdtemp(prefix="distilops-bvn-"))
    texts = pd.read_parquet(args.data)["text"].tolist()[:500]
    mixes = {"short": wrk_script(texts, work / "short.lua")}
    if args.long_fraction > 0:
        documents = pd.read_parquet(args.long_data)["text"].tolist()
        n_long = round(len(texts) * args.long_fraction / (1 - args.long_fraction))
        mixes[f"long{args.long_fraction:.0%}"] = wrk_script(
            texts + [documents[i % len(documents)] for i in range(n_long)], work / "mixed.lua")
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    tag = import_model_folder(Path(args.onnx), "bench-bvn:v1", labels={"registry_name": "bench",
                                                                      "registry_version": "bench"}, metadata={})
    bento_env = {**env, "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": "1", "DISTILOPS_THREADS": str(args.threads)}
    servers: dict[str, Server] = {}
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {}
    try:
        port = free_port()
        servers["naive"] = Server([sys.executable, str(ROOT / "benchmarks/naive_server.py"), "--model", args.onnx,
                                   "--engine", "distilops", "--threads", str(args.threads), "--port", str(port)],
                                  env, port, work / "naive.log", cwd=ROOT)
        servers["bento"] = bentoml_serve(free_port(), bento_env, work / "bento.log")
        for name, settings in extra.items():
            src = settings.pop("src", None)
            servers[name] = serve_bento(free_port(), {**bento_env, **settings}, work / f"{name}.log", src)
        for server in servers.values():
            server.wait_ready()
        arms = list(servers)
        runs = {mix: {str(c): {arm: [] for arm in arms} for c in clients} for mix in mixes}
        for server in servers.values():  # warm-up: kernels, and BentoML's batcher trains itself
            run_wrk(server.url, mixes["short"], args.warmup_seconds, max(clients))
        for repeat in range(args.repeats):
            order = arms[repeat % len(arms):] + arms[: repeat % len(arms)]
            for mix, script in mixes.items():
                for n in clients:
                    for arm in order:
                        url = servers[arm].url
                        load = os.getloadavg()[0]
                        before = batch_histogram(httpx.get(url + "/metrics").text) if arm != "naive" else None
                        result = {**measured_run(servers[arm], script, args.seconds, n),  # CPU of its processes
                                  "load_average_1min_before": load}
                        result["mean_requests_per_model_call"] = 1.0  # naive: one forward pass per request
                        if before:
                            calls, requests = batch_histogram(httpx.get(url + "/metrics").text)
                            result["mean_requests_per_model_call"] = (requests - before[1]) / max(calls - before[0], 1)
                        runs[mix][str(n)][arm].append(result)
                        print(f"{mix:7s} {n:4d} clients {arm:10s} {line(result)}", flush=True)
                        time.sleep(0.5)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    summary, ratios, loads = summarize(runs, args.seconds)
    result = {
        "protocol": {"served": args.onnx, "workers": 1, "threads": args.threads, "clients": clients,
                     "mixes": {"short": "one test text per request",
                               **({m: f"{args.long_fraction:.0%} of requests a long review" for m in mixes
                                   if m != "short"})},
                     "arms": {"naive": "Flask threaded, one forward pass per request", "bento": "this checkout",
                              **described},
                     "seconds_per_run": args.seconds, "repeats": args.repeats, "load_generator": "wrk -t1",
                     "order": "arms interleaved (rotating) within each client count, mix and repeat; medians"},
        "hardware": hardware(os.cpu_count() or 0),
        "load_average_1min": loads,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": {mix: {n: {arm: {k: v for k, v in r.items() if "median" in k}
                                            for arm, r in by_arm.items()} for n, by_arm in by_n.items()}
                                 for mix, by_n in ratios.items()},
                      "load_average_1min": result["load_average_1min"]}, indent=2))


if __name__ == "__main__":
    main()
