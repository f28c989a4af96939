"""Squeeze-and-Excitation (Hu et al., CVPR 2018, arXiv 1709.01507).

Same parameter names and shapes as timm's ``SEModule`` (``fc1``/``fc2`` 1x1 convolutions), so
its state dicts load strictly.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerType, create_act_layer, make_divisible
from torch import nn

from mmattn.registry import MODELS

from .checks import (check_flag, check_input, check_positive, concrete_annotations,
                     factory_kwargs, is_number)

__all__ = ['SqueezeExcitation']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')


def make_act(value: LayerType, name: str, block: str, inplace: bool | None = None) -> nn.Module:
    """``timm.layers.create_act_layer(value)``, with a ValueError naming the argument for an
    unknown activation name or for ``None``/``''`` (a gate or activation is required here)."""
    layer = None
    if isinstance(value, str) or callable(value):  # timm would call an int, a tuple, ...
        try:
            layer = create_act_layer(value, inplace=inplace)
        except KeyError:
            pass
    if layer is None:
        raise ValueError(f'{block}: {name} must be a timm activation name (e.g. \'sigmoid\') or '
                         f'an nn.Module class, got {value!r}')
    return layer


def reduced_channels(in_channels: int, rd_ratio: float, rd_channels: int | None,
                     rd_divisor: int, block: str) -> int:
    """Width of a reduction MLP: ``rd_channels`` if given, else timm's
    ``make_divisible(in_channels * rd_ratio, rd_divisor, round_limit=0.)`` (as ``SEModule`` and
    ``CbamModule`` compute it). Validates the three knobs."""
    if rd_channels is not None:
        return check_positive('rd_channels', rd_channels, block)
    if not is_number(rd_ratio) or not rd_ratio > 0:
        raise ValueError(f'{block}: rd_ratio must be a number > 0, got {rd_ratio!r}')
    check_positive('rd_divisor', rd_divisor, block)
    return int(make_divisible(in_channels * rd_ratio, rd_divisor, round_limit=0.))


@MODELS.register_module()
class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation block (arXiv 1709.01507, Eq. 2-4).

    .. math::
        z_c = \\frac{1}{HW}\\sum_{i,j} x_c(i, j) \\quad (2) \\qquad
        s = \\sigma(W_2\\,\\delta(W_1 z)) \\quad (3) \\qquad
        \\tilde{x}_c = s_c \\cdot x_c \\quad (4)

    ``W_1`` (``fc1``) maps C to the reduced width, ``W_2`` (``fc2``) back to C; both are 1x1
    convolutions with bias, as in timm's ``SEModule``, whose state dicts load strictly.
    ``self.gate`` is the sigma module: a forward hook on it captures ``s``.

    Args:
        in_channels: Channels C of the input.
        rd_ratio: Reduction ratio 1/r (the paper uses r=16).
        rd_channels: Reduced width; overrides ``rd_ratio``/``rd_divisor`` when given.
        rd_divisor: The reduced width is rounded to a multiple of this (timm ``make_divisible``).
        act_layer: delta; a timm activation name or an ``nn.Module`` class/callable.
        gate_layer: sigma; a timm activation name or an ``nn.Module`` class/callable.
        bias: Whether ``fc1``/``fc2`` have biases.
    """

    _abbr_ = 'se'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, rd_ratio: float = 1. / 16,
                 rd_channels: int | None = None, rd_divisor: int = 8,
                 act_layer: LayerType = 'relu', gate_layer: LayerType = 'sigmoid',
                 bias: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        self.in_channels = check_positive('in_channels', in_channels, name)
        self.rd_channels = reduced_channels(in_channels, rd_ratio, rd_channels, rd_divisor, name)
        bias = check_flag('bias', bias, name)
        dd = factory_kwargs(device, dtype)
        self.fc1 = nn.Conv2d(in_channels, self.rd_channels, 1, bias=bias, **dd)
        self.act = make_act(act_layer, 'act_layer', name, inplace=True)
        self.fc2 = nn.Conv2d(self.rd_channels, in_channels, 1, bias=bias, **dd)
        self.gate = make_act(gate_layer, 'gate_layer', name)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale each channel of ``x`` (N, C, H, W) by its excitation ``s`` (N, C, 1, 1)."""
        check_input(x, self.in_channels, self.block_name)
        z = x.mean((2, 3), keepdim=True)
        s = self.gate(self.fc2(self.act(self.fc1(z))))
        return x * s
