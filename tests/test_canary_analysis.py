"""The canary's AnalysisTemplate judged for real: its exact queries, read from the rendered k8s/overlays/cpu-canary,
run against a real Prometheus scraping three real `bentoml serve` processes on 127.0.0.1 that shadow every
text with the teacher: the stable version, a good canary and a canary that disagrees with the teacher on
purpose, each labelled as the PodMonitor labels a Rollout's pods. The bad canary must fail the analysis (on
agreement with the teacher and on label mix) and the good one pass every metric, while a bounded load sends
most texts to stable and a tenth to each canary, as a 10% canary step does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus import Prometheus, measure
from serving import bentoml_serve, free_port
from tiny import make_reviews, make_tiny_model

from distilops.pipeline.modeling import load_classifier, load_tokenizer, save_model_folder
from distilops.pipeline.quantize import build
from distilops.release.deploy import render_overlay
from distilops.serving import fidelity
from distilops.serving.folder import MODEL_SUBDIR, SHADOW_SUBDIR, write_meta
from distilops.serving.inference import TextClassifier

pytestmark = pytest.mark.slow
NAMESPACE = "distilops"
HASHES = {"stable": "6d5f7c9b8", "good": "7f8e9a1b2", "bad": "5c4b3a2d1"}  # rollouts-pod-template-hash values


def with_labels_reversed(folder: Path, into: Path) -> Path:
    """The same weights with the label names reversed: a model that disagrees with its teacher on every text."""
    copy = Path(shutil.copytree(folder, into))
    config = json.loads((copy / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    config["id2label"] = {str(i): name for i, name in enumerate(reversed(names))}
    config["label2id"] = {name: i for i, name in enumerate(reversed(names))}
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def with_reference(folder: Path, teacher: Path, texts: list[str]) -> None:
    """Record what evaluation would: the folder's predictions on `texts` and its agreement with the teacher."""
    model, shadow = TextClassifier(folder, device="cpu"), TextClassifier(teacher, device="cpu")
    answers, teacher_answers = model.classify(texts), shadow.classify(texts)
    agreed = np.mean([a.label == b.label for a, b in zip(answers, teacher_answers, strict=True)])
    write_meta(folder, reference=fidelity.reference(
        predicted=[a.label for a in answers], confidence=[a.score for a in answers],
        words=[fidelity.word_count(t) for t in texts], windows=[a.windows for a in answers], labels=model.labels,
        agreement=float(agreed), agreement_ci=(float(agreed), float(agreed)), split="fixture"))


BENTO_MODEL = """
import shutil, sys
from pathlib import Path
import bentoml
folder, teacher, tag, version, model_subdir, shadow_subdir = sys.argv[1:]
with bentoml.models.create(tag, labels={"registry_name": "tiny-sentiment", "registry_version": version},
                           metadata={}) as stored:
    shutil.copytree(folder, Path(stored.path) / model_subdir)
    shutil.copytree(teacher, Path(stored.path) / shadow_subdir)
"""


def bento_model(folder: Path, teacher: Path, tag: str, version: str, home: Path) -> str:
    """A Bento model as `distilops package` makes one (the served folder in model/, the teacher in shadow/), in
    the store at `home`. In a process of its own: BentoML reads BENTOML_HOME once per process, and the other
    tests' stores must not be this one."""
    subprocess.run([sys.executable, "-c", BENTO_MODEL, str(folder), str(teacher), tag, version, MODEL_SUBDIR,
                    SHADOW_SUBDIR], check=True,
                   env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}, timeout=120)
    return tag


def own_home(store: Path, into: Path) -> Path:
    """A BentoML home of its own holding a copy of `store`'s models."""
    shutil.copytree(store / "models", into / "models")
    return into


class Load:
    """A bounded load: `per_second` requests of a few texts, a tenth to each canary, the rest to stable."""

    def __init__(self, urls: dict[str, str], texts: list[str], per_second: float = 30) -> None:
        self.urls, self.texts, self.pause = urls, texts, 1 / per_second
        self.sent = dict.fromkeys(urls, 0)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                draw = rng.random()
                target = "good" if draw < 0.1 else "bad" if draw < 0.2 else "stable"
                texts = [str(t) for t in rng.choice(self.texts, size=8)]
                client.post(self.urls[target] + "/classify", json={"texts": texts}).raise_for_status()
                self.sent[target] += 1
                time.sleep(self.pause)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def analysis_template() -> dict:
    documents = render_overlay("cpu-canary")
    return next(d for d in documents if d["kind"] == "AnalysisTemplate")


