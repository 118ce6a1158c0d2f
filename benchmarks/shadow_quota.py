"""The shadow model against a pod's CPU quota: does a shadow thread beside ONNX Runtime's threads get the pod
throttled, and does taking turns (DISTILOPS_SHADOW_SERIAL=1) or a larger limit avoid it?

    python benchmarks/shadow_quota.py        # after `make run`, as root (cgroup v1's cpu controller); needs wrk

- A pod's CPU limit is a CFS quota: `limit` CPU-seconds per 100 ms period for all its threads together. Here each
  arm is a real `bentoml serve` of the served student (models/quantized/onnx_int8_static) with the teacher's ONNX
  export as its shadow (shadow/, as `distilops package` builds a release), started inside a cgroup of its own
  (/sys/fs/cgroup/cpu/...: cpu.cfs_period_us 100000, cpu.cfs_quota_us = quota x the period). The pod's
  2 CPUs and 2 model threads are reproduced at half scale, so that this 2-core machine still has a core free
  beyond the quota (as a node with many free cores has): a 1-CPU quota and 1 ONNX Runtime thread.
- Designs: "off" (no shadow), "parallel" (the shadow's own thread alongside the model: the design before this
  benchmark), "serial" (the shadow takes turns with the model: serving/live.py's Turns), all under a 1-CPU quota;
  and "room" (parallel, with a 2-CPU quota: a limit of the model's threads + the shadow's); each shadowing
  design at shadow rate 0.1 (the base ConfigMap's) and 1.0 (an arm per rate). The shadow: 1 thread; alongside
  the model it scores up to 64 texts a call (as before), taking turns DISTILOPS_SHADOW_BATCH's default (4).
  Runs are finite: a shadow alongside the model that falls behind during a run catches up while the queue is
  drained after it, so its comparisons are all counted but part of its cost falls outside the timed run.
- Load: wrk at 4 and 32 clients, one real test text per request; arms interleaved in every repeat, one loaded at
  a time, the shadow queue drained between runs; medians of the repeats, every repeat kept. Per run: requests/s,
  p50/p99 latency, CPU busy (the process tree's user+system seconds / wall) and as a share of the quota (what a
  CPU HorizontalPodAutoscaler reads with requests = limits), cpu.stat's nr_periods, nr_throttled and
  throttled_time over the run, and the texts the shadow compared and dropped.
- Without a writable cgroup v1 cpu controller (not root, cgroup v2 only) the arms run without quotas: the
  throttling fields are null and "cgroup" says why.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from live_fidelity import drained, shadow_counts  # noqa: E402
from ort_spinning import measured_run  # noqa: E402
from serving import Server, bentoml_serve, free_port  # noqa: E402
from serving_benchmark import run_wrk, wrk_script  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import import_model_folder  # noqa: E402

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
# design: (quota in CPUs, serial, shadow batch); every design but "off" runs at each shadow rate. Alongside the
# model the shadow scored up to 64 texts a call (the design before); taking turns, DISTILOPS_SHADOW_BATCH's default.
DESIGNS = {"off": (1, "1", "4"), "parallel": (1, "0", "64"), "serial": (1, "1", "4"), "room": (2, "0", "64")}


def arms_of(designs: list[str], rates: list[str]) -> dict[str, tuple[int, str, str, str]]:
    """arm name: (quota in CPUs, shadow rate, serial, shadow batch)."""
    arms = {}
    for design in designs:
        cpus, serial, batch = DESIGNS[design]
        for rate in ["0"] if design == "off" else rates:
            arms[design if design == "off" else f"{design} {rate}"] = (cpus, rate, serial, batch)
    return arms


class Quota:
    """A cgroup v1 cpu group with a CFS quota, for one server."""

    def __init__(self, path: Path, cpus: float) -> None:
        self.path, self.cpus = path, cpus
        path.mkdir()
        (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))

    def stat(self) -> dict[str, int]:
        lines = (self.path / "cpu.stat").read_text().split("\n")
        return {key: int(value) for key, value in (line.split() for line in lines if line.strip())}



def remove_group(path: Path) -> None:
    for _ in range(50):  # a server's processes leave its group as they are reaped
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def cgroup_base() -> tuple[Path | None, str]:
    """A parent cgroup for the arms' groups, or None and why there is none."""
    base = CGROUP_CPU / f"distilops-shadow-quota-{os.getpid()}"
    try:
        base.mkdir()
        (base / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    except OSError as exc:
        if base.is_dir():
            base.rmdir()
        return None, f"cgroup v1 cpu controller not writable ({CGROUP_CPU}: {exc.strerror or exc}): no quotas"
    return base, f"cgroup v1 cpu controller at {CGROUP_CPU}, period {PERIOD_US} us"


def serve_in(quota: Quota | None, port: int, env: dict, log: Path) -> Server:
    """`bentoml serve`, moved into the quota's cgroup before it starts (its workers inherit it)."""
    if quota is None:
        return bentoml_serve(port, env, log)
    join = ("sh", "-c", f'echo $$ > "{quota.path}/cgroup.procs" && exec "$@"', "sh")  # this shell, then bentoml
    return bentoml_serve(port, env, log, wrapper=join)


def one_run(server: Server, quota: Quota | None, script: Path, seconds: int, clients: int) -> dict:
    before_counts, before_stat = shadow_counts(server), quota.stat() if quota else None
    result = measured_run(server, script, seconds, clients)
    after_stat = quota.stat() if quota else None
    after_counts = drained(server)
    result.update({k: after_counts[k] - before_counts[k] for k in ("compared", "dropped")})
    result.pop("cpu_utilization_of_request")
    if quota is None:
        result.update({"quota_cpus": None, "utilization_of_quota": None, "nr_periods": None, "nr_throttled": None,
                       "throttled_share": None, "throttled_ms": None})
        return result
    periods = after_stat["nr_periods"] - before_stat["nr_periods"]
    throttled = after_stat["nr_throttled"] - before_stat["nr_throttled"]
    result.update({"quota_cpus": quota.cpus, "utilization_of_quota": result["cores_busy"] / quota.cpus,
                   "nr_periods": periods, "nr_throttled": throttled,
                   "throttled_share": throttled / periods if periods else 0.0,
                   "throttled_ms": (after_stat["throttled_time"] - before_stat["throttled_time"]) / 1e6})
    return result


KEYS = ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "cores_busy", "utilization_of_quota",
        "nr_periods", "nr_throttled", "throttled_share", "throttled_ms", "compared", "dropped", "errors")


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="models/quantized/onnx_int8_static", help="the served student")
    parser.add_argument("--teacher", default="models/teacher_onnx", help="the shadow: the teacher's ONNX export")
    parser.add_argument("--data", default="data/prepared/test.parquet", help="texts to send")
    parser.add_argument("--out", default="benchmarks/results/shadow_quota_cpu.json")
    parser.add_argument("--designs", default=",".join(DESIGNS), help=f"of {', '.join(DESIGNS)}")
    parser.add_argument("--rates", default="0.1,1.0", help="shadow rates (the base ConfigMap's 0.1, and every text)")
    parser.add_argument("--clients", default="4,32", help="concurrent clients")
    parser.add_argument("--seconds", type=int, default=10, help="duration of one timed run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("shadow_quota: error: wrk not found (apt-get install wrk)")
    designs = [d.strip() for d in args.designs.split(",")]
    if unknown := set(designs) - set(DESIGNS):
        sys.exit(f"shadow_quota: error: unknown design(s) {sorted(unknown)}; known: {', '.join(DESIGNS)}")
    rates = [r.strip() for r in args.rates.split(",")]
    if bad := [r for r in rates if not 0 < float(r) <= 1]:
        sys.exit(f"shadow_quota: error: shadow rates must be in (0, 1], got {bad}")
    ARMS = arms_of(designs, rates)  # noqa: N806
    arms = list(ARMS)
    for folder in (args.student, args.teacher):
        if not (Path(folder) / "model.onnx").is_file():
            sys.exit(f"shadow_quota: error: {folder} is no ONNX model folder (no model.onnx): run `make run`")
    clients = [int(c) for c in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="distilops-quota-"))
    texts = pd.read_parquet(args.data)["text"].tolist()[:500]
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    tag = import_model_folder(Path(args.student), "bench-quota:v1", shadow=Path(args.teacher),
                              labels={"registry_name": "bench", "registry_version": "bench"}, metadata={})
    base, cgroup = cgroup_base()
    print(cgroup, flush=True)
    quotas: dict[str, Quota | None] = {}
    servers: dict[str, Server] = {}
    runs: dict[str, dict[int, list[dict]]] = {arm: {c: [] for c in clients} for arm in arms}
    load = {"before": os.getloadavg()}
    try:
        for arm in arms:
            cpus, rate, serial, batch = ARMS[arm]
            quotas[arm] = Quota(base / arm, cpus) if base else None
            home = work / f"home-{arm}"  # its own Prometheus files: a shared home mixes the servers' metrics
            shutil.copytree(work / "bentoml" / "models", home / "models")
            servers[arm] = serve_in(quotas[arm], free_port(), {
                **env, "BENTOML_HOME": str(home), "DISTILOPS_BENTO_MODEL": tag, "DISTILOPS_WORKERS": "1",
                "DISTILOPS_CPU_LIMIT": str(cpus), "DISTILOPS_THREADS": "1", "DISTILOPS_SHADOW_RATE": rate,
                "DISTILOPS_SHADOW_THREADS": "1", "DISTILOPS_SHADOW_SERIAL": serial,
                "DISTILOPS_SHADOW_BATCH": batch}, work / f"{arm}.log")
        for server in servers.values():
            server.wait_ready(180)
        shadow = {arm: httpx.get(servers[arm].url + "/model", timeout=10).json()["shadow"] for arm in arms}
        script = wrk_script(texts, work / "short.lua")
        for arm in arms:  # warm-up: first requests load kernels and train the batcher
            run_wrk(servers[arm].url, script, 3, max(clients))
            drained(servers[arm])
        for repeat in range(args.repeats):
            for c in clients:
                for arm in arms:
                    result = one_run(servers[arm], quotas[arm], script, args.seconds, c)
                    runs[arm][c].append(result)
                    throttled = ("" if result["nr_periods"] is None else
                                 f"  throttled {result['nr_throttled']}/{result['nr_periods']} "
                                 f"{result['throttled_ms']:.0f} ms")
                    print(f"[{repeat}] {arm:8s} {c:3d} clients {result['requests_per_second']:7.1f} req/s  p50 "
                          f"{result['latency_p50_ms']:6.1f} ms  p99 {result['latency_p99_ms']:6.1f} ms  cores "
                          f"{result['cores_busy']:.2f}{throttled}  shadow {result['compared']:.0f} compared "
                          f"{result['dropped']:.0f} dropped", flush=True)
        load["after"] = os.getloadavg()
    finally:
        for server in servers.values():
            server.stop()
        for quota in quotas.values():
            if quota:
                remove_group(quota.path)
        if base:
            remove_group(base)
        shutil.rmtree(work, ignore_errors=True)

    summary = {arm: {str(c): {k: median([r[k] for r in runs[arm][c]]) for k in KEYS} for c in clients}
               for arm in arms}
    ratios = {}
    if "off" in arms:
        off = summary["off"]  # the same quota without a shadow
        ratios = {f"{arm} vs off": {f"{c} clients": {
            "throughput": summary[arm][str(c)]["requests_per_second"] / off[str(c)]["requests_per_second"],
            "p50": summary[arm][str(c)]["latency_p50_ms"] / off[str(c)]["latency_p50_ms"],
            "p99": summary[arm][str(c)]["latency_p99_ms"] / off[str(c)]["latency_p99_ms"]}
            for c in clients} for arm in arms if arm != "off"}
    result = {
        "protocol": {"server": "bentoml serve, 1 worker, 1 ONNX Runtime thread (DISTILOPS_THREADS=1), the shadow 1 "
                               "thread; each server in a cgroup of its own with a CFS quota",
                     "model": f"{args.student}, shadow: {args.teacher}",
                     "arms": {arm: {"quota_cpus": ARMS[arm][0] if base else None, "shadow_rate": float(ARMS[arm][1]),
                                    "shadow_serial": ARMS[arm][2] == "1", "shadow_batch": int(ARMS[arm][3])}
                              for arm in arms},
                     "texts_per_request": 1, "seconds_per_run": args.seconds, "repeats": args.repeats,
                     "load_generator": "wrk -t1", "order": "arms interleaved within each repeat, one loaded at a "
                     "time, shadow queue drained between runs; medians"},
        "hardware": hardware(os.cpu_count() or 0), "load_average": load,
        "cgroup": cgroup, "quota": base is not None,
        "shadow": {arm: {k: info.get(k) for k in ("enabled", "rate", "threads", "batch", "serial")}
                   for arm, info in shadow.items()},
        "summary": summary, "ratios": ratios,
        "runs": {arm: {str(c): r for c, r in by.items()} for arm, by in runs.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("cgroup", "load_average", "summary", "ratios")}, indent=2))


if __name__ == "__main__":
    main()
