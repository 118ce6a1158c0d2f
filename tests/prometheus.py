"""A real Prometheus (Debian's `prometheus`, which `make test` installs as root) scraping services on 127.0.0.1,
and Argo Rollouts' judgement of an AnalysisTemplate's metrics against it, for tests and benchmarks.

Each target gets the labels a cluster's Prometheus would give it (namespace, pod, and the Argo Rollouts pod
label the PodMonitor copies: rollouts_pod_template_hash), so the AnalysisTemplate's queries run unchanged.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from serving import Server, free_port


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        raise RuntimeError("prometheus not found: `apt-get install prometheus` (`make test` installs it as root)")
    return found


class Prometheus(Server):
    """Scrapes each target's /metrics every `interval`; `targets` maps host:port to the labels it gets."""

    def __init__(self, targets: dict[str, dict[str, str]], *, interval: str = "1s") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="distilops-prometheus-"))
        config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                  "scrape_configs": [{"job_name": "distilops-classifier", "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [address], "labels": labels}
                                                         for address, labels in targets.items()]}]}
        (self.root / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        super().__init__([prometheus_binary(), f"--config.file={self.root / 'prometheus.yml'}",
                          f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                         env={}, port=port, log=self.root / "prometheus.log", cwd=self.root, ready_path="/-/ready")

    def query(self, expr: str) -> list[float]:
        """An instant query's values (what Argo Rollouts' prometheus provider hands its conditions as `result`)."""
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if reply.get("status") != "success":
            raise RuntimeError(f"query failed: {reply.get('error')}\n{expr}")
        data = reply["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(sample["value"][1]) for sample in data["result"]]

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


CONDITION = re.compile(r"^\s*result\[0\]\s*(<=|>=|<|>|==)\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")
COMPARE = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__, "==": float.__eq__}


def condition_holds(condition: str, result: list[float]) -> bool:
    """An Argo Rollouts condition of the one form distilops' AnalysisTemplate uses: `result[0] <op> number`."""
    match = CONDITION.match(condition)
    if not match:
        raise ValueError(f"condition {condition!r} is not of the form `result[0] <op> number`")
    if not result:
        raise ValueError("the query returned no value (Argo counts this measurement as an error)")
    return COMPARE[match[1]](float(result[0]), float(match[2]))


@dataclass
class Measurement:
    metric: str
    value: float | None
    phase: str  # Successful | Failed | Inconclusive | Error (Argo's measurement phases)
    detail: str = ""


def substitute(query: str, args: dict[str, str]) -> str:
    """`{{args.name}}` -> the value, as Argo Rollouts does before sending the query."""
    def value(match: re.Match) -> str:
        if match[1] not in args:
            raise KeyError(f"the query uses {{{{args.{match[1]}}}}}, which no argument gives")
        return args[match[1]]

    return re.sub(r"\{\{\s*args\.([A-Za-z0-9_-]+)\s*\}\}", value, query)


def template_args(template: dict, given: dict[str, str]) -> dict[str, str]:
    """The AnalysisTemplate's arguments: its defaults, overridden by `given` (what the Rollout passes)."""
    args = {a["name"]: a["value"] for a in template["spec"].get("args", []) if "value" in a}
    return {**args, **given}


def judge(metric: dict, result: list[float]) -> str:
    """Argo Rollouts' EvaluateResult (utils/evaluate/evaluate.go, v1.9.1): with only a success condition, not
    holding fails; with only a failure condition, not holding succeeds; with both, neither holding is
    Inconclusive; a failure condition that holds always fails."""
    success, failure = metric.get("successCondition"), metric.get("failureCondition")
    if not success and not failure:
        return "Successful"
    succeeded = condition_holds(success, result) if success else False
    failed = condition_holds(failure, result) if failure else False
    if success and not failure:
        failed = not succeeded
    if failure and not success:
        succeeded = not failed
    return "Failed" if failed else "Successful" if succeeded else "Inconclusive"


def measure(prometheus: Prometheus, template: dict, args: dict[str, str]) -> list[Measurement]:
    """One measurement of every metric of the AnalysisTemplate, with Argo's arguments substituted and its
    judgement; a query that returns nothing or fails is an Error, as in Argo."""
    found = []
    args = template_args(template, args)
    for metric in template["spec"]["metrics"]:
        query = substitute(metric["provider"]["prometheus"]["query"], args)
        try:
            result = prometheus.query(query)
            found.append(Measurement(metric["name"], result[0] if result else None, judge(metric, result)))
        except (ValueError, RuntimeError) as exc:
            found.append(Measurement(metric["name"], None, "Error", str(exc)))
    return found
