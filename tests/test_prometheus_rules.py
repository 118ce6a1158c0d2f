"""PromQL run for real by promtool (Debian's prometheus package): the PrometheusRule's groups checked and unit
tested (tests/prometheus/*_test.yaml: input series -> alerts firing or not, recorded values), and the canary
AnalysisTemplate's queries evaluated on made-up canary and stable series, each read through its success and
failure conditions as Argo reads them (one comparison each of the query's first value; neither holding, as for
NaN, is Inconclusive). A fast check of the PromQL alone: test_canary_release.py runs the same template in
Argo's controller against real scraped series.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_k8s import one, render

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted((ROOT / "tests" / "prometheus").glob("*_test.yaml"))


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool not found: Debian's prometheus package (`make test-tools` installs it as root)"
    return subprocess.run([tool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    """The PrometheusRule's groups as a plain rules file (what prometheus-operator hands Prometheus), beside
    copies of the unit tests (promtool reads rule_files relative to the test file)."""
    folder = tmp_path_factory.mktemp("rules")
    rule = one(render("monitoring"), "PrometheusRule")
    (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    for test in TESTS:
        shutil.copy(test, folder / test.name)
    return folder


def test_the_rules_are_valid_promql(rules_dir):
    result = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("test", [t.name for t in TESTS])
def test_the_rules_unit_tests_pass(rules_dir, test):
    """Good version: no alert; agreement below its evaluated low end: fires after `for`; too few samples: none;
    drift and shadow drops fire; the recorded values (tests/prometheus/fidelity_test.yaml)."""
    result = promtool("test", "rules", test, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the canary analysis ----------------------------------------------------------------------------------

ARGS = {"namespace": "distilops", "canary-hash": "c1", "stable-hash": "s1"}
CONDITION = re.compile(r"^result\[0\] (<=|>=|<|>) (-?\d+(?:\.\d+)?)$")


def verdict_promql(query: str, success: str, failure: str) -> str:
    """The query read through both conditions, in PromQL: 1 where Argo records Successful, -1 Failed, 0
    Inconclusive (neither holds: NaN compares false with everything)."""
    def holds(condition: str) -> str:
        match = CONDITION.match(condition)
        assert match, f"not the simple form `result[0] OP NUMBER`: {condition}"
        return f"(({query}) {match.group(1)} bool {match.group(2)})"

    return f"{holds(success)} - {holds(failure)}"


def analysis_rules() -> dict[str, str]:
    """Each AnalysisTemplate metric as `canary:<metric>:verdict`, with the args filled in."""
    template = one(render("overlays/cpu-canary"), "AnalysisTemplate")
    rules = {}
    for metric in template["spec"]["metrics"]:
        query = metric["provider"]["prometheus"]["query"]
        for name, value in ARGS.items():
            query = query.replace(f"{{{{args.{name}}}}}", value)
        assert "{{" not in query
        rules[f"canary:{metric['name'].replace('-', '_')}:verdict"] = verdict_promql(
            query, metric["successCondition"], metric["failureCondition"])
    return rules


def revision(hash_: str, *, ok: int = 0, errors: int = 0, fast: int = 0, slow: int = 0, compared: int = 0,
             agreed: int | None = None, low: float | None = None, labels: dict[str, int] | None = None,
             up: int | None = 1) -> list[dict]:
    """One revision's series, one pod, counters growing by the given amount a minute for 20 minutes; `up` its
    target's scrape health (None: no target discovered)."""
    def counter(name: str, per_minute: int, **extra: str) -> dict:
        selector = ",".join(f'{k}="{v}"' for k, v in {"namespace": "distilops", "pod": f"pod-{hash_}",
                                                     "rollouts_pod_template_hash": hash_, **extra}.items())
        return {"series": f"{name}{{{selector}}}", "values": f"0+{per_minute}x20"}

    request = {"endpoint": "/classify"}
    series = []
    if up is not None:
        target = counter("up", 0)
        series.append({"series": target["series"], "values": f"{up}x20"})
    if ok:  # BentoML's counter (the latency metric's request count)
        series.append(counter("bentoml_service_request_total", ok, http_response_code="200", **request))
    if errors:
        series.append(counter("bentoml_service_request_total", errors, http_response_code="500", **request))
    if ok or errors:  # the service's own (the error ratio): every class from 0, one with no answers stays at 0
        for code, per_minute in (("2xx", ok), ("4xx", 0), ("5xx", errors)):
            series.append(counter("distilops_classify_responses_total", per_minute, code=code))
    if fast or slow:  # fast: within 0.1 s; slow: between 0.1 and 1 s
        bucket = "bentoml_service_request_duration_seconds_bucket"
        series += [counter(bucket, fast, le="0.1", **request), counter(bucket, fast + slow, le="1", **request),
                   counter(bucket, fast + slow, le="+Inf", **request)]
    if compared:
        series.append(counter("distilops_shadow_compared_total", compared, model_version="7"))
    if agreed is not None:
        series.append(counter("distilops_shadow_agreed_total", agreed, model_version="7"))
    if low is not None:
        gauge = counter("distilops_reference_agreement", 0, model_version="7", bound="low")
        series.append({"series": gauge["series"], "values": f"{low}x20"})
    for label, per_minute in (labels or {}).items():
        series.append(counter("distilops_predictions_total", per_minute, model_version="7", label=label))
    return series


