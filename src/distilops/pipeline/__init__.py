"""The training pipeline: data, assets, training, losses, tuning, teacher outputs, quantization,
evaluation. torch lives here. The DVC stages (stages/*.py) call into it.

The import rule: modules here import the shared core (distilops.config, paths, ...) and
`distilops.serving`, never `distilops.release` (tests/test_architecture.py).
"""