@pytest.fixture(scope="module")
def canary_pods(tmp_path_factory):
    root = tmp_path_factory.mktemp("canary")
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true",
           "DISTILOPS_SHADOW_RATE": "1.0", "DISTILOPS_DRIFT_WINDOW": "200", "DISTILOPS_MAX_LATENCY_MS": "2000"}
    texts = make_reviews(n_movies=30, seed=3)["text"].tolist()
    raw = make_tiny_model(root / "raw", layers=2, seed=1)
    pytorch = save_model_folder(load_classifier(str(raw)), load_tokenizer(str(raw)), root / "teacher-pt",
                                max_length=16, teacher="tiny")
    teacher = build("onnx_fp32", pytorch, root / "teacher")
    good = Path(shutil.copytree(teacher, root / "good"))
    bad = with_labels_reversed(teacher, root / "bad")
    for folder in (good, bad):
        with_reference(folder, teacher, texts)
    store = root / "bentoml"
    tags = {"stable": bento_model(good, teacher, "tiny-sentiment:v1", "1", store),
            "good": bento_model(good, teacher, "tiny-sentiment:v2", "2", store),
            "bad": bento_model(bad, teacher, "tiny-sentiment:v3", "3", store)}
    # One BENTOML_HOME per server: BentoML keeps its Prometheus files in $BENTOML_HOME/prometheus_multiproc_dir,
    # so servers sharing a home would each report all of their metrics (pods never share one).
    servers = {name: bentoml_serve(free_port(), {**env, "DISTILOPS_BENTO_MODEL": tag,
                                                 "BENTOML_HOME": str(own_home(root / "bentoml", root / name))},
                                   root / f"{name}.log")
               for name, tag in tags.items()}
    prometheus = None
    try:
        for server in servers.values():
            server.wait_ready()
        prometheus = Prometheus({server.url.removeprefix("http://"): {
            "namespace": NAMESPACE, "pod": f"distilops-classifier-{HASHES[name]}-x", "rollouts_pod_template_hash":
            HASHES[name]} for name, server in servers.items()})
        prometheus.wait_ready(30)
        yield prometheus, servers, texts
    finally:
        if prometheus is not None:
            prometheus.stop()
        for server in servers.values():
            server.stop()


def test_the_analysis_aborts_a_canary_that_disagrees_with_its_teacher_and_passes_a_good_one(
        analysis_template, canary_pods):
    """Measured every 3 s here (every minute in a cluster): the bad canary is aborted as Argo aborts, once a
    metric has failed more than its failureLimit times in a row; the good one passes every metric."""
    prometheus, servers, texts = canary_pods
    args = {"namespace": NAMESPACE, "stable-hash": HASHES["stable"], "prometheus-address": prometheus.url}
    limits = {m["name"]: m.get("failureLimit", 0) for m in analysis_template["spec"]["metrics"]}
    failures_in_a_row = dict.fromkeys(limits, 0)
    verdicts: dict[str, list] = {"good": [], "bad": []}
    first_failure = aborted_at = None
    start = time.monotonic()
    with Load({name: s.url for name, s in servers.items()}, texts) as load:
        while time.monotonic() - start < 150 and not (aborted_at and all(
                m.phase == "Successful" for m in verdicts["good"])):
            time.sleep(3)
            for name in verdicts:
                verdicts[name] = measure(prometheus, analysis_template, {**args, "canary-hash": HASHES[name]})
            for m in verdicts["bad"]:
                failures_in_a_row[m.metric] = failures_in_a_row[m.metric] + 1 if m.phase == "Failed" else 0
            if first_failure is None and any(failures_in_a_row.values()):
                first_failure = time.monotonic() - start
            if aborted_at is None and any(failures_in_a_row[k] > limits[k] for k in limits):
                aborted_at, sent_then = time.monotonic() - start, dict(load.sent)
    bad = {m.metric: m for m in verdicts["bad"]}
    good = {m.metric: m for m in verdicts["good"]}
    assert aborted_at is not None, f"the bad canary was never aborted: {verdicts['bad']}"
    failed = {name for name, m in bad.items() if m.phase == "Failed"}
    assert {"agreement-vs-stable", "label-mix-shift"} <= failed, bad
    assert all(m.phase == "Successful" for m in good.values()), good
    print(f"bad canary: first failed measurement {first_failure:.0f} s after the load started, aborted at "
          f"{aborted_at:.0f} s having answered {sent_then['bad']} requests (stable {sent_then['stable']}); "
          f"failed metrics: {sorted(failed)}")
