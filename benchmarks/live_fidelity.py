"""Live fidelity in the served pod: does the shadowed service measure the agreement the evaluate stage measured,
and what does shadowing cost?

    python benchmarks/live_fidelity.py        # after `make run`; needs wrk (apt-get install wrk)

(The tests point --register and --evaluation at a tiny registry's reports: MLFLOW_TRACKING_URI says which.)

- The registered serving version (metrics/register.json) is packaged as a pod gets it (`package`, the teacher's
  ONNX in shadow/, the reference in distilops.json) and served by `bentoml serve` with the CPU overlay's
  settings (1 worker, 2 ONNX Runtime threads; the shadow as shipped: taking turns with the model, on its threads).
- Agreement: every test text is sent once (16 per request) to a server shadowing at rate 1.0; once the shadow
  has scored them all, its counters (distilops_shadow_agreed_total / _compared_total) against the evaluate
  stage's agreement_with_teacher of the same variant, and against the same two model folders run offline
  (serving/inference.py) in batches of 1, 16, 32 and 64: ONNX Runtime's dynamic int8 computes each
  activation's scale over the whole batch, padding included, so a text's label can depend on its neighbours.
- Cost: wrk at 32 clients (and 1), one real test text per request, against shadow rate 0, 0.1 and 1.0 (three
  servers, one loaded at a time, arms interleaved in every repeat, medians); between runs the loaded server's
  shadow queue is drained, so no arm pays for another's backlog. Memory: resident set of each server's
  process tree after the runs.
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
from ort_spinning import measured_run, tree_sum  # noqa: E402
from serving import Server, bentoml_serve, free_port, sample, scrape  # noqa: E402
from serving_benchmark import run_wrk, wrk_script  # noqa: E402

from distilops.pipeline.evaluate import hardware  # noqa: E402
from distilops.release.package import package  # noqa: E402
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR  # noqa: E402
from distilops.serving.inference import TextClassifier  # noqa: E402

PER_REQUEST = 16  # texts per request in the agreement replay


def shadow_counts(server: Server) -> dict[str, float]:
    scraped = scrape(httpx.get(server.url + "/metrics", timeout=10).text)
    return {k: sample(scraped, f"distilops_shadow_{k}", f"distilops_shadow_{k}_total") or 0.0
            for k in ("compared", "agreed", "dropped")}


def drained(server: Server, timeout: float = 120) -> dict[str, float]:
    """Wait until the shadow's counters stop moving (its queue is empty); returns them."""
    last, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = shadow_counts(server)
        if now == last:
            return now
        last = now
        time.sleep(2)
    raise TimeoutError(f"the shadow of {server.url} did not drain in {timeout} s")


def rss_mb(pid: int) -> float:
    """Resident memory of a server's process tree, in MiB."""
    return tree_sum(pid, lambda process: process.memory_info().rss) / 2**20


def offline_agreement(bento_model: Path, texts: list[str], batch_sizes: tuple[int, ...] = (1, 16, 32, 64)) -> dict:
    """The served folder's agreement with the shadow folder, run offline in batches of each size."""
    served = TextClassifier(bento_model / MODEL_SUBDIR, device="cpu")
    teacher = TextClassifier(bento_model / SHADOW_SUBDIR, device="cpu").predict_logits_batched(texts, 64).argmax(-1)
    return {str(size): float((served.predict_logits_batched(texts, size).argmax(-1) == teacher).mean())
            for size in batch_sizes}


