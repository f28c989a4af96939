"""Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

Parameter names follow timm's ``CbamModule``: ``channel.fc1``/``channel.fc2`` (the shared MLP)
and ``spatial.conv.conv`` (+ ``spatial.conv.bn`` with ``spatial_norm_cfg=dict(type='BN')``), so
timm CBAM state dicts load strictly with ``CBAM(C, spatial_norm_cfg=dict(type='BN'))``.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerType
from torch import nn

from mmattn.registry import MODELS

from .bricks import ScriptableConvModule
from .checks import (check_flag, check_input, check_norm_cfg, check_positive,
                     concrete_annotations, errors_named_as, factory_kwargs)
from .squeeze_excite import make_act, reduced_channels

__all__ = ['CBAM', 'CBAMChannelGate', 'CBAMSpatialGate']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')


class CBAMChannelGate(nn.Module):
    """CBAM channel attention, Eq. 2: ``M_c(F) = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F)))``,
    output ``M_c(F) * F``. ``MLP = W_1 delta(W_0 .)`` is shared by both pooled descriptors;
    ``self.gate`` (sigma) is where a forward hook captures ``M_c`` (N, C, 1, 1).

    Args:
        in_channels: Channels C.
        rd_ratio, rd_channels, rd_divisor: Hidden width of the MLP (C/r, r=16 in the paper).
        act_layer: delta (ReLU in the paper); a timm activation name or class/callable.
        gate_layer: sigma; a timm activation name or class/callable.
        mlp_bias: Biases in the MLP (Eq. 2 has none; timm's default is False).
    """

    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, rd_ratio: float = 1. / 16,
                 rd_channels: int | None = None, rd_divisor: int = 1,
                 act_layer: LayerType = 'relu', gate_layer: LayerType = 'sigmoid',
                 mlp_bias: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        self.in_channels = check_positive('in_channels', in_channels, name)
        self.rd_channels = reduced_channels(in_channels, rd_ratio, rd_channels, rd_divisor, name)
        mlp_bias = check_flag('mlp_bias', mlp_bias, name)
        dd = factory_kwargs(device, dtype)
        self.fc1 = nn.Conv2d(in_channels, self.rd_channels, 1, bias=mlp_bias, **dd)
        self.act = make_act(act_layer, 'act_layer', name, inplace=True)
        self.fc2 = nn.Conv2d(self.rd_channels, in_channels, 1, bias=mlp_bias, **dd)
        self.gate = make_act(gate_layer, 'gate_layer', name)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M_c(x) * x`` for ``x`` of shape (N, C, H, W)."""
        check_input(x, self.in_channels, self.block_name)
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(avg + mx)


class CBAMSpatialGate(nn.Module):
    """CBAM spatial attention, Eq. 3: ``M_s(F) = sigma(f^{kxk}([AvgPool(F); MaxPool(F)]))`` with
    both poolings across channels, output ``M_s(F) * F``. ``self.gate`` (sigma) is where a
    forward hook captures ``M_s`` (N, 1, H, W).

    ``f^{kxk}`` is an mmcv ``ConvModule`` (keys ``conv.conv.*``, ``conv.bn.*``; the
    :class:`~mmattn.layers.bricks.ScriptableConvModule` form of it) with "same" zero
    padding: without a norm (``norm_cfg=None``, Eq. 3) the conv has a bias; with
    ``norm_cfg=dict(type='BN')`` it is conv (no bias) + BN as in the official release and timm.

    Args:
        kernel_size: Odd kernel size k (7 in the paper).
        norm_cfg: mmcv norm config after the conv, or ``None``.
        gate_layer: sigma; a timm activation name or class/callable.
    """

    __constants__ = ['block_name']

    def __init__(self, *, kernel_size: int = 7, norm_cfg: dict | None = None,
                 gate_layer: LayerType = 'sigmoid', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_positive('kernel_size', kernel_size, name)
        if kernel_size % 2 != 1:
            raise ValueError(f'{name}: kernel_size must be an odd integer >= 1, '
                             f'got {kernel_size!r}')
        check_norm_cfg('norm_cfg', norm_cfg, name)
        self.kernel_size = kernel_size
        self.conv = ScriptableConvModule(2, 1, kernel_size, padding=kernel_size // 2,
                                         norm_cfg=norm_cfg,
                                         act_cfg=None).to(**factory_kwargs(device, dtype))
        self.gate = make_act(gate_layer, 'gate_layer', name)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M_s(x) * x`` for ``x`` of shape (N, C, H, W), any C."""
        check_input(x, None, self.block_name)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(pooled))


@MODELS.register_module()
class CBAM(nn.Module):
    """Convolutional Block Attention Module (arXiv 1807.06521, Eq. 1-3).

    .. math::
        F' = M_c(F) \\otimes F, \\qquad F'' = M_s(F') \\otimes F'  \\quad (1)

        M_c(F) = \\sigma(W_1(W_0(F^c_{avg})) + W_1(W_0(F^c_{max})))  \\quad (2)

        M_s(F) = \\sigma(f^{7\\times7}([F^s_{avg}; F^s_{max}]))  \\quad (3)

    The gates are the sub-modules ``channel`` (:class:`CBAMChannelGate`) and ``spatial``
    (:class:`CBAMSpatialGate`), applied in that order; either can be switched off (it is then
    ``None``). Key names follow timm's ``CbamModule``; its state dicts load strictly with
    ``spatial_norm_cfg=dict(type='BN')`` (the official release and timm put a BatchNorm after the
    7x7 conv, which Eq. 3 does not have, so the default here has none).

    Args:
        in_channels: Channels C.
        use_channel: Apply the channel gate ``M_c``.
        use_spatial: Apply the spatial gate ``M_s``.
        rd_ratio, rd_channels, rd_divisor: Hidden width of the shared MLP (C/16 in the paper).
        kernel_size: Odd kernel size of the spatial conv (7 in the paper).
        spatial_norm_cfg: mmcv norm config after the spatial conv (``None``: Eq. 3).
        act_layer: delta of the MLP; a timm activation name or class/callable.
        gate_layer: sigma of both gates; a timm activation name or class/callable.
        mlp_bias: Biases in the MLP (none in Eq. 2 and in timm).
    """

    _abbr_ = 'cbam'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, use_channel: bool = True, use_spatial: bool = True,
                 rd_ratio: float = 1. / 16, rd_channels: int | None = None, rd_divisor: int = 1,
                 kernel_size: int = 7, spatial_norm_cfg: dict | None = None,
                 act_layer: LayerType = 'relu', gate_layer: LayerType = 'sigmoid',
                 mlp_bias: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        self.in_channels = check_positive('in_channels', in_channels, name)
        use_channel = check_flag('use_channel', use_channel, name)
        use_spatial = check_flag('use_spatial', use_spatial, name)
        if not (use_channel or use_spatial):
            raise ValueError(f'{name}: at least one of use_channel and use_spatial must be True, '
                             f'got use_channel={use_channel!r}, use_spatial={use_spatial!r}')
        check_norm_cfg('spatial_norm_cfg', spatial_norm_cfg, name)  # the gate's own name differs
        dd = factory_kwargs(device, dtype)
        with errors_named_as(name, CBAMChannelGate, CBAMSpatialGate):
            self.channel = CBAMChannelGate(
                in_channels, rd_ratio=rd_ratio, rd_channels=rd_channels, rd_divisor=rd_divisor,
                act_layer=act_layer, gate_layer=gate_layer, mlp_bias=mlp_bias,
                **dd) if use_channel else None
            self.spatial = CBAMSpatialGate(
                kernel_size=kernel_size, norm_cfg=spatial_norm_cfg, gate_layer=gate_layer,
                **dd) if use_spatial else None

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F'' = M_s(F') * F'`` with ``F' = M_c(F) * F`` for ``x`` = F of shape (N, C, H, W)."""
        check_input(x, self.in_channels, self.block_name)
        if self.channel is not None:
            x = self.channel(x)
        if self.spatial is not None:
            x = self.spatial(x)
        return x
