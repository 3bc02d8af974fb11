"""Placeholder: the torch twins of the efficientnet family are being written."""

BUILDERS: dict = {}
