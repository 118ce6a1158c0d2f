"""Serving throughput: the BentoML service (as shipped: continuous dispatch) against a naive Flask server that runs
one forward pass per request, side by side, under 32 concurrent clients sending one text each.

    python benchmarks/serving_benchmark.py          # after `make run`; needs wrk (apt-get install wrk)

Four arms, so the gain can be attributed:
  naive-pipeline-fp32   Flask + transformers.pipeline on the fp32 student  (the usual deployment: the baseline)
  bento-fp32            BentoML service on the student's ONNX fp32 export  (the service alone: it runs ONNX only)
  naive-onnx-int8       Flask + the served ONNX int8 student, per request  (quantization alone)
  bento-onnx-int8       BentoML service on the served ONNX int8 student    (what distilops ships)
  bento-onnx-int8+long  the same server, with --long-fraction of requests a long document (read in windows)
Load comes from wrk (C, one thread: it takes little of the CPU the servers share), with real test
texts. Arms are interleaved in every repeat; medians are reported with each run's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving import Server, batch_histogram, bentoml_serve, free_port  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402


def wrk_script(texts: list[str], path: Path) -> Path:
    bodies = ",\n".join(f"[==[{json.dumps({'texts': [t]})}]==]" for t in texts)
    path.write_text(f"""wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {{
{bodies}
}}
request = function()
  return wrk.format(nil, nil, nil, bodies[math.random(#bodies)])
end
""")
    return path


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> dict:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url + "/classify"], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "latency_p50_ms": ms("50%"), "latency_p99_ms": ms("99%"),
            "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="models/student", help="fp32 student folder")
    parser.add_argument("--onnx-fp32", default="models/quantized/onnx_fp32",
                        help="the student's ONNX fp32 export (the bento-fp32 arm: the service serves ONNX only)")
    parser.add_argument("--onnx", default="models/quantized/onnx_int8_static", help="served ONNX int8 student folder")
    parser.add_argument("--warmup-seconds", type=int, default=3, help="wrk warm-up per arm")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="texts to send")
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients")
    parser.add_argument("--seconds", type=int, default=15, help="duration of one timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bento-workers", type=int, default=1, help="BentoML workers (the cpu overlay's 1)")
    parser.add_argument("--bento-threads", type=int, default=2, help="threads per BentoML worker (cpu overlay: 2)")
    parser.add_argument("--long-data", default="data/prepared/test_long.parquet", help="long documents for the mix")
    parser.add_argument("--long-fraction", type=float, default=0.1,
                        help="share of requests carrying a long document in the +long arm (0 = no such arm)")
    parser.add_argument("--out", default="benchmarks/results/serving_cpu.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("serving_benchmark: error: wrk not found (apt-get install wrk): a Python load generator "
                 "would take the CPU the servers are measured on")

    work = Path(tempfile.mkdtemp(prefix="distilops-bench-"))
    texts = pd.read_parquet(args.data)["text"].tolist()[:500]
    script = wrk_script(texts, work / "post.lua")
    mixed = None
    if args.long_fraction > 0:  # each long document ~8 windows: what the window cap bounds, under load
        documents = pd.read_parquet(args.long_data)["text"].tolist()
        n_long = round(len(texts) * args.long_fraction / (1 - args.long_fraction))
        mixed = wrk_script(texts + [documents[i % len(documents)] for i in range(n_long)], work / "mixed.lua")
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    servers: dict[str, Server] = {}
    try:
        for arm, folder in (("bento-fp32", args.onnx_fp32), ("bento-onnx-int8", args.onnx)):
            tag = import_model_folder(Path(folder), f"bench-{arm}:v1", labels={"registry_name": arm,
                                      "registry_version": "bench"}, metadata={})
            bento_env = {**env, "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": str(args.bento_workers),
                         "DISTILOPS_THREADS": str(args.bento_threads)}
            servers[arm] = bentoml_serve(free_port(), bento_env, work / f"{arm}.log")
        for arm, folder, engine in (("naive-pipeline-fp32", args.student, "pipeline"),
                                    ("naive-onnx-int8", args.onnx, "distilops")):
            port = free_port()
            servers[arm] = Server([sys.executable, str(ROOT / "benchmarks/naive_server.py"), "--model", folder,
                                   "--engine", engine, "--port", str(port)], env, port, work / f"{arm}.log", cwd=ROOT)
        for server in servers.values():
            server.wait_ready()
        order = ["naive-pipeline-fp32", "bento-fp32", "naive-onnx-int8", "bento-onnx-int8"]
        scripts = dict.fromkeys(order, script)
        if mixed:
            servers["bento-onnx-int8+long"] = servers["bento-onnx-int8"]
            order.append("bento-onnx-int8+long")
            scripts["bento-onnx-int8+long"] = mixed
        for arm in order:  # warm-up: first requests load kernels and train the batcher
            run_wrk(servers[arm].url, scripts[arm], args.warmup_seconds, args.connections)
        runs: dict[str, list[dict]] = {arm: [] for arm in order}
        for _ in range(args.repeats):
            for arm in order:
                before = batch_histogram(httpx.get(servers[arm].url + "/metrics").text) if "bento" in arm else None
                result = run_wrk(servers[arm].url, scripts[arm], args.seconds, args.connections)
                if before:
                    calls, requests = batch_histogram(httpx.get(servers[arm].url + "/metrics").text)
                    result["model_calls"] = calls - before[0]
                    result["mean_requests_per_model_call"] = (requests - before[1]) / max(calls - before[0], 1)
                else:
                    result["mean_requests_per_model_call"] = 1.0  # one forward pass per request, by design
                runs[arm].append(result)
                print(f"{arm:20s} {result['requests_per_second']:7.1f} req/s  p50 {result['latency_p50_ms']:6.1f} ms"
                      f"  p99 {result['latency_p99_ms']:6.1f} ms  errors {result['errors']}"
                      f"  batch {result['mean_requests_per_model_call']:.1f}", flush=True)
                time.sleep(1)
    finally:
        for server in set(servers.values()):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def median(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    summary = {arm: {key: median(arm, key) for key in ("requests_per_second", "latency_p50_ms", "latency_p99_ms",
                                                       "mean_requests_per_model_call")}
               | {"errors": sum(r["errors"] for r in runs[arm])} for arm in order}
    rps = {arm: summary[arm]["requests_per_second"] for arm in order}
    result = {
        "protocol": {
            "bento_workers": args.bento_workers, "bento_threads_per_worker": args.bento_threads,
            "naive": "Flask threaded server, one process", "clients": args.connections, "texts_per_request": 1,
            "seconds_per_run": args.seconds, "repeats": args.repeats, "load_generator": "wrk -t1",
            "texts": "test split, random per request", "order": "arms interleaved within each repeat; medians",
            "long_fraction": args.long_fraction,
        },
        "hardware": hardware(os.cpu_count() or 0),
        "summary": summary,
        "ratios": {
            "bento_onnx_int8 / naive_pipeline_fp32": rps["bento-onnx-int8"] / rps["naive-pipeline-fp32"],
            "bento_fp32 / naive_pipeline_fp32 (same weights, ONNX vs PyTorch)":
                rps["bento-fp32"] / rps["naive-pipeline-fp32"],
            "bento_onnx_int8 / naive_onnx_int8 (same model)": rps["bento-onnx-int8"] / rps["naive-onnx-int8"],
            **({f"bento_onnx_int8 with {args.long_fraction:.0%} long documents / short only":
                rps["bento-onnx-int8+long"] / rps["bento-onnx-int8"]} if mixed else {}),
        },
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
