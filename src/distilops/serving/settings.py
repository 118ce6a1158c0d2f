"""What the BentoML service reads from its environment (a ConfigMap in Kubernetes: k8s/base/config.env and the
overlays), each declared once with its type, default and meaning (distilops/settings.py says how they are
read). `read()` reads them all at once: a bad value stops the service at start with one line per bad setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from distilops.settings import Setting, bool_setting, number, one_of, read_all, text_setting, whole_setting

SERVICE = "service"

BENTO_MODEL = text_setting("DISTILOPS_BENTO_MODEL", "distilops-sentiment:latest",
                           "The Bento model the service loads (its image sets it at build time).", SERVICE)
MAX_TEXTS = whole_setting("DISTILOPS_MAX_TEXTS", 64, 1, "Texts in one request (more: 400).", SERVICE)
MAX_TEXT_CHARS = whole_setting("DISTILOPS_MAX_TEXT_CHARS", 5000, 1, "Characters in one text (more: 400).", SERVICE)
MAX_WINDOWS = whole_setting("DISTILOPS_MAX_WINDOWS", None, 1, "Windows of max_length tokens one text is read in, "
                            "at most (beyond: cut, flagged `truncated`); unset = the model's own max_windows.",
                            SERVICE)
MAX_BATCH_SIZE = whole_setting("DISTILOPS_MAX_BATCH_SIZE", 64, 1, "Texts in one batch: BentoML's adaptive "
                               "batching (DISTILOPS_DISPATCH=adaptive) gathers at most this many; with "
                               "DISTILOPS_TEXTS_PER_CALL=0, texts one model call takes at most.", SERVICE)
TEXTS_PER_CALL = whole_setting("DISTILOPS_TEXTS_PER_CALL", 1, 0, "Texts in one ONNX Runtime call at most "
                               "(continuous: taken from the queue; adaptive: a batch sorted by length and cut into "
                               "calls of this many); a call pads every text to its longest. 0 = up to "
                               "DISTILOPS_MAX_BATCH_SIZE (GPU).", SERVICE)
PARALLEL_CALLS = whole_setting("DISTILOPS_PARALLEL_CALLS", 0, 0, "Model calls at once (call threads), sharing the "
                               "worker's CPU threads; 0 = one call per thread, 1 = one call at a time on every "
                               "thread.", SERVICE)
DISPATCH = Setting("DISTILOPS_DISPATCH", "continuous", "continuous or adaptive", "How requests reach the model. "
                   "continuous: call threads (DISTILOPS_PARALLEL_CALLS of them) each take what waits, up to "
                   "DISTILOPS_TEXTS_PER_CALL texts, the moment they are free; adaptive: BentoML's adaptive batching "
                   "(one batch at a time, DISTILOPS_MAX_BATCH_SIZE texts at most, cut into calls).",
                   one_of("continuous", "adaptive"), SERVICE)
MAX_LATENCY_MS = whole_setting("DISTILOPS_MAX_LATENCY_MS", 1000, 1, "Batching + inference budget of one request, "
                               "in ms (beyond: 503, load shed).", SERVICE)
WORKERS = whole_setting("DISTILOPS_WORKERS", 1, 1, "Model workers (processes) per pod; each batches its own "
                        "requests.", SERVICE)
THREADS = whole_setting("DISTILOPS_THREADS", 0, 0, "CPU threads per worker; 0 = the CPU limit / workers.", SERVICE)
CPU_LIMIT = whole_setting("DISTILOPS_CPU_LIMIT", None, 1, "CPUs the pod may use (the Deployment sets it from its "
                          "limit, downward API); unset = the cgroup quota, else every core.", SERVICE)
SPIN_WAIT = bool_setting("DISTILOPS_ORT_SPIN_WAIT", False, "ONNX Runtime's idle threads busy-wait: a little less "
                         "latency, but a spinning thread reads as a busy core to the CPU autoscaler.", SERVICE)
ADAPTIVE_WAIT = bool_setting("DISTILOPS_ADAPTIVE_WAIT", False, "BentoML's adaptive batching as it is: a lone request "
                             "waits the batch wait learned under load (~40 ms); off, it goes at once.", SERVICE)
REQUIRE_GPU = bool_setting("DISTILOPS_REQUIRE_GPU", False, "Never become ready unless ONNX Runtime got the CUDA "
                           "provider (the gpu overlay sets it).", SERVICE)
UNREADY_AFTER_FAILURES = whole_setting("DISTILOPS_UNREADY_AFTER_FAILURES", 3, 1, "Model calls failing in a row "
                                       "before the pod is not ready (it then retries one call per readiness probe).",
                                       SERVICE)
DEAD_AFTER_SECONDS = Setting("DISTILOPS_DEAD_AFTER_SECONDS", 60.0, "a number of seconds > 0", "Seconds of failing "
                             "calls (none succeeding) before the pod is not alive and the kubelet restarts it.",
                             number(0, above=True), SERVICE)
API_TOKEN = text_setting("DISTILOPS_API_TOKEN", "", "Bearer token /classify requires (the distilops-serving "
                         "Secret); unset = open. Probes, /metrics and /model stay open.", SERVICE, secret=True)
ACCESS_LOG = bool_setting("DISTILOPS_ACCESS_LOG", False, "BentoML logs every request.", SERVICE)
SHADOW_RATE = Setting("DISTILOPS_SHADOW_RATE", 0.0, "a fraction between 0 and 1", "Share of answered texts the "
                      "shadow (teacher) model also scores, off the request path; 0 = off. Needs a release packaged "
                      "with its teacher.", number(0, 1), SERVICE)
SHADOW_QUEUE = whole_setting("DISTILOPS_SHADOW_QUEUE", 2048, 1, "Texts waiting for the shadow at most; beyond, "
                             "sampled texts are dropped and counted.", SERVICE)
SHADOW_THREADS = whole_setting("DISTILOPS_SHADOW_THREADS", 0, 0, "ONNX Runtime threads of the shadow model; 0 = the "
                               "model's (threads per worker).", SERVICE)
SHADOW_SERIAL = bool_setting("DISTILOPS_SHADOW_SERIAL", True, "The shadow takes turns with the model: it runs while "
                             "no model call does (or, after waiting 0.1 s, before the next one starts), so the "
                             "model's threads alone fill the CPU limit. Off: alongside the model, which needs a CPU "
                             "limit of the model's threads plus the shadow's.", SERVICE)
SHADOW_BATCH = whole_setting("DISTILOPS_SHADOW_BATCH", 4, 1, "Texts in one shadow call at most: a serial shadow "
                             "delays a request by one such call at most.", SERVICE)
DRIFT_WINDOW = whole_setting("DISTILOPS_DRIFT_WINDOW", 1000, 1, "Recent texts the drift (PSI vs the evaluated "
                             "reference) and live agreement gauges cover.", SERVICE)

ALL: tuple[Setting, ...] = (BENTO_MODEL, MAX_TEXTS, MAX_TEXT_CHARS, MAX_WINDOWS, MAX_BATCH_SIZE, TEXTS_PER_CALL,
                            PARALLEL_CALLS, DISPATCH, MAX_LATENCY_MS, WORKERS, THREADS, CPU_LIMIT, SPIN_WAIT,
                            ADAPTIVE_WAIT, REQUIRE_GPU, UNREADY_AFTER_FAILURES, DEAD_AFTER_SECONDS, API_TOKEN,
                            ACCESS_LOG, SHADOW_RATE, SHADOW_QUEUE, SHADOW_THREADS, SHADOW_SERIAL, SHADOW_BATCH,
                            DRIFT_WINDOW)


@dataclass(frozen=True)
class ServiceSettings:
    bento_model: str
    max_texts: int
    max_text_chars: int
    max_windows: int | None
    max_batch_size: int
    texts_per_call: int
    parallel_calls: int
    dispatch: str
    max_latency_ms: int
    workers: int
    threads: int
    cpu_limit: int | None
    ort_spin_wait: bool
    adaptive_wait: bool
    require_gpu: bool
    unready_after_failures: int
    dead_after_seconds: float
    api_token: str
    access_log: bool
    shadow_rate: float
    shadow_queue: int
    shadow_threads: int
    shadow_serial: bool
    shadow_batch: int
    drift_window: int


def read(environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Every service setting, typed; a SettingError naming each bad one."""
    values = read_all(ALL, environ)
    return ServiceSettings(**{name.removeprefix("DISTILOPS_").lower(): value for name, value in values.items()})