STABLE = revision("s1", ok=99, errors=1, fast=100, compared=100, agreed=92, low=0.88,
                  labels={"fresh": 60, "rotten": 40})
METRICS = ("scraped", "error_ratio", "latency_p95_ratio", "agreement_vs_stable", "agreement_vs_evaluated",
           "label_mix_shift")
PASS, FAIL, NO_VERDICT = 1, -1, 0
SCENARIOS = {
    # no canary pod discovered: `scraped` fails; no series at all, the others have no verdict (never a pass)
    "nothing scraped": (STABLE, {"scraped": FAIL, **dict.fromkeys(METRICS[1:], NO_VERDICT)}),
    # discovered, every scrape failing (up 0): fails, whatever else
    "scrapes fail": (STABLE + revision("c1", up=0), {"scraped": FAIL, "error_ratio": NO_VERDICT}),
    # a canary like its stable
    "good canary": (STABLE + revision("c1", ok=100, fast=95, slow=5, compared=100, agreed=91, low=0.88,
                                      labels={"fresh": 58, "rotten": 42}), dict.fromkeys(METRICS, PASS)),
    # 20% errors, p95 near 1 s, agreement 0.70, only ever "fresh": every metric fails
    "bad canary": (STABLE + revision("c1", ok=80, errors=20, fast=10, slow=90, compared=100, agreed=70, low=0.88,
                                     labels={"fresh": 100}), {"scraped": PASS, **dict.fromkeys(METRICS[1:], FAIL)}),
    # as bad, on a handful of requests and texts: no verdict from so little
    "too few samples": (STABLE + revision("c1", errors=1, slow=1, compared=2, agreed=0, low=0.88, labels={"fresh": 3}),
                        {"scraped": PASS, **dict.fromkeys(METRICS[1:], NO_VERDICT)}),
    # general-English traffic: stable and a good canary both agree 0.89, below the 0.925 the test split showed;
    # the gate (against the stable) passes, the evaluated bound fails, which is why it is only a dry run
    "good canary on general English": (
        revision("s1", ok=100, fast=100, compared=100, agreed=89, low=0.925, labels={"fresh": 60, "rotten": 40})
        + revision("c1", ok=100, fast=100, compared=100, agreed=89, low=0.925, labels={"fresh": 59, "rotten": 41}),
        {"agreement_vs_stable": PASS, "label_mix_shift": PASS, "agreement_vs_evaluated": FAIL}),
    # compared plenty, and no agreed series at all (it never agreed): that is 0 agreement, not no data
    "never agrees": (STABLE + revision("c1", compared=100, low=0.88),
                     {"agreement_vs_stable": FAIL, "agreement_vs_evaluated": FAIL, "error_ratio": NO_VERDICT}),
}


def test_the_canary_analysis_judges_canaries_as_intended(tmp_path):
    rules = analysis_rules()
    (tmp_path / "analysis.yaml").write_text(yaml.safe_dump({"groups": [
        {"name": "canary", "rules": [{"record": name, "expr": expr} for name, expr in rules.items()]}]}))
    checked = promtool("check", "rules", "analysis.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = []
    for scenario, (series, verdicts) in SCENARIOS.items():
        tests.append({"name": scenario, "interval": "1m", "input_series": series, "promql_expr_test": [
            {"expr": f"canary:{metric}:verdict", "eval_time": "15m",
             "exp_samples": [{"labels": f"canary:{metric}:verdict", "value": verdict}]}
            for metric, verdict in verdicts.items()]})
    (tmp_path / "analysis_test.yaml").write_text(yaml.safe_dump({"rule_files": ["analysis.yaml"],
                                                                 "evaluation_interval": "1m", "tests": tests}))
    result = promtool("test", "rules", "analysis_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
