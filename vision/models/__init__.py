"""ParameterNet CNNs and their static twins; importing this registers them in timm's model registry."""

from vision.models.dynamic_conv import DynamicConv
from vision.models.parameternet import (
    EXTENDED_GHOSTNET_BLOCKS,
    MIN_INPUT_SIZE,
    BlockSpec,
    ParameterNet,
    check_input_size,
)
from vision.models.registry import MODEL_NAMES, STATIC_TWINS

__all__ = [
    "BlockSpec",
    "DynamicConv",
    "EXTENDED_GHOSTNET_BLOCKS",
    "MIN_INPUT_SIZE",
    "MODEL_NAMES",
    "ParameterNet",
    "STATIC_TWINS",
    "check_input_size",
]
