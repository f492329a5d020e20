"""ParameterNet CNNs and their static twins; importing this registers them in timm's model registry."""

from vision.models.dynamic_conv import DynamicConv
from vision.models.parameternet import (
    EXTENDED_GHOSTNET_BLOCKS,
    MIN_INPUT_SIZE,
    BlockSpec,
    ParameterNet,
)
from vision.models.registry import MIN_INPUT_SIZES, MODEL_NAMES, STATIC_TWINS, check_input_size

__all__ = [
    "BlockSpec",
    "DynamicConv",
    "EXTENDED_GHOSTNET_BLOCKS",
    "MIN_INPUT_SIZE",
    "MIN_INPUT_SIZES",
    "MODEL_NAMES",
    "ParameterNet",
    "STATIC_TWINS",
    "check_input_size",
]
