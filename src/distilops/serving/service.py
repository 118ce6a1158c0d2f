"""The BentoML service: serves the model that `distilops package` put into the BentoML store.

    POST /classify  {"texts": ["...", ...]} -> [{"label", "score", "windows", "truncated"}, ...]
    GET  /model     registry name and version served, lineage, metrics, limits
    GET  /livez, /readyz (ready once the model is loaded), /metrics (Prometheus)

Requests reach the model by continuous dispatch (serving/dispatch.py's CallThreads): a request is cut into
chunks of at most DISTILOPS_TEXTS_PER_CALL texts of like length, and each of the worker's call threads takes what
waits the moment its last call ends, so a lone request goes at once and under load no thread idles while the event
loop answers. DISTILOPS_DISPATCH=adaptive uses BentoML's adaptive batching instead (the GPU overlay's): one batch
at a time, cut into calls of like length, and a lone request not held for a wait learned under load. Each
request shed (503, over the latency budget DISTILOPS_MAX_LATENCY_MS) logs one line, not a traceback, and counts in
distilops_shed_requests_total. Every response carries the headers X-Model-Name and X-Model-Version. Limits and
batching come from the environment (a ConfigMap in Kubernetes); every bad request gets a 4xx naming the problem,
and the server stays up. A text longer than the model's window is read in overlapping windows, at most
DISTILOPS_MAX_WINDOWS of them (default: the model's own setting), so one text costs at most that many short texts'
worth of compute.

The model is ONNX, run by ONNX Runtime: no torch, no transformers (the images carry neither).
Every setting is declared, typed, in serving/settings.py (docs/settings.md); a bad value stops the service
at start with one line. With DISTILOPS_REQUIRE_GPU=1 (the GPU overlay) a session without the CUDA provider
never becomes ready: the pod is not served on its CPU by mistake, and the log says why. At run time, model calls
that keep failing (DISTILOPS_UNREADY_AFTER_FAILURES in a row, e.g. a sticky CUDA error) make the pod
unready; each readiness probe then tries one call of its own, and a pod still failing after
DISTILOPS_DEAD_AFTER_SECONDS is no longer alive, so the kubelet restarts it. A 503 (load shed, or not
ready) carries Retry-After. With DISTILOPS_API_TOKEN set (the distilops-serving Secret), /classify needs
that bearer token; probes, /metrics and /model stay open.

Live fidelity. Every answered text feeds Prometheus metrics (each labelled with the served registry version):
predictions per label, the confidence, words and windows histograms (bucketed like serving/fidelity.py's bins),
and, when the model folder's distilops.json carries the evaluation's "reference", the PSI of the last
DISTILOPS_DRIFT_WINDOW texts against it per feature (distilops_drift_psi) and the evaluated agreement with the
teacher (distilops_reference_agreement). With DISTILOPS_SHADOW_RATE > 0 and a shadow (teacher) model folder in the
Bento model (shadow/ beside model/), that fraction of texts is also scored by the shadow on a thread of its own:
the request path only samples and puts texts on a bounded queue (DISTILOPS_SHADOW_QUEUE; when full, the text is
dropped and counted), and the thread counts texts compared and agreed and exports the agreement over the last
DISTILOPS_DRIFT_WINDOW compared (distilops_live_agreement). The shadow's calls take turns with the model's
(DISTILOPS_SHADOW_SERIAL, serving/live.py's Turns): the pod's CPU limit is the model's threads, and a shadow
running alongside them would overrun the CFS quota and stall the model; a model call waits at most one shadow
call of DISTILOPS_SHADOW_BATCH texts. /model says whether shadowing
is on, with which model, or why not.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.exceptions import ServiceUnavailable
from bentoml.validators import ContentType
from fastapi import FastAPI
from pydantic import AfterValidator, Field
from starlette.responses import JSONResponse

from distilops.errors import SettingError
from distilops.serving import settings
from distilops.serving.dispatch import CallThreads, ShedRequests, in_text_order, length_groups, wait_only_under_load
from distilops.serving.fidelity import word_count
from distilops.serving.folder import MODEL_SUBDIR, read_meta
from distilops.serving.inference import Classification, TextClassifier
from distilops.serving.live import Metrics, Throttled, Turns, open_drift, open_shadow, reference_summary

try:  # every setting from the environment (serving/settings.py); a bad one stops the service with one line
    SETTINGS = settings.read()
except SettingError as exc:
    raise SystemExit(f"distilops service: {exc}") from None
MODEL_TAG = SETTINGS.bento_model
MAX_TEXTS = SETTINGS.max_texts  # texts in one request
MAX_TEXT_CHARS = SETTINGS.max_text_chars  # characters in one text
MAX_BATCH_SIZE = SETTINGS.max_batch_size  # texts in one batch
TEXTS_PER_CALL = SETTINGS.texts_per_call  # texts in one model call at most
PARALLEL_CALLS = SETTINGS.parallel_calls  # model calls at once (0: the worker's threads)
DISPATCH = SETTINGS.dispatch  # continuous (our call threads) or adaptive (BentoML's batching)
MAX_LATENCY_MS = SETTINGS.max_latency_ms  # queueing + inference budget
WORKERS = SETTINGS.workers  # model copies per pod; batching gathers within each
THREADS = SETTINGS.threads  # CPU threads per worker (0 = the CPU limit / workers)
SPIN_WAIT = SETTINGS.ort_spin_wait  # idle threads busy-wait: inflates CPU use
REQUIRE_GPU = SETTINGS.require_gpu
MAX_WINDOWS = SETTINGS.max_windows
# Runtime health: after this many model calls in a row fail (a sticky CUDA error, say), the pod is not ready; once
# it has been failing this long with no call succeeding since, it is not alive either, and the kubelet restarts it.
UNREADY_AFTER_FAILURES = SETTINGS.unready_after_failures
DEAD_AFTER_SECONDS = SETTINGS.dead_after_seconds
# Optional bearer token for /classify (the distilops-serving Secret); probes, /metrics and /model stay open.
API_TOKEN = SETTINGS.api_token
# Live fidelity (module docstring): the share of texts the shadow model scores too, how many may wait for it, its
# ONNX Runtime threads (0: the model's), whether it takes turns with the model (serving/live.py's Turns) and texts
# per call, and how many recent texts the drift and live-agreement gauges cover.
SHADOW_RATE, SHADOW_QUEUE = SETTINGS.shadow_rate, SETTINGS.shadow_queue
SHADOW_THREADS, DRIFT_WINDOW = SETTINGS.shadow_threads, SETTINGS.drift_window
SHADOW_SERIAL, SHADOW_BATCH = SETTINGS.shadow_serial, SETTINGS.shadow_batch
RETRY_AFTER_SECONDS = "1"  # told to clients of a 503 (overloaded, or not ready): the batching budget is ~1 s
log = logging.getLogger("distilops.service")
ADAPTIVE_WAIT = SETTINGS.adaptive_wait  # BentoML's learned wait before a batch


def cpu_limit() -> int:
    """The CPUs this container may use: the pod's limit (downward API), else the cgroup quota, else all cores.

    Thread pools that size themselves from the node's cores oversubscribe a pod limited to a few of them.
    """
    if SETTINGS.cpu_limit:
        return SETTINGS.cpu_limit
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0))


def prom_counter(name: str, doc: str) -> Any:
    """A counter of this worker, created in the worker (serving/live.py's Metrics says why), exported by BentoML."""
    import prometheus_client as prom

    return prom.Counter(name, doc, registry=None)


CODE_CLASSES = ("2xx", "4xx", "5xx")


def prom_histogram(name: str, doc: str, buckets: Sequence[float]) -> Any:
    """A histogram of this worker, made like prom_counter."""
    import prometheus_client as prom

    return prom.Histogram(name, doc, buckets=buckets, registry=None)


def responses_counter() -> Any:
    """/classify's answers per status class, every class at 0 from the worker's start. BentoML's own request
    counter makes a series per status code at its first use, so rate() never sees that first increment: a
    canary's first errors (or all of them, if few) would not count against it."""
    import prometheus_client as prom

    counter = prom.Counter("distilops_classify_responses", "Answers of /classify per status class (2xx, 4xx, "
                           "5xx), each counted from 0", ["code"], registry=None)
    for code in CODE_CLASSES:
        counter.labels(code)
    return counter


def threads_per_worker() -> int:
    return THREADS or max(1, cpu_limit() // WORKERS)


class Health:
    """Consecutive failed model calls, and since when: readiness and liveness follow them."""

    def __init__(self, unready_after: int, dead_after_s: float) -> None:
        self.unready_after, self.dead_after_s = unready_after, dead_after_s
        self.failures, self.failing_since = 0, 0.0

    def succeeded(self) -> None:
        self.failures, self.failing_since = 0, 0.0

    def failed(self) -> None:
        if self.failures == 0:
            self.failing_since = time.monotonic()
        self.failures += 1

    @property
    def failing(self) -> bool:
        return self.failures >= self.unready_after

    @property
    def dead(self) -> bool:
        return self.failing and time.monotonic() - self.failing_since >= self.dead_after_s


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    return text


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]


SERVED: dict[str, Any] = {}  # what this process serves, for /model and the response headers
app = FastAPI(title="distilops model info")


class ResponseHeaders:
    """ASGI middleware, on every response, errors included: X-Model-Name / X-Model-Version, and on a 503 (load
    shed within BentoML's budget, or a pod not ready) Retry-After, so well-behaved clients back off. Counts
    /classify's answers per status class (`responses`, made when the worker starts)."""

    responses: Any = None

    def __init__(self, asgi_app) -> None:  # noqa: ANN001 (ASGI)
        self.app = asgi_app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        classify = scope["path"].rstrip("/") == "/classify"

        async def send_with_headers(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                if classify and ResponseHeaders.responses is not None and message["status"] >= 200:
                    ResponseHeaders.responses.labels(f"{min(message['status'] // 100, 5)}xx").inc()
                added = []
                if SERVED:
                    added += [(b"x-model-name", SERVED["registry_name"].encode()),
                              (b"x-model-version", SERVED["registry_version"].encode())]
                if message["status"] == 503:
                    added.append((b"retry-after", RETRY_AFTER_SECONDS.encode()))
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BearerToken:
    """ASGI middleware: with DISTILOPS_API_TOKEN set, /classify needs `Authorization: Bearer <token>` (compared in
    constant time); a missing or wrong token gets 401. Probes, /metrics and /model need none."""

    def __init__(self, asgi_app) -> None:  # noqa: ANN001 (ASGI)
        self.app = asgi_app
        self.expected = f"Bearer {API_TOKEN}".encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        if API_TOKEN and scope["type"] == "http" and scope["path"].rstrip("/") == "/classify":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequireJson:
    """ASGI middleware: /classify takes JSON only (BentoML would parse any other content type as JSON,
    and multipart as a form). A body that is not JSON gets BentoML's own 400."""

    def __init__(self, asgi_app) -> None:  # noqa: ANN001 (ASGI)
        self.app = asgi_app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/classify":
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode().split(";")[0].strip()
            if content_type != "application/json":
                response = JSONResponse({"error": f"Content-Type must be application/json, got "
                                                  f"'{content_type or 'none'}'"}, status_code=415)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


@bentoml.service(
    name="distilops_classifier",
    workers=WORKERS,
    traffic={"timeout": 30, "max_concurrency": 256},
    metrics={"enabled": True},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(app, path="/")
class Classifier:
    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        stored = self.bento_model
        threads = threads_per_worker()
        # Model calls side by side, the worker's threads shared among them: ONNX Runtime spreads a call of a few
        # short texts over its threads poorly, so calls one after another on 2 threads each left a core mostly idle
        # (issue 27: 2 calls of 1 thread served 1.15x more at 32 clients). A call with no other running or waiting
        # (a lone request) still gets every thread: `classifier`; calls side by side share them:
        # `per_call_classifier`, a second session of the same model (on a CPU: ~20 MB for the int8 student).
        parallel = PARALLEL_CALLS or threads
        per_call = max(1, threads // parallel)  # ONNX Runtime threads of one call
        self.calls = (ThreadPoolExecutor(parallel, thread_name_prefix="distilops-call")
                      if parallel > 1 and DISPATCH == "adaptive" else None)
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the tokenizer's pool, before its first use
        folder = Path(stored.path) / MODEL_SUBDIR
        device = "cuda" if REQUIRE_GPU else None
        self.classifier = TextClassifier(folder, device=device, threads=threads, max_windows=MAX_WINDOWS,
                                         spin_wait=SPIN_WAIT)
        self.per_call_classifier = self.classifier if parallel == 1 else TextClassifier(
            folder, device=device, threads=per_call, max_windows=MAX_WINDOWS, spin_wait=SPIN_WAIT)
        self.gpu_missing = REQUIRE_GPU and self.classifier.device != "cuda"
        self.health = Health(UNREADY_AFTER_FAILURES, DEAD_AFTER_SECONDS)
        if self.gpu_missing:
            log.error("DISTILOPS_REQUIRE_GPU=1 but ONNX Runtime runs this model on %s (CUDA provider unavailable: no "
                      "GPU visible, or CUDA/cuDNN libraries missing): not ready, so no traffic reaches a CPU-bound "
                      "GPU pod", self.classifier.providers)
        labels = stored.info.labels
        version = labels.get("registry_version", "unknown")
        self.metrics = Metrics(version, self.classifier.labels)
        reference = read_meta(folder).get("reference")
        if reference:
            with contextlib.suppress(KeyError, TypeError, ValueError):  # a reference without them: no such gauges
                self.metrics.set_reference(reference)
        self.drift, drift_info = open_drift(reference, self.classifier.labels, DRIFT_WINDOW)
        self.drift_lock = threading.Lock()  # batches may be answered on several threads at once
        turns = Turns() if SHADOW_SERIAL else None
        self.shadow, shadow_info = open_shadow(
            Path(stored.path), self.classifier, self.metrics, stored.info.metadata, rate=SHADOW_RATE,
            queue_size=SHADOW_QUEUE, threads=SHADOW_THREADS or threads, window=DRIFT_WINDOW,
            device="cuda" if REQUIRE_GPU else "cpu", batch=SHADOW_BATCH, turns=turns)
        self.turns = turns if self.shadow is not None else None  # model calls take turns with a serial shadow
        self.observe_failures = Throttled("live fidelity bookkeeping failed (the answers were sent)")
        shed = prom_counter("distilops_shed_requests", "Requests answered 503: over the batching latency budget "
                                                       "(DISTILOPS_MAX_LATENCY_MS)")
        self.shed = ShedRequests(RETRY_AFTER_SECONDS, shed)
        ResponseHeaders.responses = responses_counter()
        logging.getLogger("bentoml._internal.server.http_app").addFilter(self.shed)  # where BentoML logs them
        if DISPATCH == "continuous":
            texts_per_call = prom_histogram("distilops_texts_per_call", "Texts in one model call",
                                            (1, 2, 4, 8, 16, 32, 64, 128))

            def run(texts: list[str], alone: bool) -> list[Classification]:
                texts_per_call.observe(len(texts))  # the call's texts; each one's windows run with it
                return self.observed(texts, self.checked_classify(
                    texts, self.classifier if alone else self.per_call_classifier))

            self.call_threads = CallThreads(run, threads=parallel, texts_per_call=TEXTS_PER_CALL,
                                            max_texts=MAX_BATCH_SIZE, budget_s=MAX_LATENCY_MS / 1000,
                                            shed=lambda: ServiceUnavailable("process is overloaded"))
        elif not ADAPTIVE_WAIT:
            wait_only_under_load()
        SERVED.update({
            "registry_name": labels.get("registry_name", stored.tag.name),
            "registry_version": version,
            "bento_model": str(stored.tag),
            "variant": labels.get("variant", "?"),
            "format": self.classifier.format,
            "device": self.classifier.device,
            "providers": self.classifier.providers,  # what ONNX Runtime really runs on
            "require_gpu": REQUIRE_GPU,
            "threads": threads,
            "onnx_threads_per_call": per_call,
            "spin_wait": SPIN_WAIT,
            "max_length": self.classifier.max_length,
            "window_overlap": self.classifier.window_overlap,
            "labels": self.classifier.labels,
            "lineage": {k: v for k, v in stored.info.metadata.items()
                        if k in ("git_commit", "data_hash", "teacher", "optuna_study", "mlflow_run_id", "source")},
            "metrics": stored.info.metadata.get("metrics", {}),
            "auth": "bearer token" if API_TOKEN else "none",
            "limits": {"max_texts": MAX_TEXTS, "max_text_chars": MAX_TEXT_CHARS,
                       "max_batch_size": MAX_BATCH_SIZE, "texts_per_call": TEXTS_PER_CALL,
                       "parallel_calls": parallel,
                       "max_latency_ms": MAX_LATENCY_MS,
                       "dispatch": DISPATCH,
                       "batch_wait": ("none: free call threads take what waits" if DISPATCH == "continuous" else
                                      "adaptive" if ADAPTIVE_WAIT else "adaptive under load, none for a lone request"),
                       "max_windows": self.classifier.max_windows},
            "shadow": shadow_info,
            "reference": reference_summary(reference),
            "drift": drift_info,
        })

    def __is_ready__(self) -> bool:
        if not SERVED or self.gpu_missing:
            return False
        if self.health.failing:  # no traffic reaches an unready pod: only a call of its own can show recovery
            with contextlib.suppress(Exception):  # counted and logged by checked_classify
                self.checked_classify(["readiness check"])
        return not self.health.failing

    def __is_alive__(self) -> bool:
        """False once every model call has failed for DISTILOPS_DEAD_AFTER_SECONDS: a restart is the cure
        (a sticky CUDA error stays until the process ends)."""
        return not self.health.dead

    def checked_classify(self, texts: list[str], classifier: TextClassifier | None = None) -> list[Classification]:
        """The model call (by `classifier`, else the worker's), its outcome counted for readiness and liveness."""
        try:
            with self.turns.model() if self.turns else contextlib.nullcontext():
                answers = (classifier or self.classifier).classify(texts)
        except Exception:
            self.health.failed()
            log.exception("inference failed (%d in a row%s)", self.health.failures,
                          "; not ready until a call succeeds" if self.health.failing else "")
            raise
        self.health.succeeded()
        return answers

    @bentoml.on_shutdown
    def stop_shadow(self) -> None:
        if self.shadow is not None:
            self.shadow.stop()
        if self.calls is not None:
            self.calls.shutdown(wait=True)  # a process that exits during an ONNX Runtime call aborts
        if DISPATCH == "continuous":
            self.call_threads.stop()

    def observe(self, texts: Sequence[str], answers: Sequence[Classification]) -> None:
        """Live fidelity of answered texts: metrics, the drift window, and a sample offered to the shadow."""
        labels, confidence = [a.label for a in answers], [a.score for a in answers]
        words, windows = [word_count(t) for t in texts], [a.windows for a in answers]
        self.metrics.observe(labels, confidence, words, windows)
        if self.drift is not None:
            with self.drift_lock:
                self.drift.add(labels, confidence, words, windows)
                psi = self.drift.psi()
            if psi is not None:
                self.metrics.set_drift(psi)
        if self.shadow is not None:
            self.shadow.offer(texts, labels)

    def observed(self, texts: list[str], answers: list[Classification]) -> list[Classification]:
        """`answers`, after their live-fidelity bookkeeping (observe), which never holds them back."""
        try:
            self.observe(texts, answers)
        except Exception:
            self.observe_failures.failed()
        return answers

    if DISPATCH == "continuous":
        @bentoml.api
        async def classify(self, texts: Texts) -> Annotated[list[Classification], ContentType("application/json")]:
            """Label and score per text (the worker's call threads take waiting texts, of this and other requests,
            up to DISTILOPS_TEXTS_PER_CALL per call, the moment they are free).

            The declared content type spares BentoML from rebuilding the output's JSON schema on
            every response just to pick one (18% of the server's time under load, by py-spy).
            """
            return await self.call_threads.classify(list(texts))
    else:
        @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
        def classify(self, texts: Texts) -> Annotated[list[Classification], ContentType("application/json")]:
            """Label and score per text (texts from concurrent requests are batched together, then sent to the
            model in calls of at most DISTILOPS_TEXTS_PER_CALL texts of like length).

            The declared content type spares BentoML from rebuilding the output's JSON schema on
            every response just to pick one (18% of the server's time under load, by py-spy).
            """
            texts = list(texts)
            groups = length_groups(texts, TEXTS_PER_CALL)
            if len(groups) == 1:  # one call (a lone request): every thread on it
                answered_all = [self.checked_classify(texts)]
            else:
                def call(group: list[int]) -> list[Classification]:
                    return self.checked_classify([texts[i] for i in group], self.per_call_classifier)

                answered_all = self.calls.map(call, groups) if self.calls else map(call, groups)
            return self.observed(texts, in_text_order(groups, answered_all))

    @app.get("/model")
    def model(self) -> dict:
        """The registry name and version served, with lineage, test metrics, limits, shadow and reference."""
        return SERVED


# The first added is the outermost: its headers go on every response, the 401 and 415 too.
Classifier.add_asgi_middleware(ResponseHeaders)
Classifier.add_asgi_middleware(BearerToken)
Classifier.add_asgi_middleware(RequireJson)
