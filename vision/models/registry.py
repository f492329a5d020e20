"""The named ParameterNet models and their static twins, registered in timm (`timm.create_model("parameternet_600m")`).

Each ParameterNet is the released extended-GhostNet block list at one width with 4-expert dynamic convolutions; its
static twin (`ghostnet_*`) is the same network and widths with plain convolutions. No pretrained weights exist.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from vision.models.parameternet import EXTENDED_GHOSTNET_BLOCKS, MIN_INPUT_SIZE, ParameterNet

# Every registered ParameterNet and its same-FLOPs static twin.
STATIC_TWINS: dict[str, str] = {
    "parameternet_600m": "ghostnet_600m",
    "parameternet_300m": "ghostnet_300m",
    "parameternet_tiny": "ghostnet_tiny",
}
MODEL_NAMES: tuple[str, ...] = tuple(name for pair in STATIC_TWINS.items() for name in pair)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "min_input_size": (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_stem",
        "classifier": "classifier",
        "license": "apache-2.0",
        **kwargs,
    }


# timm's `register_model` reads this module attribute to attach a pretrained config to each registered name.
default_cfgs = generate_default_cfgs(
    {
        "parameternet_600m.untrained": _cfg(),
        "parameternet_300m.untrained": _cfg(),
        "parameternet_tiny.untrained": _cfg(),
        "ghostnet_600m.untrained": _cfg(),
        "ghostnet_300m.untrained": _cfg(),
        "ghostnet_tiny.untrained": _cfg(),
    }
)

WIDTH_600M = 1.9
# Not published by the paper: the width of the same block list that lands at about 300 M multiply-adds at 224
# (parameternet_300m: 18.5M parameters, 0.303 G MACs; the static twin 11.1M, 0.293 G; `python -m vision.summary`).
WIDTH_300M = 1.34
# For CPU smoke tests and the laptop demo; not a paper model.
WIDTH_TINY = 0.5


def _create(variant: str, width: float, default_experts: int, pretrained: bool, **kwargs: Any) -> ParameterNet:
    if pretrained:
        raise ValueError(
            f"{variant}: pretrained=True, but no pretrained weights are published for this model; train one with "
            f"`bash launch/train_vision.sh` and load it with `vision.train` --init-from"
        )
    if default_experts == 0 and kwargs.get("num_experts", 0) != 0:
        raise ValueError(
            f"{variant} is the static twin (plain convolutions): num_experts={kwargs['num_experts']} is not accepted; "
            f"use the parameternet_* model of the same size for dynamic convolutions"
        )
    kwargs.setdefault("num_experts", default_experts)
    return build_model_with_cfg(
        ParameterNet,
        variant,
        pretrained=False,
        feature_cfg=dict(flatten_sequential=True),
        block_specs=EXTENDED_GHOSTNET_BLOCKS,
        width=width,
        **kwargs,
    )


@register_model
def parameternet_600m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """ParameterNet-600M as released: extended GhostNet, width 1.9, Hardswish, 4-expert dynamic convs.

    34.5M parameters and 0.590 G multiply-adds at 224x224 (its static twin ghostnet_600m: 19.8M, 0.570 G).
    """
    return _create("parameternet_600m", WIDTH_600M, 4, pretrained, **kwargs)


@register_model
def parameternet_300m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """ParameterNet-300M. The paper does not publish its configuration: this is the released 600M block list at
    width 1.34 (chosen here), which lands at about 0.30 G multiply-adds (18.5M parameters) at 224x224 with 4-expert
    dynamic convs."""
    return _create("parameternet_300m", WIDTH_300M, 4, pretrained, **kwargs)


@register_model
def parameternet_tiny(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """Width 0.5 of the same block list, 4 experts: for CPU smoke runs (not a paper model)."""
    return _create("parameternet_tiny", WIDTH_TINY, 4, pretrained, **kwargs)


@register_model
def ghostnet_600m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """Static twin of parameternet_600m: the same network and widths with plain convolutions."""
    return _create("ghostnet_600m", WIDTH_600M, 0, pretrained, **kwargs)


@register_model
def ghostnet_300m(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """Static twin of parameternet_300m (width 1.34, plain convolutions)."""
    return _create("ghostnet_300m", WIDTH_300M, 0, pretrained, **kwargs)


@register_model
def ghostnet_tiny(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """Static twin of parameternet_tiny (width 0.5, plain convolutions)."""
    return _create("ghostnet_tiny", WIDTH_TINY, 0, pretrained, **kwargs)
