"""The environment variables distilops reads, each declared once: its name, type, default and meaning.

A `Setting` reads its variable through one parser: unset or empty is the default; a value the parser refuses
is a `SettingError` naming the variable, the value and what it must be (one line, as every DistilopsError:
the CLI and the stages print it without a traceback; the service stops at start with it). Zero or a negative
number is refused wherever it means nothing; booleans take the usual spellings (1/0, true/false, yes/no,
on/off).

The declarations live beside their readers' layer: `CLI` here (the `distilops` commands, the pipeline, the
release tools), the service's in serving/settings.py (the serving image carries that package and this
module, nothing else of the core). `distilops settings` lists them all with their current values;
docs/settings.md is generated from them (`distilops settings --markdown`), and a test keeps it so. Kubernetes
ConfigMaps and the Containerfile may set only declared names (tests/test_settings.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from distilops.errors import SettingError

T = TypeVar("T")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment variable: `parse` turns its text into a value or raises ValueError; `kind` says in words
    what a valid value is (the error message and the docs show it)."""

    name: str
    default: T
    kind: str
    meaning: str
    parse: Callable[[str], T]
    read_by: str = "cli"  # cli (the commands and the pipeline) | service | another program (OTHERS: not read here)
    secret: bool = False  # never printed (`distilops settings` shows whether it is set)

    def read(self, environ: Mapping[str, str] | None = None) -> T:
        """The value in `environ` (default: the process's environment), else the default."""
        raw = (os.environ if environ is None else environ).get(self.name, "")
        if not raw.strip():
            return self.default
        try:
            return self.parse(raw.strip())
        except ValueError:
            shown = "(hidden)" if self.secret else repr(raw)
            raise SettingError(f"{self.name}={shown}: must be {self.kind}") from None


# --- parsers: each raises ValueError on a value it cannot use ------------------------------------------


def text(raw: str) -> str:
    return raw


def boolean(raw: str) -> bool:
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise ValueError(raw)


def whole(minimum: int) -> Callable[[str], int]:
    """A whole number >= `minimum`."""
    def parse(raw: str) -> int:
        value = int(raw)
        if value < minimum:
            raise ValueError(raw)
        return value
    return parse


