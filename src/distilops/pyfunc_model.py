"""MLflow "models from code" definition of a registered distilops version (see pyfunc.py).

MLflow runs this file when it loads the model; it must end with `set_model`. Inputs: a list of
texts (or a one-column DataFrame, which MLflow turns into one); outputs: label and score per text.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext
from pydantic import BaseModel

from distilops.predict import TextClassifier
from distilops.pyfunc import ARTIFACT_KEY


class Classification(BaseModel):
    label: str
    score: float
    truncated: bool  # the text was longer than the model's window and was cut


class TextClassifierModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = TextClassifier(context.artifacts[ARTIFACT_KEY])

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[Classification]:
        rows = self.classifier.classify([str(text) for text in model_input])
        return [Classification(label=r.label, score=r.score, truncated=r.truncated) for r in rows]


# MLflow runs this file to load the model (never imported by distilops itself): it must end here.
mlflow.models.set_model(TextClassifierModel())
