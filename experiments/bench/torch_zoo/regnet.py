"""Placeholder: the torch twins of the regnet family are being written."""

BUILDERS: dict = {}
