"""The release path: the MLflow registry and its gates, packaging a version for BentoML, the serving
image, the Kubernetes deployment. No torch here.

The import rule: modules here import the shared core and `distilops.serving`, never
`distilops.pipeline` (tests/test_architecture.py). The one exception is pyfunc_model.py, which MLflow
runs to load a registered version: a PyTorch version (the fp32 student) needs the pipeline's torch
runtime, imported only when such a version is loaded.
"""
