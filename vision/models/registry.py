"""The named ParameterNet models and their static twins, registered in timm (`timm.create_model("parameternet_600m")`).

Each ParameterNet is the released extended-GhostNet block list at one width with 4-expert dynamic convolutions; its
static twin (`ghostnet_*`) is the same network and widths with plain convolutions. The `*_tiny_os4` pair is that block
list with total stride ("output stride", in timm's words) 4 instead of 32, for 28-32 px images. No pretrained weights
exist.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from vision.models.parameternet import (
    EXTENDED_GHOSTNET_BLOCKS,
    MIN_INPUT_SIZE,
    SMALL_IMAGE_GHOSTNET_BLOCKS,
    BlockSpec,
    ParameterNet,
    total_stride,
)

# Every registered ParameterNet and its same-FLOPs static twin.
STATIC_TWINS: dict[str, str] = {
    "parameternet_600m": "ghostnet_600m",
    "parameternet_300m": "ghostnet_300m",
    "parameternet_tiny": "ghostnet_tiny",
    "parameternet_tiny_os4": "ghostnet_tiny_os4",
}
MODEL_NAMES: tuple[str, ...] = tuple(name for pair in STATIC_TWINS.items() for name in pair)

# The *_tiny_os4 pair is built on `SMALL_IMAGE_GHOSTNET_BLOCKS`: total stride 4.
SMALL_IMAGE_MODELS = ("parameternet_tiny_os4", "ghostnet_tiny_os4")
SMALL_IMAGE_MIN_INPUT_SIZE = total_stride(SMALL_IMAGE_GHOSTNET_BLOCKS)
# The smallest image each model accepts: its total stride (a smaller one leaves the last stage a sub-pixel map).
MIN_INPUT_SIZES: dict[str, int] = {
    name: SMALL_IMAGE_MIN_INPUT_SIZE if name in SMALL_IMAGE_MODELS else MIN_INPUT_SIZE for name in MODEL_NAMES
}


def check_input_size(img_size: int | tuple[int, int], model_name: str) -> None:
    """Refuse images smaller than one of our models' total stride, before any data is loaded."""
    if model_name not in MIN_INPUT_SIZES:
        raise ValueError(f"check_input_size: {model_name!r} is not one of ours ({', '.join(MODEL_NAMES)})")
    minimum = MIN_INPUT_SIZES[model_name]
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if min(sizes) < minimum:
        raise ValueError(
            f"img_size={img_size} is below the minimum {minimum} of {model_name} (total stride {minimum}); resize "
            f"the images to at least {minimum}x{minimum} (e.g. --img-size {minimum})"
        )


def _cfg(min_input_size: int = MIN_INPUT_SIZE, input_size: int = 224, pool_size: int = 7) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "min_input_size": (3, min_input_size, min_input_size),
        "pool_size": (pool_size, pool_size),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv_stem",
        "classifier": "classifier",
        "license": "apache-2.0",
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
        "parameternet_tiny_os4.untrained": _cfg(SMALL_IMAGE_MIN_INPUT_SIZE, input_size=32, pool_size=8),
        "ghostnet_tiny_os4.untrained": _cfg(SMALL_IMAGE_MIN_INPUT_SIZE, input_size=32, pool_size=8),
    }
)

WIDTH_600M = 1.9
# Not published by the paper: the width of the same block list that lands at about 300 M multiply-adds at 224
# (parameternet_300m: 18.5M parameters, 0.303 G MACs; the static twin 11.1M, 0.293 G; `python -m vision.summary`).
WIDTH_300M = 1.34
# For CPU smoke tests; not a paper model.
WIDTH_TINY = 0.5
# The laptop demo's pair on Fashion-MNIST at 32 px (not a paper model): see `parameternet_tiny_os4`. Narrower than
# tiny because its maps are 64x larger: at 0.35 a training step costs about 1.3x parameternet_tiny's at 32 px.
WIDTH_TINY_OS4 = 0.35


def _create(
    variant: str,
    width: float,
    default_experts: int,
    pretrained: bool,
    block_specs: tuple[tuple[BlockSpec, ...], ...] = EXTENDED_GHOSTNET_BLOCKS,
    **kwargs: Any,
) -> ParameterNet:
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
        block_specs=block_specs,
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


@register_model
def parameternet_tiny_os4(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """The released block list and dynamic-conv placement at width 0.35, 4 experts, with total stride 4 for 28-32 px
    images (`SMALL_IMAGE_GHOSTNET_BLOCKS`): the laptop demo's ParameterNet on Fashion-MNIST. At 32 px it ends on 8x8
    maps (7x7 at 28 px, as the release at 224 px), so the kernel mixing stays a few percent of the multiply-adds:
    1.06x its static twin's at 32 px with 4 experts (`python -m vision.summary --img-size 32 --breakdown`)."""
    return _create("parameternet_tiny_os4", WIDTH_TINY_OS4, 4, pretrained, SMALL_IMAGE_GHOSTNET_BLOCKS, **kwargs)


@register_model
def ghostnet_tiny_os4(pretrained: bool = False, **kwargs: Any) -> ParameterNet:
    """Static twin of parameternet_tiny_os4 (width 0.35, total stride 4, plain convolutions)."""
    return _create("ghostnet_tiny_os4", WIDTH_TINY_OS4, 0, pretrained, SMALL_IMAGE_GHOSTNET_BLOCKS, **kwargs)
