"""The pipeline's folders and files, relative to the repository root (where `dvc repro` runs).

dvc.yaml declares the same paths as stage dependencies and outputs; tests/test_architecture.py
checks that the two agree.
"""

from pathlib import Path

from distilops import settings

PREPARED = Path("data/prepared")  # prepare: {train,validation,test}.parquet + report.json
DATA_REPORT = PREPARED / "report.json"  # labels, counts and the data hash every run is tagged with
LONG_TEXTS = PREPARED / "test_long.parquet"  # long_texts: test reviews joined into documents (an extra set)
TEACHER = Path("models/teacher")  # teacher: fine-tuned model folder
TEACHER_OUTPUTS = Path("data/teacher_outputs")  # teacher_outputs: cached logits (and hidden states)
STUDENT = Path("models/student")  # distill: the final student
QUANTIZED = Path("models/quantized")  # quantize: one folder per variant
TEACHER_ONNX = Path("models/teacher_onnx")  # quantize: the teacher as ONNX fp32, the shadow model served beside it
METRICS = Path("metrics")  # <stage>.json per stage
PLOTS = Path("plots")  # <stage>/ per stage
CHECKPOINTS = Path("checkpoints")  # <stage>/ resumable training state, removed when a run finishes
OPTUNA_DB = Path("optuna/distill.db")  # the default study storage (outside DVC's outputs: never deleted)
MLFLOW_DB = Path("mlflow.db")  # the default MLflow store; artifacts beside it in mlartifacts/


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"


def plots_dir(stage: str) -> Path:
    return PLOTS / stage


def cache_dir() -> Path:
    """Machine-wide cache outside the repository: $DISTILOPS_CACHE, else ~/.cache/distilops."""
    return Path(settings.CACHE.read() or Path.home() / ".cache" / "distilops")
