"""Placeholder: the torch twins of the densenet family are being written."""

BUILDERS: dict = {}
