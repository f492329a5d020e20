"""ParameterNet CNNs (Han et al., CVPR 2024) and their static GhostNet twins: the network.

The network is GhostNet v1 (ghost modules = a primary conv plus a cheap depthwise conv, squeeze-excite, ghost
bottlenecks) on the *extended* block list of the paper's released `parameternet.py`, with Hardswish activations and
every convolution that the release makes dynamic built as a `DynamicConv`: the stem, both convs of every ghost module,
both shortcut convs and the final 1x1 conv. The stride-2 depthwise conv inside a bottleneck, the squeeze-excite convs
and the 1280-wide `conv_head` stay static, as in the release. `num_experts=0` builds the same network with plain
convolutions: the same-FLOPs baseline the paper compares against.

Differences from the release, on purpose: it runs on current timm (`timm.layers`, `build_model_with_cfg`,
`register_model`), `reset_classifier` sizes the new head from the 1280-wide head (the release used the pre-head width
and produced a classifier that could not run), stochastic depth is spread per block rather than per stage, and there
are no debug prints or global config.

The blocks are in ghost_blocks.py; the named, timm-registered models (widths, expert counts) in registry.py.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Linear, SelectAdaptivePool2d, make_divisible
from timm.models._manipulate import checkpoint_seq

from vision.models.ghost_blocks import ConvBnAct, GhostBottleneck, make_conv

__all__ = [
    "BlockSpec",
    "EXTENDED_GHOSTNET_BLOCKS",
    "MIN_INPUT_SIZE",
    "ParameterNet",
    "SMALL_IMAGE_GHOSTNET_BLOCKS",
    "total_stride",
]

# Five stride-2 stages (stem and four blocks): below 32 px the last stage would see a sub-pixel feature map.
MIN_INPUT_SIZE = 32
HEAD_CHANNELS = 1280
STEM_STRIDE = 2


class BlockSpec(NamedTuple):
    kernel_size: int  # depthwise kernel of the stride-2 conv and the shortcut
    mid_channels: int  # ghost bottleneck expansion width (before the width multiplier)
    out_channels: int
    se_ratio: float  # 0 = no squeeze-excite
    stride: int


def _blocks(*specs: tuple[int, int, int, float, int]) -> tuple[BlockSpec, ...]:
    return tuple(BlockSpec(*s) for s in specs)


# The released ParameterNet-600M block list: GhostNet v1's list extended by one block in stage 3, one in stage 4 and
# one in stage 5, with 3x3 kernels in the stride-1 blocks of stages 3 and 5. Each inner tuple is one entry of
# `model.blocks` (the release's grouping; it sets the feature taps and the depth used by layer-wise LR decay).
EXTENDED_GHOSTNET_BLOCKS: tuple[tuple[BlockSpec, ...], ...] = (
    _blocks((3, 16, 16, 0.0, 1)),
    _blocks((3, 48, 24, 0.0, 2)),
    _blocks((3, 72, 24, 0.0, 1)),
    _blocks((5, 72, 40, 0.25, 2)),
    _blocks((3, 120, 40, 0.25, 1), (3, 120, 40, 0.25, 1)),
    _blocks((3, 240, 80, 0.0, 2)),
    _blocks(
        (3, 200, 80, 0.0, 1),
        (3, 200, 80, 0.0, 1),
        (3, 200, 80, 0.0, 1),
        (3, 480, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
        (3, 672, 112, 0.25, 1),
    ),
    _blocks((5, 672, 160, 0.25, 2)),
    _blocks(*[(3, 960, 160, 0.25, 1)] * 5),
)


def _without_stride(groups: tuple[tuple[BlockSpec, ...], ...], *indices: int) -> tuple[tuple[BlockSpec, ...], ...]:
    return tuple(
        tuple(spec._replace(stride=1) for spec in group) if i in indices else group for i, group in enumerate(groups)
    )


# The same block list for 28-32 px images (Fashion-MNIST): only the stem and entry 5 keep their stride 2 (the
# stride-2 of entries 1, 3 and 7 becomes 1), so the total stride is 4 instead of 32 and a 28 px image ends on 7x7
# maps, as a 224 px image does in the release (32 px: 8x8). ParameterNet's premise needs this: a dynamic conv with
# E experts adds E x (kernel size) multiply-adds per image for the kernel mixing, against (kernel size) x (output
# pixels) for the convolution itself, i.e. E / (H x W) of the layer's cost, and most kernel parameters sit in the
# last stage. With the released strides a 32 px image ends on 1x1 maps, where the mixing costs E times the convolution.
SMALL_IMAGE_GHOSTNET_BLOCKS: tuple[tuple[BlockSpec, ...], ...] = _without_stride(EXTENDED_GHOSTNET_BLOCKS, 1, 3, 7)


def total_stride(block_specs: tuple[tuple[BlockSpec, ...], ...]) -> int:
    """The input-to-output downsampling of a network built from `block_specs` (the stem's stride 2 included): the
    smallest image it accepts."""
    return math.prod((STEM_STRIDE, *(spec.stride for group in block_specs for spec in group)))


class ParameterNet(nn.Module):
    """GhostNet on a block list, with dynamic convolutions (`num_experts >= 1`) or plain ones (`num_experts=0`).

    Args:
        block_specs: outer tuples become the entries of `self.blocks` (see `EXTENDED_GHOSTNET_BLOCKS`).
        width: channel multiplier applied to every block width (rounded to a multiple of 4).
        num_experts: experts per dynamic convolution; 0 builds the static twin with plain convolutions.
    """

    def __init__(
        self,
        block_specs: tuple[tuple[BlockSpec, ...], ...] = EXTENDED_GHOSTNET_BLOCKS,
        num_classes: int = 1000,
        width: float = 1.0,
        in_chans: int = 3,
        num_experts: int = 4,
        act_layer: type[nn.Module] = nn.Hardswish,
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        output_stride: int | None = None,
    ) -> None:
        super().__init__()
        self.total_stride = total_stride(block_specs)
        # timm passes output_stride when building feature extractors; only the undilated network exists here.
        if output_stride is not None and output_stride != self.total_stride:
            raise ValueError(
                f"ParameterNet: output_stride={output_stride} is not supported (only {self.total_stride}, the total "
                f"stride of this block list: no dilation)"
            )
        if num_experts < 0:
            raise ValueError(f"ParameterNet: num_experts={num_experts} must be >= 1, or 0 for the static twin")
        if width <= 0:
            raise ValueError(f"ParameterNet: width={width} must be > 0")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_experts = num_experts
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs = make_divisible(16 * width, 4)
        self.conv_stem = make_conv(in_chans, stem_chs, 3, stride=STEM_STRIDE, num_experts=num_experts)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=STEM_STRIDE, module="conv_stem")]

        num_blocks = sum(len(group) for group in block_specs)
        drop_path_rates = torch.linspace(0, drop_path_rate, num_blocks).tolist()
        prev_chs, net_stride, block_idx = stem_chs, STEM_STRIDE, 0
        groups: list[nn.Module] = []
        for group_idx, group in enumerate(block_specs):
            layers = []
            for spec in group:
                out_chs = make_divisible(spec.out_channels * width, 4)
                mid_chs = make_divisible(spec.mid_channels * width, 4)
                layers.append(
                    GhostBottleneck(
                        prev_chs,
                        mid_chs,
                        out_chs,
                        spec.kernel_size,
                        spec.stride,
                        spec.se_ratio,
                        act_layer,
                        num_experts,
                        drop_path_rates[block_idx],
                    )
                )
                prev_chs = out_chs
                block_idx += 1
            if group[-1].stride > 1:
                net_stride *= 2
                self.feature_info.append(dict(num_chs=prev_chs, reduction=net_stride, module=f"blocks.{group_idx}"))
            groups.append(nn.Sequential(*layers))
        final_chs = make_divisible(block_specs[-1][-1].mid_channels * width, 4)
        groups.append(nn.Sequential(ConvBnAct(prev_chs, final_chs, act_layer, num_experts)))
        self.blocks = nn.Sequential(*groups)
        self.num_features = final_chs
        self.head_hidden_size = HEAD_CHANNELS

        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = nn.Conv2d(final_chs, HEAD_CHANNELS, 1, bias=True)
        self.act2 = act_layer(inplace=True)
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier: nn.Module = Linear(HEAD_CHANNELS, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # One depth per entry of `blocks` (the release's grouping) for both granularities: with a per-bottleneck depth
        # a layer decay of 0.5 would scale the stem's LR by 0.5**23, i.e. freeze it.
        return dict(stem=r"^conv_stem|bn1", blocks=[(r"^blocks\.(\d+)", None), (r"conv_head", (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        device = self.conv_head.weight.device
        self.classifier = (
            Linear(self.head_hidden_size, num_classes, device=device) if num_classes > 0 else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x, flatten=True)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.act2(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
