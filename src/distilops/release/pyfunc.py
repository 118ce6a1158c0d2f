"""The MLflow model format of a registered version: a pyfunc that wraps one model folder.

`mlflow.pyfunc.load_model("models:/NAME@production").predict(["great film"])` returns label,
score, windows and a truncation flag per text. The folder itself (serving/folder.py) travels as the
artifact `model_dir`, so packaging can also take it without MLflow (`find_model_folder`). The model
is logged "from code" (pyfunc_model.py), MLflow 3's recommended form, not as a pickled object, with
the distilops package as its code.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc

import distilops

ARTIFACT_KEY = "model_dir"  # the model folder's name among the MLflow model's artifacts
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # what MLflow runs to load a version


def log_model_folder(folder: str | Path, *, name: str = "model", registered_model_name: str | None = None,
                     metadata: dict | None = None) -> mlflow.models.model.ModelInfo:
    """Log `folder` as a pyfunc model in the active run (optionally registering a new version)."""
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE),
        artifacts={ARTIFACT_KEY: str(folder)},
        code_paths=[str(Path(distilops.__file__).parent)],
        # Explicit requirements: inferred ones add torchvision, which fails to import beside this torch.
        pip_requirements=[*(f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "transformers", "onnxruntime")),
                          "pandas"],
        registered_model_name=registered_model_name,
        metadata=metadata,
    )
