"""Placeholder: the alexnet family is being written (MODELS and WEIGHTS fill in)."""

MODELS: dict = {}
WEIGHTS: dict[str, str] = {}
