"""Placeholder: the torch twins of the mnasnet family are being written."""

BUILDERS: dict = {}
