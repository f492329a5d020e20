"""Dynamic convolution: a per-sample mixture of expert kernels (the ParameterNet building block).

ParameterNet adds parameters without adding FLOPs by replacing a convolution with `num_experts` kernels that are mixed
per sample before a single convolution runs. The mixing coefficients come from a tiny router on the globally pooled
input, so the extra work is one GAP, one `Linear(in, E)` and one `[B, E] x [E, kernel]` matmul per layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import CondConv2d


class DynamicConv(nn.Module):
    """`out = conv(x, sum_e sigmoid(Linear(GAP(x)))_e * W_e)`, one grouped convolution for the whole batch.

    The per-sample kernels are applied by timm's `CondConv2d`, which folds the batch into the channel axis so that the
    B different kernels run as a single grouped convolution. Routing uses a sigmoid (not a softmax): every expert
    contributes, as in the paper's released network.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | str = "",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        num_experts: int = 4,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"DynamicConv: num_experts={num_experts} must be >= 1 (1 expert = a gated plain conv)")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"DynamicConv: in_channels={in_channels} and out_channels={out_channels} must both be divisible by "
                f"groups={groups}"
            )
        self.routing = nn.Linear(in_channels, num_experts)
        self.cond_conv = CondConv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, num_experts
        )

    @property
    def in_channels(self) -> int:
        return self.cond_conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.cond_conv.out_channels

    @property
    def num_experts(self) -> int:
        return self.cond_conv.num_experts

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, num_experts] mixing coefficients in (0, 1)."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def expert_kernels(self) -> torch.Tensor:
        """The experts as ordinary conv kernels: [E, out, in // groups, kh, kw]."""
        return self.cond_conv.weight.view(self.num_experts, *self.cond_conv.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cond_conv(x, self.routing_weights(x))

    def extra_repr(self) -> str:
        conv = self.cond_conv
        return (
            f"{conv.in_channels}, {conv.out_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}, "
            f"groups={conv.groups}, num_experts={conv.num_experts}"
        )
