"""mmseg's HRNet with ``plugins=`` (attention blocks inside its residual blocks):
``mmattn.PluginHRNet``. Needs mmseg only; the mmpose counterpart is
``mmattn/models/pose_hrnet.py``.

The PSA paper (Liu et al., "Polarized Self-Attention: Towards High-quality Pixel-wise
Regression", 2021) reports its headline results with a PSA block inside every BasicBlock
of HRNet; the official release puts it right after the first 3x3 conv + BN + ReLU:

    y = ReLU(BN2(conv2(P(ReLU(BN1(conv1(x)))))) + shortcut(x))      (P: the plugin)

Stock ``mmseg.models.backbones.HRNet`` rejects ``plugins=``. This module subclasses it,
swapping in block subclasses that host plugins at ``after_conv1`` / ``after_conv2`` (/
``after_conv3`` in a Bottleneck), chain several plugins at one position in order, and leave
every stock state-dict key unchanged (stock checkpoints load with only the plugin keys
missing). The hosting logic, shared with the mmpose backbone, is
:mod:`mmattn.models.plugin_host`.

``plugins`` follows mmdet/mmseg ResNet: a list of
``dict(cfg=dict(type=...), position='after_conv1'|'after_conv2'|'after_conv3',
stages=(bool, bool, bool, bool))``. ``stages`` names HRNet's four stages as its config
does (``extra['stage1']`` .. ``extra['stage4']``; stage 1 is the module ``layer1``, stage
``k`` >= 2 the module ``stage{k}``); it is optional (default: every stage). The plugin's
``in_channels`` is the output width of the conv it follows. See docs/hrnet_plugins.md.
"""
from __future__ import annotations

from mmseg.models.backbones import HRNet as _SegHRNet
from mmseg.models.backbones.resnet import BasicBlock as _SegBasicBlock
from mmseg.models.backbones.resnet import Bottleneck as _SegBottleneck

from mmattn.registry import MODELS

from .plugin_host import PluginBasicMixin, PluginBottleneckMixin, PluginHRNetMixin

__all__ = ['PluginBasicBlock', 'PluginBottleneck', 'PluginHRNet']


class PluginBasicBlock(PluginBasicMixin, _SegBasicBlock):
    """mmseg's ResNet ``BasicBlock`` that hosts plugins (stock keys unchanged).

    ``y = ReLU(P2(BN2(conv2(P1(ReLU(BN1(conv1(x))))))) + shortcut(x))``, where ``P1``/``P2``
    are the chains of plugins at ``after_conv1``/``after_conv2`` (identity when empty).
    Takes the stock arguments plus ``plugins`` (list of ``dict(cfg=..., position=...)``).
    """


class PluginBottleneck(PluginBottleneckMixin, _SegBottleneck):
    """mmseg's ResNet ``Bottleneck`` whose plugins chain (stock keys unchanged).

    mmseg 1.2.2's ``Bottleneck.forward_plugin`` feeds every plugin the same input, so
    only the last of several plugins at one position has an effect; here they compose,
    ``P_n(...P_1(x))``. Plugins are given as ``plugins`` (list of
    ``dict(cfg=..., position=...)``) and handled by this class, not by the stock one.
    """


@MODELS.register_module()
class PluginHRNet(PluginHRNetMixin, _SegHRNet):
    """mmseg's HRNet (HRNetV2, Sun et al. 2019) with ``plugins`` in its residual blocks.

    Same arguments as ``mmseg.models.backbones.HRNet`` plus ``plugins``: a list of
    ``dict(cfg=dict(type=...), position='after_conv1'|'after_conv2'|'after_conv3',
    stages=(bool,) * 4)``; ``stages[k]`` selects ``extra['stage{k+1}']`` (stage 1 is
    ``layer1``), default all. In a BasicBlock the plugin ``P`` at ``after_conv1`` gives
    ``y = ReLU(BN2(conv2(P(ReLU(BN1(conv1(x)))))) + shortcut(x))`` (the placement of the
    official PSA release); ``in_channels`` of a plugin is the width of the conv it follows.
    Several plugins at one position run in list order. Stock state-dict keys are
    unchanged, so stock checkpoints load with only the plugin keys missing.

    Note: the stock ``init_cfg`` (Kaiming on every ``Conv2d``) also reaches the convs
    inside plugins; a plugin's own ``init_weights`` runs after it.
    """

    blocks_dict = {'BASIC': PluginBasicBlock, 'BOTTLENECK': PluginBottleneck}
