"""Placeholder: the torch twins of the googlenet family are being written."""

BUILDERS: dict = {}
