"""Serving: the model-folder format, raw text -> label inference on ONNX Runtime, the BentoML service.

The import rule: modules here import nothing from distilops but `distilops.errors` and `distilops.settings`
(and each other), and no torch, transformers or MLflow: this package is what the serving images carry
(bentofile.yaml includes the folder whole, and those two modules). tests/test_architecture.py enforces it;
docs/architecture.md explains it.
"""
