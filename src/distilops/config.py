"""Typed, validated configuration: one pydantic model per params.yaml section.

Each DVC stage reads only its own section plus the shared top-level keys it declares (`SHARED_KEYS`:
`seed`, `max_length`, `model_name`, `window_overlap`, `max_windows`, declared once below). Unknown keys,
wrong types (`epochs: 2.5`) and out-of-range values fail on load with a `ConfigError` naming the key, the
problem and the key's help text, so a typo in params.yaml never silently falls back to a default.
`distilops params` prints every key with its default and help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from distilops.errors import ConfigError

SHARED_KEYS = ("seed", "max_length", "model_name", "window_overlap", "max_windows")
Variant = Literal["torch_int8", "onnx_fp32", "onnx_int8", "onnx_int8_static", "onnx_fp16"]
QUANTIZE_VARIANTS: tuple[str, ...] = get_args(Variant)
S = TypeVar("S", bound="Section")


def _low_high(bounds: list[float]) -> list[float]:
    if bounds[0] > bounds[1]:
        raise ValueError("must be [low, high] with low <= high")
    return bounds


def bounds(**limits: float) -> Any:
    """The type of a `[low, high]` search range whose ends obey `limits` (pydantic's ge/gt/le)."""
    return Annotated[list[Annotated[float, Field(**limits)]], Field(min_length=2, max_length=2),
                     AfterValidator(_low_high)]


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors; errors become a ConfigError naming the key."""

    model_config = ConfigDict(extra="forbid")
    SECTION: ClassVar[str] = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(explain(exc, type(self))) from None


class Seeded(Section):
    seed: int = Field(42, ge=0, description="Shared (top level): the seed every random choice derives from.")


class Windowed(Section):
    max_length: int = Field(64, ge=1, description="Shared (top level): tokens per text the models read.")


class LongTextWindows(Section):
    window_overlap: int = Field(16, ge=0, description="Shared (top level): tokens neighbouring windows of a long "
                                                      "text share.")
    max_windows: int = Field(16, ge=1, description="Shared (top level): windows one text is read in at most "
                                                   "(each costs about one short text); beyond, it is cut.")


class Registered(Section):
    model_name: str = Field("distilops-sentiment", min_length=1, description="Shared (top level): registered model.")


class Distributed(Section):
    """How many processes a training stage runs in (torch.distributed under torchrun: pipeline/distributed.py)."""

    SECTION: ClassVar[str] = "distributed"
    processes: int = Field(1, ge=1, description="Processes per node (torchrun's --nproc-per-node; on GPUs one "
                                                "per GPU, and the GPUs a Kubernetes pod asks for); 1 with one node "
                                                "= a single process, torchrun never starts.")
    nodes: int = Field(1, ge=1, description="Machines the stage runs on (Kubernetes: pods of the distilops-train "
                                            "Job), each with `processes`; above 1 every node runs the stage and "
                                            "meets the others at DISTILOPS_RENDEZVOUS.")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend: nccl "
                                                                         "(GPUs), gloo (CPUs); auto = nccl "
                                                                         "where CUDA is, else gloo.")
    restarts: int = Field(2, ge=0, description="torchrun restarts every process this many times when one dies; "
                                               "they resume from the last checkpoint.")


def distributed_field() -> Any:
    return Field(default_factory=Distributed, description="Processes and nodes the stage runs on (default: one "
                                                          "process); the batch size stays the global batch.")


class Trained(Seeded, Windowed):
    """What teacher fine-tuning and distillation share."""

    batch_size: int = Field(32, ge=1, description="Training batch size.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps used for linear warm-up.")
    checkpoint_every_steps: int = Field(100, ge=1, description="Save a resumable checkpoint this often.")


class PrepareConfig(Seeded):
    SECTION: ClassVar[str] = "prepare"
    source: str = Field("rotten_tomatoes", min_length=1, description="Asset catalogue name, Hugging Face data "
                                                                     "set id (imdb) or local .csv/.jsonl/.parquet.")
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label.")
    group_column: str = Field("", description="Rows sharing its value stay in one split; '' splits rows.")
    labels: list[str | int] = Field(min_length=2, description="Label values in class-id order (two or more).")
    drop_labels: list[str | int] = Field([], description="Label values whose rows are dropped (e.g. plot).")
    validation_size: float = Field(0.1, gt=0, lt=0.5, description="Fraction of rows (or groups) for validation.")
    test_size: float = Field(0.1, gt=0, lt=0.5, description="Fraction of rows (or groups) for the test split.")
    min_examples_per_class: int = Field(20, ge=1, description="Fail when a class has fewer examples in a split.")
    max_examples: int = Field(0, ge=0, description="Keep at most this many rows after cleaning (0 = all).")

    def model_post_init(self, context: Any) -> None:
        if len(set(map(str, self.labels))) != len(self.labels):
            raise ConfigError(f"params.yaml: prepare.labels: values must be unique, got {self.labels}")


class LongTextsConfig(Section):
    SECTION: ClassVar[str] = "long_texts"
    min_words: int = Field(200, ge=10, description="Words per document at least: a movie's reviews with one "
                                                   "label are joined until a document reaches this.")


class TeacherConfig(Trained):
    SECTION: ClassVar[str] = "teacher"
    model: str = Field("all-MiniLM-L6-v2", min_length=1, description="Asset catalogue name, Hugging Face model "
                                                                     "id (bert-base-uncased) or local folder.")
    epochs: int = Field(2, ge=1, description="Fine-tuning epochs; the best epoch on validation is kept.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW peak learning rate (warm-up, then linear decay).")
    max_train_examples: int = Field(0, ge=0, description="Train on at most this many examples (0 = all).")
    distributed: Distributed = distributed_field()


class TeacherOutputsConfig(Seeded, Windowed):
    SECTION: ClassVar[str] = "teacher_outputs"
    batch_size: int = Field(64, ge=1, description="Inference batch size for the teacher's soft targets.")
    hidden_states: bool = Field(False, description="Also cache last hidden states (for the cosine loss).")
    transfer_texts: list[str] = Field([], description="Unlabelled texts the teacher labels for the student (soft "
                                      "targets only): 'general_english' (offline) or local .txt/.csv/.jsonl/.parquet.")
    transfer_max_texts: int = Field(15000, ge=1, description="Transfer texts kept at most (shuffled with the seed).")
    distributed: Distributed = distributed_field()


class SearchSpace(Section):
    SECTION: ClassVar[str] = "distill.search"
    temperature: bounds(gt=0) = Field([1.0, 8.0], description="[low, high] softmax temperature T; equal bounds "
                                                              "fix a value.")
    alpha: bounds(ge=0, le=1) = Field([0.2, 0.9], description="[low, high] weight of the soft-target loss.")
    learning_rate: bounds(gt=0) = Field([5e-5, 3e-4], description="[low, high] AdamW learning rate (log scale).")
    cosine_weight: bounds(ge=0) = Field([0.0, 0.0], description="[low, high] hidden-state cosine loss weight; "
                                                                "[0, 0] = off.")
    hidden_mse_weight: bounds(ge=0) = Field([0.0, 0.0], description="[low, high] weight of TinyBERT's hidden-state "
                                                                    "MSE per mapped layer (teacher run online); "
                                                                    "[0, 0] = off.")
    attention_weight: bounds(ge=0) = Field([0.0, 0.0], description="[low, high] weight of MiniLM's attention-"
                                                                   "distribution KL per mapped layer (teacher run "
                                                                   "online; equal head counts); [0, 0] = off.")
    student_layers: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2),
                              AfterValidator(_low_high)] = Field(
        [0, 0], description="[low, high] student depths searched with the rest (students built from the teacher; "
                            "high < the teacher's layers): a multi-objective study of fidelity against the served "
                            "variant's latency, chosen by distill.choose; [0, 0] = depth fixed at "
                            "distill.student_layers (one objective, pruned).")


class ChooseRule(Section):
    """How the distill stage picks one point of the depth frontier (used while search.student_layers spans >1)."""

    SECTION: ClassVar[str] = "distill.choose"
    min_speedup: float = Field(1.5, ge=0, description="The served variant must be at least this many times faster "
                                                      "than the teacher at batch 1, both in ONNX Runtime (median of "
                                                      "paired rounds; 0 = no limit).")
    max_latency_ms: float = Field(0.0, ge=0, description="...and at most this many ms on the tuning machine "
                                                         "(0 = no limit).")
    min_agreement: float = Field(0.0, ge=0, le=1, description="...and fidelity (mean of validation and general-"
                                                              "text agreement with the teacher) at least this.")
    tolerance: float = Field(0.005, ge=0, le=1, description="Among the points meeting the limits, those within "
                                                            "this of the most faithful count as equal: the "
                                                            "fastest of them is chosen.")

    def active_limits(self) -> list[tuple[str, float]]:
        """(name, value) of each limit that is on (a 0 is off), in the order the fields are declared."""
        named = [("min_speedup", self.min_speedup), ("max_latency_ms", self.max_latency_ms),
                 ("min_agreement", self.min_agreement)]
        return [(name, value) for name, value in named if value]

    def limits(self) -> list[str]:
        """The active limits as 'name value'."""
        return [f"{name} {value:g}" for name, value in self.active_limits()]

    def text(self) -> str:
        """'min_speedup 1.5, tolerance 0.005': the rule in words (the stage log, the plot, `distilops versions`)."""
        return ", ".join([*self.limits(), f"tolerance {self.tolerance:g}"])


class DistillConfig(Trained):
    SECTION: ClassVar[str] = "distill"
    student_model: str = Field("", description="'' = the teacher with fewer layers; or a pretrained model with "
                                               "the teacher's tokenizer.")
    student_layers: int = Field(0, ge=0, description="Layers of a student built from the teacher (0 = half), "
                                                     "while search.student_layers is [0, 0].")
    n_trials: int = Field(6, ge=1, description="Optuna trials in the study (a resumed study runs the rest).")
    trial_train_examples: int = Field(2500, ge=0, description="Train examples per trial (0 = all).")
    trial_epochs: int = Field(1, ge=1, description="Epochs per trial.")
    eval_every_steps: int = Field(20, ge=1, description="Report validation accuracy to the pruner this often.")
    final_epochs: int = Field(2, ge=1, description="Epochs of the final student (best trial's parameters).")
    pruner_startup_trials: int = Field(2, ge=0, description="Trials completed before the median pruner prunes.")
    pruner_warmup_steps: int = Field(20, ge=0, description="Training steps before a trial may be pruned.")
    storage: str = Field("", description="'' = sqlite:///optuna/distill.db; or any SQLAlchemy URL.")
    study_name: str = Field("", description="'' = derived from everything that changes a trial.")
    heartbeat_seconds: int = Field(30, ge=1, description="A worker's trials signal life this often; one silent "
                                                         "for 3 intervals is failed and retried once.")
    search: SearchSpace = Field(default_factory=SearchSpace, description="Ranges Optuna searches.")
    choose: ChooseRule = Field(default_factory=ChooseRule, description="Which frontier point becomes the "
                                                                       "student when depth is searched.")
    latency_calls: int = Field(300, ge=10, description="Interleaved rounds timed for the frontier's latency, each "
                                                       "calling every depth and the teacher once at batch 1 "
                                                       "(medians and quartiles kept).")
    general_texts: int = Field(1000, ge=50, le=2000, description="Held-apart general_english sentences (never "
                               "transfer or evaluation texts) whose agreement with the teacher is an objective when "
                               "depth is searched.")
    distributed: Distributed = Field(default_factory=Distributed, description="Processes and nodes the final "
                                     "student trains on (rank 0 alone runs the study); the batch size stays global.")


class QuantizeConfig(Seeded, LongTextWindows):
    SECTION: ClassVar[str] = "quantize"
    variants: list[Variant] = Field(list(QUANTIZE_VARIANTS), description="Variants to build.")
    calibration_texts: int = Field(512, ge=1, description="Training texts (sampled with the seed) onnx_int8_static "
                                                          "calibrates its activation scales on.")
    calibration_method: Literal["minmax", "percentile", "entropy"] = Field(
        "minmax", description="How onnx_int8_static turns the calibration activations into ranges.")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="Reject a variant whose test accuracy falls "
                                                                   "more than this below the fp32 student's.")
    onnx_opset: int = Field(17, ge=14, description="ONNX opset of the export.")
    batch_size: int = Field(64, ge=1, description="Inference batch size of the accuracy check.")


class EvalSet(Section):
    SECTION: ClassVar[str] = "evaluate.extra_sets"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Short name: metric and plot keys use it.")
    source: str = Field(min_length=1, description="Local .csv/.jsonl/.parquet file, or a Hugging Face data set "
                                                  "id online (imdb).")
    split: str = Field("test", description="Hugging Face data sets: the split to score (files: ignored).")
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="Column holding the label.")
    labels: dict[str | int, str] = Field({}, description="The set's label value -> the model's label name "
                                                         "({0: rotten, 1: fresh}); {} = values are label names.")
    max_examples: int = Field(0, ge=0, description="Score at most this many rows, sampled with the seed (0 = all).")


# The local files the pipeline reads tables from (pipeline/data.py picks the reader by suffix: a compressed
# CSV is .gz or .bz2) and texts from (pipeline/transfer.py: a table's text column, or a .txt file's lines).
TABLE_FILE_TYPES = {".csv": "csv", ".gz": "csv", ".bz2": "csv", ".jsonl": "jsonl", ".json": "jsonl",
                    ".parquet": "parquet"}
TEXT_FILE_TYPES = (".txt", *TABLE_FILE_TYPES)


def _text_source(source: str) -> str:
    if source != "general_english" and not source.endswith(TEXT_FILE_TYPES):
        raise ValueError(f"must be 'general_english' or a local {'/'.join(TEXT_FILE_TYPES)} file")
    return source


class UnlabeledSet(Section):
    SECTION: ClassVar[str] = "evaluate.unlabeled_sets"
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Short name: metric and tag keys use it.")
    source: Annotated[str, AfterValidator(_text_source)] = Field(
        description="'general_english' (its held-apart slice, never a transfer text) or a local .txt (one text a "
                    "line) / .csv/.jsonl/.parquet file with a `text` column, e.g. logged requests.")
    max_texts: int = Field(0, ge=0, description="Score at most this many texts, sampled with the seed (0 = all).")


class EvaluateConfig(Seeded, LongTextWindows):
    SECTION: ClassVar[str] = "evaluate"
    batch_size: int = Field(32, ge=1, description="Batch size of the throughput measurement.")
    speed_texts: int = Field(640, ge=0, description="Test texts per throughput pass (0 = all).")
    latency_samples: int = Field(200, ge=1, description="Test texts timed one at a time per repeat.")
    repeats: int = Field(3, ge=1, description="Timed repeats per model (medians; models interleaved).")
    threads: int = Field(0, ge=0, description="CPU threads for PyTorch and ONNX Runtime (0 = all cores).")
    bootstrap_resamples: int = Field(1000, ge=100, description="Bootstrap resamples of the 95% intervals.")
    extra_sets: list[EvalSet] = Field([], description="More labelled sets, each scored for every model.")
    unlabeled_sets: list[UnlabeledSet] = Field(
        default_factory=lambda: [UnlabeledSet(name="general_text", source="general_english")],
        description="Unlabelled sets where each model's agreement with the teacher is measured (no labels needed).")

    def model_post_init(self, context: Any) -> None:
        names = [s.name for s in self.extra_sets]
        if len(set(names)) != len(names) or "test" in names:
            raise ConfigError(f"params.yaml: evaluate.extra_sets: names must be unique and not 'test', got {names}")
        unlabeled = [s.name for s in self.unlabeled_sets]
        if len(set(unlabeled)) != len(unlabeled) or set(unlabeled) & {"test", *names}:
            raise ConfigError(f"params.yaml: evaluate.unlabeled_sets: names must be unique, not 'test' and no "
                              f"extra set's, got {unlabeled}")


class ServingVariants(Section):
    SECTION: ClassVar[str] = "register.serving"
    cpu: Literal["onnx_int8_static", "onnx_int8", "onnx_fp32"] = Field(
        "onnx_int8_static", description="ONNX variant served on CPU nodes: onnx_int8_static answers a text the same "
                                        "whatever shares its batch; onnx_int8's (dynamic) scales span the batch.")
    gpu: Literal["onnx_fp16", "onnx_fp32", ""] = Field("onnx_fp16", description="ONNX variant served on GPU nodes "
                                                       "(never int8: ONNX Runtime's CUDA provider lacks its kernels); "
                                                       "'' = none.")


class RegisterConfig(Registered, LongTextWindows):
    SECTION: ClassVar[str] = "register"
    serving: ServingVariants = Field(default_factory=ServingVariants, description="The variant each device serves; "
                                     "a variant quantize rejected falls back to onnx_fp32.")


class PromoteConfig(Registered):
    SECTION: ClassVar[str] = "promote"
    alias: str = Field("production", min_length=1, description="Registry alias that serving follows.")
    min_accuracy_retention: float = Field(0.97, gt=0, le=1.5, description="Gate: the lower end of the 95% interval "
                                          "of accuracy / teacher's accuracy must reach this.")
    max_accuracy_drop: float = Field(0.005, ge=0, le=1, description="Gate: a drop vs production larger than this "
                                     "that McNemar's test finds significant is refused.")
    significance: float = Field(0.05, gt=0, lt=1, description="Gate: McNemar p-value below which a drop counts "
                                "as real, not noise.")
    max_latency_p95_ms: float = Field(25.0, gt=0, description="Gate: batch-1 p95 latency bound, ms.")


SECTIONS: tuple[type[Section], ...] = (PrepareConfig, LongTextsConfig, TeacherConfig, TeacherOutputsConfig,
                                       DistillConfig, QuantizeConfig, EvaluateConfig, RegisterConfig, PromoteConfig)


def explain(exc: ValidationError, model: type[Section]) -> str:
    """One line per problem: `params.yaml: <section>.<key>: <problem> (<the key's help>)`."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        where = ".".join([model.SECTION, *loc]).lstrip(".")
        *parents, key = [part for part in loc if not part.isdigit()] or ["?"]  # alpha.1 -> alpha's help
        owner: Any = model
        for part in parents:  # walk into nested sections (distill.search) to name the right keys
            field = owner.model_fields.get(part) if isinstance(owner, type) else None
            owner = field.annotation if field else None
            if get_origin(owner) is list:  # extra_sets.0.source -> the item model's fields
                owner = get_args(owner)[0]
        fields = owner.model_fields if isinstance(owner, type) and issubclass(owner, BaseModel) else {}
        if error["type"] == "extra_forbidden":
            lines.append(f"params.yaml: {where}: unknown key; known keys: {sorted(fields)}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        got = "" if error["type"] == "missing" else f"; value {error['input']!r}"
        described = fields[key].description if key in fields else None
        lines.append(f"params.yaml: {where}: {message}{got}" + (f" ({described})" if described else ""))
    return "\n".join(lines)


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
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


def load_section(cls: type[S], path: str | Path = "params.yaml") -> S:
    """Load section `cls.SECTION` of params.yaml into `cls`, adding the shared keys `cls` declares."""
    params = read_params(path)
    if cls.SECTION not in params:
        raise ConfigError(f"params.yaml has no '{cls.SECTION}' section")
    values = params[cls.SECTION] or {}
    if not isinstance(values, dict):
        raise ConfigError(f"params.yaml: {cls.SECTION} must be a mapping, got {type(values).__name__}")
    shared = {k: params[k] for k in SHARED_KEYS if k in cls.model_fields and k in params and k not in values}
    return cls(**values, **shared)


def as_flat_dict(cfg: BaseModel) -> dict[str, Any]:
    """Flatten a config for MLflow params: {'search.alpha': [0.2, 0.9], ...}."""
    out: dict[str, Any] = {}
    for key, value in cfg.model_dump().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
