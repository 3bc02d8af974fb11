"""Placeholder: the torch twins of the convnext family are being written."""

BUILDERS: dict = {}
