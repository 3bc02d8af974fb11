"""Placeholder: the torch twins of the inception family are being written."""

BUILDERS: dict = {}
