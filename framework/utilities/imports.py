"""Availability flags of optional packages, under the names Lightning's examples import
(``from framework.utilities.imports import _TORCHVISION_AVAILABLE``). Checked without importing them."""

from importlib.util import find_spec

_TORCHVISION_AVAILABLE = find_spec("torchvision") is not None
_TENSORBOARD_AVAILABLE = find_spec("tensorboard") is not None
_OMEGACONF_AVAILABLE = find_spec("omegaconf") is not None
_ONNX_AVAILABLE = find_spec("onnx") is not None

__all__ = ["_TORCHVISION_AVAILABLE", "_TENSORBOARD_AVAILABLE", "_OMEGACONF_AVAILABLE", "_ONNX_AVAILABLE"]
