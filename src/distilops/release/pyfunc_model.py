"""MLflow "models from code" definition of a registered distilops version (see pyfunc.py).

MLflow runs this file when it loads the model; it must end with `set_model`. Inputs: a list of
texts (or a one-column DataFrame, which MLflow turns into one); outputs: one
`serving.inference.Classification` per text (label, score, windows read, truncated).

An ONNX version loads with the serving package alone; a PyTorch one (the fp32 student) needs the
pipeline's torch runtime, imported only then: the one import from release into pipeline
(docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

from distilops.release.pyfunc import ARTIFACT_KEY
from distilops.serving.folder import detect_format
from distilops.serving.inference import Classification, TextClassifier


class TextClassifierModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        folder = context.artifacts[ARTIFACT_KEY]
        if detect_format(folder) == "onnx":
            self.classifier = TextClassifier(folder)
        else:
            from distilops.pipeline.torch_model import open_classifier  # torch: PyTorch versions only

            self.classifier = open_classifier(folder)

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[Classification]:
        return self.classifier.classify([str(text) for text in model_input])


# MLflow runs this file to load the model (never imported by distilops itself): it must end here.
mlflow.models.set_model(TextClassifierModel())
