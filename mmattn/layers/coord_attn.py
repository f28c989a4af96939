"""Coordinate Attention (Hou et al., CVPR 2021, arXiv 2103.02907).

State-dict keys are exactly those of the official release (Andrew-Qibin/CoordAttention,
``coordatt.py``: ``conv1``, ``bn1``, ``conv_h``, ``conv_w``), so its checkpoints load strictly.
"""
from __future__ import annotations

from typing import Any

import torch
from mmcv.cnn import build_norm_layer
from timm.layers import LayerType
from torch import nn

from mmattn.registry import MODELS

from .checks import (check_input, check_norm_cfg, check_positive, concrete_annotations,
                     factory_kwargs)
from .squeeze_excite import make_act

__all__ = ['CoordinateAttention']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')


@MODELS.register_module()
class CoordinateAttention(nn.Module):
    """Coordinate Attention block (arXiv 2103.02907, Eq. 4-9).

    .. math::
        z^h_c(h) = \\frac{1}{W}\\sum_{i} x_c(h, i) \\quad (4) \\qquad
        z^w_c(w) = \\frac{1}{H}\\sum_{j} x_c(j, w) \\quad (5)

        f = \\delta(\\mathrm{BN}(F_1([z^h, z^w]))) \\quad (6)

        g^h = \\sigma(F_h(f^h)) \\quad (7) \\qquad g^w = \\sigma(F_w(f^w)) \\quad (8)

        y_c(i, j) = x_c(i, j) \\times g^h_c(i) \\times g^w_c(j) \\quad (9)

    ``F_1`` (``conv1``), ``F_h`` (``conv_h``), ``F_w`` (``conv_w``) are 1x1 convolutions with
    bias; ``f`` is split along the spatial axis into ``f^h`` (H) and ``f^w`` (W). The hidden width
    is ``max(min_channels, C // reduction)`` and delta is h-swish, as in the official release
    (whose checkpoints load strictly: keys ``conv1``, ``bn1``, ``conv_h``, ``conv_w``).
    ``gate_h`` and ``gate_w`` are the two sigma modules: forward hooks on them capture
    ``g^h`` (N, C, H, 1) and ``g^w`` (N, C, 1, W).

    Args:
        in_channels: Channels C.
        reduction: Reduction ratio r (32 in the official release).
        min_channels: Lower bound of the hidden width (8 in the official release).
        norm_cfg: mmcv norm config for ``bn1``; ``None`` means ``dict(type='BN')`` (BatchNorm2d,
            as in the official release). E.g. ``dict(type='SyncBN')`` for multi-GPU training.
        act_layer: delta; a timm activation name or class/callable (h-swish).
        gate_layer: sigma of both gates; a timm activation name or class/callable.
    """

    _abbr_ = 'coord_attn'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, reduction: int = 32, min_channels: int = 8,
                 norm_cfg: dict | None = None, act_layer: LayerType = 'hard_swish',
                 gate_layer: LayerType = 'sigmoid', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        self.in_channels = check_positive('in_channels', in_channels, name)
        check_positive('reduction', reduction, name)
        check_positive('min_channels', min_channels, name)
        check_norm_cfg('norm_cfg', norm_cfg, name)
        self.mid_channels = max(min_channels, in_channels // reduction)
        dd = factory_kwargs(device, dtype)
        self.conv1 = nn.Conv2d(in_channels, self.mid_channels, 1, **dd)
        self.bn1 = build_norm_layer(norm_cfg or dict(type='BN'), self.mid_channels)[1].to(**dd)
        self.act = make_act(act_layer, 'act_layer', name)
        self.conv_h = nn.Conv2d(self.mid_channels, in_channels, 1, **dd)
        self.conv_w = nn.Conv2d(self.mid_channels, in_channels, 1, **dd)
        self.gate_h = make_act(gate_layer, 'gate_layer', name)
        self.gate_w = make_act(gate_layer, 'gate_layer', name)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * g^h * g^w`` for ``x`` of shape (N, C, H, W)."""
        check_input(x, self.in_channels, self.block_name)
        h, w = x.shape[2], x.shape[3]
        z_h = x.mean(3, keepdim=True)                  # (N, C, H, 1), Eq. 4
        z_w = x.mean(2, keepdim=True).transpose(2, 3)  # (N, C, W, 1), Eq. 5
        f = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))  # Eq. 6
        f_h, f_w = torch.split(f, [h, w], dim=2)
        g_h = self.gate_h(self.conv_h(f_h))                    # (N, C, H, 1), Eq. 7
        g_w = self.gate_w(self.conv_w(f_w.transpose(2, 3)))    # (N, C, 1, W), Eq. 8
        return x * g_h * g_w                                   # Eq. 9
