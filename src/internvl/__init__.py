"""InternVL-Chat model toolkit for MedRegA: model, data, training, inference."""

__version__ = "0.1.0"
