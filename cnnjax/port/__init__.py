"""Porting PyTorch state dicts into cnnjax variables (numpy only; torch is never imported here)."""

from cnnjax.port.torch_state import state_dict_to_variables, torchvision_key

__all__ = ["state_dict_to_variables", "torchvision_key"]
