"""MLflow "models from code" definition of a registered distilops version (see pyfunc.py).

MLflow runs this file when it loads the model; it must end with `set_model`. Inputs: a list of
texts (or a one-column DataFrame, which MLflow turns into one); outputs: label, score, windows read
and whether the window cap cut the text, per text.
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
    windows: int  # windows of max_length tokens the text was read in
    truncated: bool  # the text needed more windows than the cap: its end was not read


class TextClassifierModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        self.classifier = TextClassifier(context.artifacts[ARTIFACT_KEY])

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[Classification]:
        rows = self.classifier.classify([str(text) for text in model_input])
        return [Classification(label=r.label, score=r.score, windows=r.windows, truncated=r.truncated) for r in rows]


# MLflow runs this file to load the model (never imported by distilops itself): it must end here.
mlflow.models.set_model(TextClassifierModel())
