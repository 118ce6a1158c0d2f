"""Typed, validated configuration: one dataclass per params.yaml section.

Each DVC stage reads only its own section (plus the shared top-level keys `seed` and
`max_length`). Unknown keys and bad values fail on load with a message naming the key,
so a typo in params.yaml never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

SHARED_KEYS = ("seed", "max_length")
T = TypeVar("T")


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown or out of range."""


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


def _check(cond: bool, section: str, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"params.yaml: {section}.{key}: {message}")


@dataclass
class PrepareConfig:
    source: str = _help(
        "Data set: an asset catalogue name (rotten_tomatoes), a Hugging Face dataset id (imdb) "
        "or a local .csv/.jsonl/.parquet file.",
        "rotten_tomatoes",
    )
    text_column: str = _help("Column holding the text.", "text")
    label_column: str = _help("Column holding the label.", "label")
    group_column: str = _help(
        "Rows sharing this column's value stay in one split (e.g. movie_name); '' splits rows.", ""
    )
    labels: list = _help("Label values in class-id order; every kept row must have one of them.", [])
    drop_labels: list = _help("Label values whose rows are dropped before validation (e.g. plot).", [])
    validation_size: float = _help("Fraction of rows (or groups) for the validation split.", 0.1)
    test_size: float = _help("Fraction of rows (or groups) for the test split.", 0.1)
    min_examples_per_class: int = _help("Fail when any class has fewer examples in any split.", 20)
    max_examples: int = _help("Keep at most this many rows after cleaning (0 = all); for quick runs.", 0)
    seed: int = _help("Shared random seed (top-level key).", 42)

    def __post_init__(self) -> None:
        s = "prepare"
        _check(bool(self.source), s, "source", "must name a data set")
        _check(len(self.labels) >= 2, s, "labels", "list at least two label values in class-id order")
        _check(len(set(map(str, self.labels))) == len(self.labels), s, "labels", "values must be unique")
        for key in ("validation_size", "test_size"):
            v = getattr(self, key)
            _check(0 < v < 0.5, s, key, f"must be between 0 and 0.5, got {v}")
        _check(self.min_examples_per_class >= 1, s, "min_examples_per_class", "must be >= 1")
        _check(self.max_examples >= 0, s, "max_examples", "must be >= 0")


@dataclass
class TeacherConfig:
    model: str = _help(
        "Teacher: an asset catalogue name (all-MiniLM-L6-v2), a Hugging Face model id "
        "(bert-base-uncased) or a local folder.",
        "all-MiniLM-L6-v2",
    )
    epochs: int = _help("Fine-tuning epochs; the best epoch on validation accuracy is kept.", 2)
    batch_size: int = _help("Training batch size.", 32)
    learning_rate: float = _help("AdamW peak learning rate (linear warm-up then decay).", 5e-5)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    warmup_ratio: float = _help("Fraction of steps used for linear warm-up.", 0.1)
    max_train_examples: int = _help("Train on at most this many examples (0 = all).", 0)
    checkpoint_every_steps: int = _help("Save a resumable checkpoint this often.", 100)
    seed: int = _help("Shared random seed (top-level key).", 42)
    max_length: int = _help("Shared: tokens kept per text (top-level key).", 64)

    def __post_init__(self) -> None:
        _validate_training("teacher", self)


@dataclass
class TeacherOutputsConfig:
    batch_size: int = _help("Inference batch size for the teacher's soft targets.", 64)
    hidden_states: bool = _help(
        "Also cache the teacher's last hidden states (needed when distill uses the cosine loss).", False
    )
    max_length: int = _help("Shared: tokens kept per text (top-level key).", 64)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "teacher_outputs", "batch_size", "must be >= 1")


@dataclass
class SearchSpace:
    temperature: list = _help("[low, high] softmax temperature T; equal bounds fix it.", [1.0, 8.0])
    alpha: list = _help("[low, high] weight of the soft-target loss (1 - alpha on hard labels).", [0.2, 0.9])
    learning_rate: list = _help("[low, high] AdamW learning rate, sampled on a log scale.", [5e-5, 3e-4])
    cosine_weight: list = _help("[low, high] weight of the hidden-state cosine loss; [0, 0] = off.", [0.0, 0.0])

    def __post_init__(self) -> None:
        for key in ("temperature", "alpha", "learning_rate", "cosine_weight"):
            v = getattr(self, key)
            _check(
                isinstance(v, list) and len(v) == 2 and float(v[0]) <= float(v[1]),
                "distill.search", key, f"must be [low, high] with low <= high, got {v!r}",
            )
            setattr(self, key, [float(v[0]), float(v[1])])
        _check(self.temperature[0] > 0, "distill.search", "temperature", "must be > 0")
        _check(self.alpha[0] >= 0 and self.alpha[1] <= 1, "distill.search", "alpha", "must lie in [0, 1]")
        _check(self.learning_rate[0] > 0, "distill.search", "learning_rate", "must be > 0")
        _check(self.cosine_weight[0] >= 0, "distill.search", "cosine_weight", "must be >= 0")