def number(low: float, high: float = float("inf"), *, above: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] (`above`: low itself excluded)."""
    def parse(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value) or not (low < value if above else low <= value) or value > high:
            raise ValueError(raw)
        return value
    return parse


def one_of(*choices: str) -> Callable[[str], str]:
    """One of `choices`, in any case."""
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(raw)
        return raw.lower()
    return parse


def bool_setting(name: str, default: bool, meaning: str, read_by: str = "cli") -> Setting[bool]:
    return Setting(name, default, "a boolean: 1/0, true/false, yes/no, on/off", meaning, boolean, read_by)


def whole_setting(name: str, default: int | None, minimum: int, meaning: str, read_by: str = "cli") -> Setting:
    return Setting(name, default, f"a whole number >= {minimum}", meaning, whole(minimum), read_by)


def text_setting(name: str, default: str, meaning: str, read_by: str = "cli", *, secret: bool = False) -> Setting[str]:
    return Setting(name, default, "text", meaning, text, read_by, secret)


# --- what the `distilops` commands, the pipeline and the release tools read ---------------------------------

CACHE = text_setting("DISTILOPS_CACHE", "", "Machine-wide cache of the embedded assets (models, data sets, "
                                            "wheels); empty = ~/.cache/distilops.")
TRACKING_URI = text_setting("MLFLOW_TRACKING_URI", "", "The MLflow tracking and registry store; empty = "
                                                       "sqlite:///<working directory>/mlflow.db.", secret=True)
EXPERIMENT = text_setting("DISTILOPS_EXPERIMENT", "distilops", "The MLflow experiment the stages' runs go to.")
GIT_COMMIT = text_setting("DISTILOPS_GIT_COMMIT", "", "The commit lineage tags record; empty = ask git (an "
                                                      "image without .git sets it).")
USER = text_setting("DISTILOPS_USER", "", "Who promotes or rolls back, in the promotion history; empty = the "
                                          "login name.")
OPTUNA_STORAGE = text_setting("DISTILOPS_OPTUNA_STORAGE", "", "SQLAlchemy URL of the Optuna study (shared by "
                                                              "`distilops tune` workers); overrides "
                                                              "distill.storage; empty = that, else SQLite.",
                              secret=True)
REGISTRY_USERNAME = text_setting("DISTILOPS_REGISTRY_USERNAME", "", "User for a private image registry "
                                                                    "(`distilops deploy` asks it for digests).")
REGISTRY_PASSWORD = text_setting("DISTILOPS_REGISTRY_PASSWORD", "", "Its password.", secret=True)
RENDEZVOUS = text_setting("DISTILOPS_RENDEZVOUS", "", "host:port where the nodes of a training stage meet "
                                                   "(torchrun's c10d rendezvous; the first node's) when "
                                                   "distributed.nodes > 1; k8s/jobs/train-job.yaml sets it.")
RENDEZVOUS_ID = text_setting("DISTILOPS_RENDEZVOUS_ID", "", "The rendezvous's id, the same on every node of one "
                                                            "run; empty = distilops-<stage>.")
RANK = whole_setting("RANK", None, 0, "Set by torchrun in each process it starts: the process's rank among all "
                                      "(0 writes the outputs). Set with WORLD_SIZE: the stage joins the group instead "
                                      "of launching torchrun.")
WORLD_SIZE = whole_setting("WORLD_SIZE", None, 1, "Set by torchrun: how many processes train together.")
LOCAL_RANK = whole_setting("LOCAL_RANK", 0, 0, "Set by torchrun: the process's rank on its node (its GPU).")
KUBECONFIG = text_setting("KUBECONFIG", "", "The kubeconfig `deploy --apply`, `jobs` and `start-workers` use "
                                            "outside a cluster; empty = ~/.kube/config.")
KUBERNETES_SERVICE_HOST = text_setting("KUBERNETES_SERVICE_HOST", "", "Set by Kubernetes inside a pod: the "
                                                                      "commands then use the pod's service account.")

CLI: tuple[Setting, ...] = (CACHE, TRACKING_URI, EXPERIMENT, GIT_COMMIT, USER, OPTUNA_STORAGE, REGISTRY_USERNAME,
                            REGISTRY_PASSWORD, RENDEZVOUS, RENDEZVOUS_ID, RANK, WORLD_SIZE, LOCAL_RANK, KUBECONFIG,
                            KUBERNETES_SERVICE_HOST)

# --- what distilops's manifests set for the programs beside it (never read here: declared so that every key a
# ConfigMap sets says what it is for) ------------------------------------------------------------------------
OTHERS: tuple[Setting, ...] = (
    text_setting("MLFLOW_SERVER_ALLOWED_HOSTS", "", "Host headers the MLflow server (k8s/platform) answers API "
                                                    "calls for.", "mlflow server"),
    text_setting("DVC_NO_ANALYTICS", "", "Set in the pipeline Jobs: DVC sends no usage analytics.", "dvc"),
    text_setting("PYTHONUNBUFFERED", "", "Set in the pipeline Jobs and images: Python writes logs at once.", "python"),
)


def read_all(settings: Iterable[Setting], environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """{name: value} of every setting; every bad value in one SettingError, one line each."""
    values, bad = {}, []
    for setting in settings:
        try:
            values[setting.name] = setting.read(environ)
        except SettingError as exc:
            bad.append(str(exc))
    if bad:
        raise SettingError("\n".join(bad))
    return values


def shown_default(setting: Setting) -> str:
    if setting.default is None or setting.default == "":
        return "(unset)"
    if isinstance(setting.default, bool):
        return str(setting.default).lower()
    return f"{setting.default:g}" if isinstance(setting.default, float) else str(setting.default)


def markdown_table(settings: Iterable[Setting]) -> str:
    """The docs table: one row per setting, as docs/settings.md holds it."""
    rows = ["| variable | read by | type | default | meaning |", "|---|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.read_by} | {s.kind} | {shown_default(s)} | "
             f"{s.meaning}{' Secret: never printed.' if s.secret else ''} |" for s in settings]
    return "\n".join(rows) + "\n"
