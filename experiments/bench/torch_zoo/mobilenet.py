"""Placeholder: the torch twins of the mobilenet family are being written."""

BUILDERS: dict = {}
