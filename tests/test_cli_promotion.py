"""The promotion commands as a user runs them: real `distilops` processes against a SQLite registry.
Dry runs move nothing, refusals exit 1 with one line and no traceback, --force needs --reason,
--rollback twice goes back and forth, the latency gate refuses, `versions` and `history --json`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import distinct, make_tiny_model

from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.release.registry import register_version
from distilops.stats import pack_correct
from distilops.tracking import stage_run

pytestmark = pytest.mark.slow
NAME = "tiny-sentiment"
DISTILOPS = str(Path(sys.executable).parent / "distilops")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 good, v2 better, v3 too slow, v4 worse (significantly), all on the same 400 test texts."""
    root = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "DISTILOPS_USER": "bob"}
    with pytest.MonkeyPatch.context() as patch:  # the caller's MLFLOW_TRACKING_URI comes back on the way out
        patch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        raw = make_tiny_model(root / "raw")
        folder = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "student",
                                   max_length=16, teacher="tiny-teacher")
        base = np.arange(400) % 10 != 0  # 90% right
        better, worse = base.copy(), base.copy()
        better[np.flatnonzero(~base)[:8]] = True
        worse[np.flatnonzero(base)[:20]] = False
        for correct, latency in ((base, 5.0), (better, 5.0), (better, 60.0), (worse, 5.0)):
            accuracy = float(correct.mean())
            with stage_run("register"):
                register_version(distinct(folder), model_name=NAME, variant="onnx_int8", role="serving", device="cpu",
                                 test_correct=pack_correct(correct), test_examples=400, tags={"data_hash": "d1"},
                                 metrics={"accuracy": accuracy, "teacher_accuracy": 0.9, "latency_p95_ms": latency,
                             "accuracy_low": accuracy - 0.03, "accuracy_high": accuracy + 0.03,
                             "accuracy_retention_low": accuracy / 0.9 - 0.03,
                             "accuracy_retention_high": accuracy / 0.9 + 0.03})
    params = root / "params.yaml"
    params.write_text(f"model_name: {NAME}\npromote:\n  alias: production\n  max_latency_p95_ms: 25.0\n")
    return root, env, params


def distilops(registry, *args):
    root, env, params = registry
    return subprocess.run([DISTILOPS, *args, "--params", str(params)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120)


def production(registry) -> str | None:
    out = distilops(registry, "versions").stdout
    return next((line.split()[0].lstrip("v") for line in out.splitlines() if "production" in line), None)


def test_promotion_commands_end_to_end(registry):
    dry = distilops(registry, "promote", "1", "--dry-run")
    assert dry.returncode == 0 and "would move tiny-sentiment@production from (none) to v1" in dry.stdout
    assert "[pass] accuracy_retention" in dry.stdout and production(registry) is None  # nothing moved

    assert distilops(registry, "promote", "1").returncode == 0 and production(registry) == "1"

    forced = distilops(registry, "promote", "4", "--force")  # no reason: refused before anything happens
    assert forced.returncode == 1 and "--force needs --reason" in forced.stderr and production(registry) == "1"

    slow = distilops(registry, "promote", "3")
    assert slow.returncode == 1 and "Traceback" not in slow.stderr
    assert "latency: batch-1 p95 latency 60.00 ms (bound 25.0 ms)" in slow.stderr and production(registry) == "1"

    worse = distilops(registry, "promote", "4")  # 5 points worse on the same texts: significant
    assert worse.returncode == 1 and "Traceback" not in worse.stderr
    assert "no_regression: accuracy 0.8500 [0.820, 0.880] vs production v1 0.9000 [0.870, 0.930]" in worse.stderr
    assert "significant at 0.05" in worse.stderr and production(registry) == "1"

    assert distilops(registry, "promote", "2").returncode == 0 and production(registry) == "2"
    back = distilops(registry, "promote", "--rollback", "-r", "checking v1 again")
    assert back.returncode == 0 and production(registry) == "1"
    forth = distilops(registry, "promote", "--rollback")  # the version before v1 was v2: forth again
    assert forth.returncode == 0 and production(registry) == "2"

    listed = distilops(registry, "versions").stdout
    assert "v2" in listed and "acc 0.920 [0.890, 0.950]" in listed and "aliases: production" in listed
    events = json.loads(distilops(registry, "history", "--json").stdout)
    assert [(e["action"], e["from_version"], e["to_version"]) for e in events] == [
        ("rollback", "1", "2"), ("rollback", "2", "1"), ("promote", "1", "2"), ("promote", "", "1")]
    assert events[2]["reason"] == "all gates passed" and events[1]["reason"] == "checking v1 again"
    assert all(e["user"] == "bob" for e in events)
