"""Placeholder: the torch twins of the alexnet family are being written."""

BUILDERS: dict = {}
