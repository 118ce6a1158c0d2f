"""The MLflow model format of a registered version: a pyfunc that wraps one model folder.

`mlflow.pyfunc.load_model("models:/NAME@production").predict(["great film"])` returns a
DataFrame of label/score; the folder itself (see predict.py) travels as the artifact
`model_dir`, so serving can also run it without MLflow (`find_model_folder`).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from distilops.predict import META_FILE

ARTIFACT_KEY = "model_dir"


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from distilops.predict import TextClassifier

        self.classifier = TextClassifier(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (MLflow's signature)
        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        rows = self.classifier.classify(texts)
        return pd.DataFrame({"label": [r.label for r in rows], "score": [r.score for r in rows]})


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

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=TextClassifierModel(),
        artifacts={ARTIFACT_KEY: str(folder)},
        code_paths=[str(Path(distilops.__file__).parent)],
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
