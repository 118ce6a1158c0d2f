"""The CPU serving image against the same service run from the venv: cold start and throughput.

    python benchmarks/container_benchmark.py      # after `make run`, `distilops promote`, `distilops image`

- Same Bento in both arms: the one `distilops image` built for the production version (its exported folder
  in the image build context), served by `bentoml serve` from the venv, or by the image under podman with the
  CPU Deployment's settings (tests/containers.py: user, read-only root, dropped capabilities, tmpfs, the
  ConfigMap's environment, CPU and memory limits) on the host network, so the load generator can reach it.
- Cold start: process/container start to the first 200 from /readyz, medians of `--cold-starts` starts.
- Throughput: wrk, 32 clients, one real test text per request, arms interleaved, medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from containers import podman_args, render  # noqa: E402
from serving import Server, free_port  # noqa: E402
from serving_benchmark import run_wrk, wrk_script  # noqa: E402

from distilops.paths import cache_dir  # noqa: E402
from distilops.pipeline.evaluate import hardware  # noqa: E402


class Container:
    """The image under podman, as the CPU Deployment runs it, listening on the host's `port`."""

    def __init__(self, image: str, port: int, name: str) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        subprocess.run(["podman", "run", "-d", "--name", name, "--network", "host", *podman_args(render("cpu")),
                        image, "--host", "127.0.0.1", "--port", str(port)], check=True, capture_output=True)

    def stop(self) -> None:
        subprocess.run(["podman", "rm", "-f", self.name], capture_output=True)


def wait_ready(url: str, timeout: float = 120) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready in {timeout} s")


def bento_env(bento: Path) -> dict[str, str]:
    """The environment the Bento declares (bento.yaml's envs, DISTILOPS_BENTO_MODEL among them): the image bakes it
    in, `bentoml serve` of the folder does not apply it, so the venv arm sets it (else it looks for the default
    model name, absent from a Bento of any other registry name)."""
    spec = yaml.safe_load((bento / "bento.yaml").read_text())
    return {item["name"]: str(item["value"]) for item in spec.get("envs") or [] if "value" in item}


def start(arm: str, image: str, bento: Path, work: Path) -> tuple[Container | Server, float]:
    """Start one arm and return (handle, seconds from start to ready)."""
    port = free_port()
    began = time.perf_counter()
    if arm == "container":
        handle: Container | Server = Container(image, port, f"distilops-bench-{port}")  # `podman run` counts too
    else:
        env = {**os.environ, **bento_env(bento), "BENTOML_HOME": str(work / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "true", "DISTILOPS_THREADS": "2"}
        handle = Server([str(Path(sys.executable).parent / "bentoml"), "serve", str(bento), "--host", "127.0.0.1",
                         "--port", str(port)], env, port, work / f"venv-{port}.log", cwd=bento)
    try:
        wait_ready(handle.url)
    except TimeoutError:
        handle.stop()  # a server that never got ready is not left running (a failed venv arm kept restarting)
        raise
    return handle, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the CPU image (distilops image prints it)")
    parser.add_argument("--bento", default=str(cache_dir() / "images" / "cpu" / "bento"),
                        help="the Bento folder that image was built from")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="texts to send")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold-starts", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/container_cpu.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("container_benchmark: error: wrk not found (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="distilops-container-bench-"))
    script = wrk_script(pd.read_parquet(args.data)["text"].tolist()[:500], work / "post.lua")
    arms = ("venv", "container")
    cold: dict[str, list[float]] = {arm: [] for arm in arms}
    for _ in range(args.cold_starts):
        for arm in arms:
            handle, seconds = start(arm, args.image, Path(args.bento), work)
            cold[arm].append(seconds)
            handle.stop()
            print(f"cold start {arm:9s} {seconds:5.2f} s", flush=True)
    servers = {arm: start(arm, args.image, Path(args.bento), work)[0] for arm in arms}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    try:
        for arm in arms:
            run_wrk(servers[arm].url, script, 3, args.connections)  # warm-up
        for _ in range(args.repeats):
            for arm in arms:
                result = run_wrk(servers[arm].url, script, args.seconds, args.connections)
                runs[arm].append(result)
                print(f"{arm:9s} {result['requests_per_second']:7.1f} req/s  p50 {result['latency_p50_ms']:6.1f} ms"
                      f"  p99 {result['latency_p99_ms']:6.1f} ms  errors {result['errors']}", flush=True)
                time.sleep(1)
        model = httpx.get(servers["container"].url + "/model").json()
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary = {arm: {"cold_start_s_median": statistics.median(cold[arm]),
                     **{key: statistics.median(r[key] for r in runs[arm])
                        for key in ("requests_per_second", "latency_p50_ms", "latency_p99_ms")},
                     "errors": sum(r["errors"] for r in runs[arm])} for arm in arms}
    result = {
        "protocol": {"image": args.image, "served": {k: model[k] for k in ("registry_name", "registry_version",
                                                                            "variant", "providers", "threads")},
                     "clients": args.connections, "seconds_per_run": args.seconds, "repeats": args.repeats,
                     "cold_starts": args.cold_starts, "load_generator": "wrk -t1",
                     "container": "podman (runc), CPU Deployment's security context and limits (2 CPUs, 2 GiB), "
                                  "host network", "venv": "bentoml serve of the same Bento folder, 2 threads"},
        "hardware": hardware(os.cpu_count() or 0),
        "summary": summary,
        "ratios": {"container / venv throughput": summary["container"]["requests_per_second"]
                   / summary["venv"]["requests_per_second"]},
        "cold_start_s": cold,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
