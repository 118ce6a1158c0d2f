"""The MLflow model format of a registered version: a pyfunc that wraps one model folder.

`mlflow.pyfunc.load_model("models:/NAME@production").predict(["great film"])` returns label,
score and a truncation flag per text. The folder itself (see predict.py) travels as the artifact
`model_dir`, so serving can also run it without MLflow (`find_model_folder`). The model is
logged "from code" (pyfunc_model.py), MLflow 3's recommended form, not as a pickled object.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import mlflow.pyfunc

import distilops
from distilops.errors import ModelError
from distilops.predict import META_FILE

ARTIFACT_KEY = "model_dir"  # the model folder's name among the MLflow model's artifacts


def find_model_folder(root: str | Path) -> Path:
    """The model folder inside a downloaded MLflow model (the one directory holding distilops.json)."""
    root = Path(root)
    hits = sorted(p.parent for p in root.rglob(META_FILE))
    if not hits:
        raise ModelError(f"no {META_FILE} under {root}: not a distilops model")
    return hits[0]


def log_model_folder(folder: str | Path, *, name: str = "model", registered_model_name: str | None = None,
                     metadata: dict | None = None) -> mlflow.models.model.ModelInfo:
    """Log `folder` as a pyfunc model in the active run (optionally registering a new version)."""
    package = Path(distilops.__file__).parent
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package / "pyfunc_model.py"),
        artifacts={ARTIFACT_KEY: str(folder)},
        code_paths=[str(package)],
        # Explicit requirements: inferred ones add torchvision, which fails to import beside this torch.
        pip_requirements=[*(f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "transformers", "onnxruntime")),
                          "pandas"],
        registered_model_name=registered_model_name,
        metadata=metadata,
    )
