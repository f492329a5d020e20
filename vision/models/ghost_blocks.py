"""The building blocks of ParameterNet / GhostNet v1: ghost module, ghost bottleneck, 1x1 conv-BN-act.

Every convolution that the paper's release makes dynamic is built by `make_conv`: a `DynamicConv` with `num_experts`
experts, or a plain `nn.Conv2d` when `num_experts=0` (the static twin). The network assembled from these blocks is in
parameternet.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import DropPath, make_divisible
from timm.models._efficientnet_blocks import SqueezeExcite

from vision.models.dynamic_conv import DynamicConv


def make_conv(
    in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, num_experts: int = 0
) -> nn.Module:
    """A bias-free 'same'-padded conv: dynamic with `num_experts` experts, or a plain `nn.Conv2d` when 0."""
    padding = kernel_size // 2
    if num_experts == 0:
        return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
    return DynamicConv(in_chs, out_chs, kernel_size, stride, padding, groups=groups, num_experts=num_experts)


class GhostModule(nn.Module):
    """Half of the output from a 1x1 conv, the other half from a cheap depthwise conv on that half."""

    def __init__(
        self, in_chs: int, out_chs: int, act_layer: type[nn.Module] | None, num_experts: int, dw_size: int = 3
    ) -> None:
        super().__init__()
        self.out_chs = out_chs
        init_chs = math.ceil(out_chs / 2)

        def act() -> nn.Module:
            return act_layer(inplace=True) if act_layer is not None else nn.Identity()

        self.primary_conv = nn.Sequential(
            make_conv(in_chs, init_chs, 1, num_experts=num_experts), nn.BatchNorm2d(init_chs), act()
        )
        self.cheap_operation = nn.Sequential(
            make_conv(init_chs, init_chs, dw_size, groups=init_chs, num_experts=num_experts),
            nn.BatchNorm2d(init_chs),
            act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.out_chs]


class GhostBottleneck(nn.Module):
    """ghost (expand) -> [depthwise stride-2 conv] -> [SE] -> ghost (project) + shortcut."""

    def __init__(
        self,
        in_chs: int,
        mid_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        se_ratio: float,
        act_layer: type[nn.Module],
        num_experts: int,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.ghost1 = GhostModule(in_chs, mid_chs, act_layer, num_experts)
        if stride > 1:
            # Static in the release as well: a depthwise kernel is a tiny share of the parameters.
            self.conv_dw: nn.Module | None = nn.Conv2d(
                mid_chs, mid_chs, kernel_size, stride, kernel_size // 2, groups=mid_chs, bias=False
            )
            self.bn_dw: nn.Module | None = nn.BatchNorm2d(mid_chs)
        else:
            self.conv_dw = None
            self.bn_dw = None
        self.se = (
            SqueezeExcite(
                mid_chs,
                rd_ratio=se_ratio,
                act_layer=act_layer,
                gate_layer="hard_sigmoid",
                rd_round_fn=lambda c: make_divisible(c, 4),
            )
            if se_ratio > 0
            else None
        )
        self.ghost2 = GhostModule(mid_chs, out_chs, None, num_experts)
        if in_chs == out_chs and stride == 1:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                make_conv(in_chs, in_chs, kernel_size, stride, groups=in_chs, num_experts=num_experts),
                nn.BatchNorm2d(in_chs),
                make_conv(in_chs, out_chs, 1, num_experts=num_experts),
                nn.BatchNorm2d(out_chs),
            )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ghost1(x)
        if self.conv_dw is not None and self.bn_dw is not None:
            out = self.bn_dw(self.conv_dw(out))
        if self.se is not None:
            out = self.se(out)
        out = self.ghost2(out)
        return self.shortcut(x) + self.drop_path(out)


class ConvBnAct(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module], num_experts: int) -> None:
        super().__init__()
        self.conv = make_conv(in_chs, out_chs, 1, num_experts=num_experts)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv(x)))
