"""Every error distilops raises on purpose: one root, so a stage or the CLI catches them all.

A `DistilopsError` is a user-facing problem (bad params, missing data, a refused promotion):
its message names the cause and the fix, and it is printed as `<stage>: error: ...` without a
traceback (`distilops.stage.run_stage`, `distilops.cli`). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DistilopsError(Exception):
    """Base of every error distilops raises on purpose."""


class ConfigError(DistilopsError):
    """A params.yaml value is missing, unknown or out of range."""


class SettingError(DistilopsError):
    """An environment variable distilops reads (distilops/settings.py) holds a value it cannot use."""


class AssetError(DistilopsError):
    """An embedded asset could not be fetched, verified or unpacked."""


class DataError(DistilopsError):
    """The data set cannot be loaded or breaks a validation rule."""


class ModelError(DistilopsError):
    """A model cannot be loaded or does not fit the pipeline."""


class StaleCacheError(DistilopsError):
    """The cached teacher outputs do not belong to these inputs."""


class DivergedError(DistilopsError):
    """Training produced a non-finite loss."""


class TuningError(DistilopsError):
    """The Optuna study cannot give what the stage needs (e.g. no trial completed)."""


class QuantizeError(DistilopsError):
    """A quantized variant could not be built."""


class RegistryError(DistilopsError):
    """A registry operation cannot be done as asked (unknown version, nothing to roll back to, ...)."""


class ImageError(DistilopsError):
    """A serving image could not be built or inspected."""


class DeployError(DistilopsError):
    """A deployment could not be rendered, validated or rolled out."""


class FailedGate(Protocol):
    name: str
    detail: str


class GateError(RegistryError):
    """A version failed its promotion gates."""

    def __init__(self, version: str, failed: Sequence[FailedGate]) -> None:
        lines = "\n".join(f"  - {g.name}: {g.detail}" for g in failed)
        super().__init__(f"version {version} was not promoted; failed gate(s):\n{lines}\n"
                         "Fix the model, or override with --force --reason '...' (recorded).")
        self.failed = list(failed)
