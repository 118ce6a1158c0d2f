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

SHARED_KEYS = ("seed", "max_length", "model_name")
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
    pruner_warmup_steps: int = _help(
        "Training steps before a trial may be pruned (Optuna's n_warmup_steps; reports come every "
        "eval_every_steps).", 20
    )
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


QUANTIZE_VARIANTS = ("torch_int8", "onnx_fp32", "onnx_int8")


@dataclass
class QuantizeConfig:
    variants: list = _help("Variants to build: torch_int8, onnx_fp32, onnx_int8 (ONNX Runtime int8).",
                           list(QUANTIZE_VARIANTS))
    max_accuracy_drop: float = _help(
        "A variant whose test accuracy falls more than this below the fp32 student's is rejected "
        "(reported, never registered). 0.01 = one accuracy point.", 0.01
    )
    onnx_opset: int = _help("ONNX opset of the export.", 17)
    batch_size: int = _help("Inference batch size of the accuracy check.", 64)

    def __post_init__(self) -> None:
        s = "quantize"
        unknown = [v for v in self.variants if v not in QUANTIZE_VARIANTS]
        _check(not unknown, s, "variants", f"unknown {unknown}; known: {list(QUANTIZE_VARIANTS)}")
        _check(0 <= self.max_accuracy_drop <= 1, s, "max_accuracy_drop", "must be in [0, 1]")
        _check(self.onnx_opset >= 14, s, "onnx_opset", "must be >= 14")
        _check(self.batch_size >= 1, s, "batch_size", "must be >= 1")


@dataclass
class EvaluateConfig:
    batch_size: int = _help("Batch size of the throughput measurement.", 32)
    speed_texts: int = _help("Test texts per throughput pass (0 = the whole test split).", 640)
    latency_samples: int = _help("Test texts timed one at a time (batch 1) per repeat.", 200)
    repeats: int = _help("Timed repeats per model; medians are reported, models interleaved.", 3)
    threads: int = _help("CPU threads for PyTorch and ONNX Runtime (0 = all cores).", 0)

    def __post_init__(self) -> None:
        s = "evaluate"
        for key in ("batch_size", "latency_samples", "repeats"):
            _check(getattr(self, key) >= 1, s, key, "must be >= 1")
        _check(self.speed_texts >= 0, s, "speed_texts", "must be >= 0")
        _check(self.threads >= 0, s, "threads", "must be >= 0")


SERVING_VARIANTS = ("student", *QUANTIZE_VARIANTS)


@dataclass
class RegisterConfig:
    serving_variant: str = _help(
        "The model to serve, registered beside the fp32 student: onnx_int8, onnx_fp32, torch_int8 or "
        "student. A variant that quantize rejected is not registered (the student serves instead).",
        "onnx_int8",
    )
    model_name: str = _help("Shared: the MLflow registered model name (top-level key).", "distilops-sentiment")

    def __post_init__(self) -> None:
        _check(self.serving_variant in SERVING_VARIANTS, "register", "serving_variant",
               f"must be one of {list(SERVING_VARIANTS)}, got '{self.serving_variant}'")
        _check(bool(self.model_name), "register", "model_name", "must not be empty")


@dataclass
class PromoteConfig:
    alias: str = _help("Registry alias that serving follows.", "production")
    min_accuracy_retention: float = _help(
        "Gate: candidate test accuracy / its teacher's test accuracy must be at least this.", 0.97
    )
    max_accuracy_drop: float = _help(
        "Gate: candidate test accuracy may be at most this below the current production version's.", 0.005
    )
    max_latency_p95_ms: float = _help("Gate: batch-1 p95 latency measured by evaluate, in ms.", 25.0)
    model_name: str = _help("Shared: the MLflow registered model name (top-level key).", "distilops-sentiment")

    def __post_init__(self) -> None:
        s = "promote"
        _check(bool(self.alias), s, "alias", "must not be empty")
        _check(0 < self.min_accuracy_retention <= 1.5, s, "min_accuracy_retention", "must be in (0, 1.5]")
        _check(0 <= self.max_accuracy_drop <= 1, s, "max_accuracy_drop", "must be in [0, 1]")
        _check(self.max_latency_p95_ms > 0, s, "max_latency_p95_ms", "must be > 0")


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