@dataclass
class DistillConfig:
    student_model: str = _help(
        "'' builds the student from the teacher (half its layers, every other layer); or a pretrained "
        "model (name or folder) whose tokenizer matches the teacher's.",
        "",
    )
    student_layers: int = _help("Layers in a student built from the teacher (0 = half).", 0)
    n_trials: int = _help("Optuna trials in the study (a resumed study only runs the missing ones).", 6)
    trial_train_examples: int = _help("Train examples seen per trial (0 = all); trials rank, not finish.", 2500)
    trial_epochs: int = _help("Epochs per trial.", 1)
    eval_every_steps: int = _help("Validate (and report to the pruner) every this many steps in a trial.", 20)
    final_epochs: int = _help("Epochs of the final student trained with the best parameters.", 2)
    batch_size: int = _help("Training batch size.", 32)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    warmup_ratio: float = _help("Fraction of steps used for linear warm-up.", 0.1)
    pruner_startup_trials: int = _help("Trials completed before the median pruner prunes.", 2)
    pruner_warmup_steps: int = _help("Reports within a trial before it can be pruned.", 2)
    storage: str = _help("Optuna storage: '' = SQLite file optuna/distill.db; or any SQLAlchemy URL.", "")
    study_name: str = _help("'' = derived from the search space and inputs, so changed params start afresh.", "")
    checkpoint_every_steps: int = _help("Save a resumable checkpoint of the final training this often.", 100)
    search: SearchSpace = field(default_factory=SearchSpace, metadata={"help": "Ranges Optuna searches."})
    seed: int = _help("Shared random seed (top-level key).", 42)
    max_length: int = _help("Shared: tokens kept per text (top-level key).", 64)

    def __post_init__(self) -> None:
        if isinstance(self.search, dict):
            self.search = _build(SearchSpace, self.search, "distill.search")
        s = "distill"
        _check(self.n_trials >= 1, s, "n_trials", "must be >= 1")
        _check(self.student_layers >= 0, s, "student_layers", "must be >= 0")
        for key in ("trial_epochs", "final_epochs", "eval_every_steps", "batch_size", "checkpoint_every_steps"):
            _check(getattr(self, key) >= 1, s, key, "must be >= 1")
        _check(self.trial_train_examples >= 0, s, "trial_train_examples", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, s, "warmup_ratio", "must be in [0, 1)")


def _validate_training(section: str, cfg: Any) -> None:
    for key in ("epochs", "batch_size", "checkpoint_every_steps", "max_length"):
        _check(getattr(cfg, key) >= 1, section, key, "must be >= 1")
    _check(cfg.learning_rate > 0, section, "learning_rate", "must be > 0")
    _check(0 <= cfg.warmup_ratio < 1, section, "warmup_ratio", "must be in [0, 1)")
    _check(cfg.max_train_examples >= 0, section, "max_train_examples", "must be >= 0")


def _build(cls: type[T], values: dict, section: str) -> T:
    if not isinstance(values, dict):
        raise ConfigError(f"params.yaml: {section} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"params.yaml: {section}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as exc:  # wrong types that the dataclass itself rejects
        raise ConfigError(f"params.yaml: {section}: {exc}") from exc


def read_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def load_section(cls: type[T], section: str, path: str | Path = "params.yaml") -> T:
    """Load `section` of params.yaml into `cls`, adding the shared keys that `cls` declares."""
    params = read_params(path)
    if section not in params:
        raise ConfigError(f"params.yaml has no '{section}' section")
    values = dict(params[section] or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in SHARED_KEYS:
        if key in names and key not in values and key in params:
            values[key] = params[key]
    return _build(cls, values, section)


def as_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config dataclass for MLflow params: {'search.alpha': [0.2, 0.9], ...}."""
    out: dict[str, Any] = {}
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{prefix}{key}.{k}": v for k, v in value.items()})
        else:
            out[f"{prefix}{key}"] = value
    return out
