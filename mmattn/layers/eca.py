"""Efficient Channel Attention (Wang et al., CVPR 2020, arXiv 1910.03151).

Same parameter name and shape as the official release (BangguWu/ECANet) and timm's
``EcaModule``: one bias-free ``Conv1d(1, 1, k)`` named ``conv``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import LayerType
from torch import nn

from mmattn.registry import MODELS

from .checks import check_input, check_positive, concrete_annotations, factory_kwargs, is_number
from .squeeze_excite import make_act

__all__ = ['EfficientChannelAttention', 'eca_kernel_size']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The adaptive kernel size of ECA, Eq. 12: ``k = |log2(C)/gamma + b/gamma|_odd``.

    ``|t|_odd`` is the odd number nearest to ``t``; as in the official release it is computed
    as ``floor(t)``, plus one when that is even (so ties round up: t=4 -> 5). Unlike timm's
    ``EcaModule`` there is no lower clamp at 3: C <= 7 gives k=1 (from the formula).
    """
    t = int(abs((math.log2(channels) + beta) / gamma))
    return t if t % 2 else t + 1


@MODELS.register_module()
class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (ECA) block (arXiv 1910.03151, Eq. 9 and 12).

    .. math::
        y = \\mathrm{GAP}(x), \\qquad \\omega = \\sigma(\\mathrm{C1D}_k(y)), \\qquad
        \\tilde{x}_c = \\omega_c\\, x_c, \\qquad
        k = \\psi(C) = \\left|\\frac{\\log_2 C}{\\gamma} + \\frac{b}{\\gamma}\\right|_{odd}

    ``C1D_k`` is a bias-free 1-D convolution across the channel axis with zero padding
    ``(k-1)/2`` (``self.conv``, as in the official release and timm's ``EcaModule``).
    ``self.gate`` is the sigma module: a forward hook on it captures ``omega`` (N, 1, C).
    timm's ``EcaModule`` state dicts load strictly for C >= 8; below that timm clamps k to 3
    where Eq. 12 gives 1 (pass ``kernel_size=3`` to load those).

    Args:
        in_channels: Channels C of the input.
        kernel_size: A fixed odd kernel size k; ``None`` (default) takes ``psi(C)`` (Eq. 12).
        gamma: gamma of Eq. 12 (the paper uses 2).
        beta: b of Eq. 12 (the paper uses 1).
        gate_layer: sigma; a timm activation name or an ``nn.Module`` class/callable.
    """

    _abbr_ = 'eca'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, kernel_size: int | None = None, gamma: float = 2,
                 beta: float = 1, gate_layer: LayerType = 'sigmoid', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        self.in_channels = check_positive('in_channels', in_channels, name)
        if kernel_size is None:
            if not is_number(gamma) or not gamma > 0:
                raise ValueError(f'{name}: gamma must be a number > 0, got {gamma!r}')
            if not is_number(beta):
                raise ValueError(f'{name}: beta must be a number, got {beta!r}')
            kernel_size = eca_kernel_size(in_channels, gamma, beta)
        check_positive('kernel_size', kernel_size, name)
        if kernel_size % 2 != 1:
            raise ValueError(f'{name}: kernel_size must be an odd integer >= 1, '
                             f'got {kernel_size!r}')
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False,
                              **factory_kwargs(device, dtype))
        self.gate = make_act(gate_layer, 'gate_layer', name)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale each channel of ``x`` (N, C, H, W) by ``omega``."""
        check_input(x, self.in_channels, self.block_name)
        y = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C): channels are the 1-D conv's length axis
        w = self.gate(self.conv(y))
        return x * w.transpose(1, 2).unsqueeze(-1)
