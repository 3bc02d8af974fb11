"""Porting PyTorch weights into cnnjax variables. torch is imported only to read ``.pth`` files."""

from cnnjax.port.torch_state import state_dict_to_variables, torchvision_key
from cnnjax.port.torchvision import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PortError,
    check_state_dict,
    convert,
    load_torchvision,
    read_safetensors,
    read_state_dict,
)

__all__ = ["ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "PortError", "check_state_dict", "convert",
           "load_torchvision", "read_safetensors", "read_state_dict", "state_dict_to_variables", "torchvision_key"]