def replay_agreement(server: Server, texts: list[str], per_request: int = PER_REQUEST) -> dict:
    before = drained(server)
    for i in range(0, len(texts), per_request):
        reply = httpx.post(server.url + "/classify", json={"texts": texts[i: i + per_request]}, timeout=60)
        reply.raise_for_status()
    after = drained(server)
    compared, agreed = after["compared"] - before["compared"], after["agreed"] - before["agreed"]
    dropped = after["dropped"] - before["dropped"]
    return {"texts": len(texts), "compared": compared, "agreed": agreed, "dropped": dropped,
            "live_agreement": agreed / compared if compared else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared/test.parquet", help="the test split")
    parser.add_argument("--rates", default="0,0.1,1.0", help="shadow rates compared")
    parser.add_argument("--clients", default="1,32", help="concurrent clients")
    parser.add_argument("--seconds", type=int, default=10, help="duration of one timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--register", type=Path, default=Path("metrics/register.json"),
                        help="the register stage's report: the serving version, and what it was evaluated as")
    parser.add_argument("--evaluation", type=Path, default=Path("metrics/evaluate.json"),
                        help="the evaluate stage's report: the agreement the live one is compared with")
    parser.add_argument("--out", default="benchmarks/results/live_fidelity_cpu.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("live_fidelity: error: wrk not found (apt-get install wrk)")
    rates = [r.strip() for r in args.rates.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    register = json.loads(args.register.read_text())
    evaluation = json.loads(args.evaluation.read_text())
    version = str(register["serving_versions"]["cpu"])
    evaluated_as = next(v["evaluated_as"] for v in register["versions"].values() if str(v["version"]) == version)
    evaluated = evaluation["models"][evaluated_as]

    work = Path(tempfile.mkdtemp(prefix="distilops-live-"))
    texts = pd.read_parquet(args.data)["text"].tolist()
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
    packaged = package(register["model_name"], version=version)
    servers: dict[str, Server] = {}
    runs: dict[str, dict[int, list[dict]]] = {rate: {c: [] for c in clients} for rate in rates}
    try:
        for rate in rates:
            # A BentoML home per server: its Prometheus files live there, and a shared one mixes their metrics.
            home = work / f"home-{rate}"
            shutil.copytree(work / "bentoml" / "models", home / "models")
            servers[rate] = bentoml_serve(free_port(), {
                **env, "BENTOML_HOME": str(home), "DISTILOPS_BENTO_MODEL": packaged.tag, "DISTILOPS_WORKERS": "1",
                "DISTILOPS_THREADS": "2", "DISTILOPS_SHADOW_RATE": rate},
                work / f"rate{rate}.log")
        for server in servers.values():
            server.wait_ready()
        model_info = httpx.get(servers[rates[-1]].url + "/model", timeout=10).json()
        agreement = replay_agreement(servers[max(rates, key=float)], texts)
        offline = offline_agreement(Path(packaged.path), texts)
        print(f"live agreement {agreement['live_agreement']:.4f} ({agreement['agreed']:.0f}/"
              f"{agreement['compared']:.0f}, dropped {agreement['dropped']:.0f}) vs evaluated "
              f"{evaluated['agreement_with_teacher']:.4f}; offline by batch size {offline}", flush=True)
        script = wrk_script(texts[:500], work / "short.lua")
        for rate in rates:  # warm-up: first requests load kernels and train the batcher
            run_wrk(servers[rate].url, script, 3, 32)
            drained(servers[rate])
        for _ in range(args.repeats):
            for c in clients:
                for rate in rates:
                    before = shadow_counts(servers[rate])
                    result = measured_run(servers[rate], script, args.seconds, c)
                    after = drained(servers[rate])
                    result.update({k: after[k] - before[k] for k in after})
                    runs[rate][c].append(result)
                    print(f"rate {rate:>4s} {c:3d} clients {result['requests_per_second']:7.1f} req/s  p50 "
                          f"{result['latency_p50_ms']:6.1f} ms  p99 {result['latency_p99_ms']:6.1f} ms  cores "
                          f"{result['cores_busy']:.2f}  shadowed {result['compared']:.0f} dropped "
                          f"{result['dropped']:.0f}", flush=True)
        memory = {rate: rss_mb(servers[rate].process.pid) for rate in rates}
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    keys = ("requests_per_second", "latency_p50_ms", "latency_p99_ms", "cores_busy", "compared", "dropped")
    summary = {rate: {str(c): {k: statistics.median(r[k] for r in runs[rate][c]) for k in keys} for c in clients}
               for rate in rates}
    off = summary[rates[0]]
    ratios = {f"rate {rate}": {f"{c} clients": {
        "throughput vs off": summary[rate][str(c)]["requests_per_second"] / off[str(c)]["requests_per_second"],
        "p50 vs off": summary[rate][str(c)]["latency_p50_ms"] / off[str(c)]["latency_p50_ms"],
        "p99 vs off": summary[rate][str(c)]["latency_p99_ms"] / off[str(c)]["latency_p99_ms"]}
        for c in clients} for rate in rates[1:]}
    difference = 100 * (agreement["live_agreement"] - evaluated["agreement_with_teacher"])
    result = {
        "protocol": {"server": "bentoml serve, 1 worker, 2 ONNX Runtime threads; shadow as shipped (turns, "
                               "the model's threads)",
                     "model": f"{packaged.tag} (registry v{version}, {evaluated_as}), shadow: the release's teacher",
                     "texts_per_request": 1, "seconds_per_run": args.seconds, "repeats": args.repeats,
                     "load_generator": "wrk -t1", "order": "arms interleaved within each repeat, shadow queue "
                     "drained between runs; medians"},
        "hardware": hardware(os.cpu_count() or 0),
        "shadow": model_info.get("shadow"),
        "agreement": {**agreement, "evaluated": evaluated["agreement_with_teacher"],
                      "evaluated_ci": evaluated.get("agreement_with_teacher_ci"),
                      "difference_points": difference, "within_half_a_point": abs(difference) <= 0.5,
                      "offline_by_batch_size": offline, "replay_texts_per_request": PER_REQUEST,
                      "difference_vs_offline_same_batches_points":
                          100 * (agreement["live_agreement"] - offline[str(PER_REQUEST)])},
        "summary": summary,
        "ratios": ratios,
        "memory_rss_mb": memory,
        "runs": {rate: {str(c): r for c, r in by.items()} for rate, by in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("agreement", "summary", "ratios", "memory_rss_mb")}, indent=2))


if __name__ == "__main__":
    main()
