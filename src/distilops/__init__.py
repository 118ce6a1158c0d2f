"""distilops: knowledge distillation from training to registry."""

__version__ = "0.1.0"
