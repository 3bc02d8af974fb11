"""Placeholder: the torch twins of the squeezenet family are being written."""

BUILDERS: dict = {}
