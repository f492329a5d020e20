"""ParameterNet CNNs and their static twins; importing this registers them in timm's model registry."""

from vision.models.dynamic_conv import DynamicConv
from vision.models.parameternet import (
    EXTENDED_GHOSTNET_BLOCKS,
    MIN_INPUT_SIZE,
    BlockSpec,
    ParameterNet,
    check_input_size,
)

# Every registered ParameterNet and its same-FLOPs static twin.
STATIC_TWINS: dict[str, str] = {
    "parameternet_600m": "ghostnet_600m",
    "parameternet_300m": "ghostnet_300m",
    "parameternet_tiny": "ghostnet_tiny",
}
MODEL_NAMES: tuple[str, ...] = tuple(name for pair in STATIC_TWINS.items() for name in pair)

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
