"""Placeholder: the torch twins of the shufflenetv2 family are being written."""

BUILDERS: dict = {}
