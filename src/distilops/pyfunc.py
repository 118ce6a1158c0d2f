"""The MLflow model format of a registered version: a pyfunc that wraps one model folder.

`mlflow.pyfunc.load_model("models:/NAME@production").predict(["great film"])` returns label,
score and a truncation flag per text. The folder itself (see predict.py) travels as the artifact
`model_dir`, so serving can also run it without MLflow (`find_model_folder`). The model is
logged "from code" (pyfunc_model.py), MLflow 3's recommended form, not as a pickled object.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow.pyfunc

from distilops.predict import META_FILE
from distilops.pyfunc_model import ARTIFACT_KEY

# MLflow draws a progress bar for every artifact round trip; our folders are a handful of files.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def find_model_folder(root: str | Path) -> Path:
    """The model folder inside a downloaded MLflow model (the one directory holding distilops.json)."""
    root = Path(root)
    hits = sorted(p.parent for p in root.rglob(META_FILE))
    if not hits:
        raise FileNotFoundError(f"no {META_FILE} under {root}: not a distilops model")
    return hits[0]


def log_model_folder(folder: str | Path, *, name: str = "model", registered_model_name: str | None = None,
                     metadata: dict | None = None) -> mlflow.models.model.ModelInfo:
    """Log `folder` as a pyfunc model in the active run (optionally registering a new version)."""
    import onnxruntime
    import torch
    import transformers

    import distilops

    package = Path(distilops.__file__).parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package / "pyfunc_model.py"),
        artifacts={ARTIFACT_KEY: str(folder)},
        code_paths=[str(package)],
        # Explicit requirements: inferred ones drag in torchvision (see ../shared/STACK.md).
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
            f"onnxruntime=={onnxruntime.__version__}",
            "pandas",
        ],
        registered_model_name=registered_model_name,
        metadata=metadata,
    )
