"""mmpose's HRNet with ``plugins=``: ``mmattn.PosePluginHRNet``. Needs mmpose only; the
mmseg counterpart, the equation and the ``plugins`` format are in
``mmattn/models/hrnet.py`` and docs/hrnet_plugins.md.

mmpose builds its own ResNet block classes (not mmseg's), so the plugin-hosting mixins of
:mod:`mmattn.models.plugin_host` are combined with those here.
"""
from __future__ import annotations

from mmpose.models.backbones import HRNet as _PoseHRNet
from mmpose.models.backbones.resnet import BasicBlock as _PoseBasicBlock
from mmpose.models.backbones.resnet import Bottleneck as _PoseBottleneck

from mmattn.registry import MODELS

from .plugin_host import PluginBasicMixin, PluginBottleneckMixin, PluginHRNetMixin

__all__ = ['PosePluginBasicBlock', 'PosePluginBottleneck', 'PosePluginHRNet']


class PosePluginBasicBlock(PluginBasicMixin, _PoseBasicBlock):
    """mmpose's ResNet ``BasicBlock`` that hosts plugins (stock keys unchanged); see
    :class:`mmattn.models.hrnet.PluginBasicBlock` for the equation."""


class PosePluginBottleneck(PluginBottleneckMixin, _PoseBottleneck):
    """mmpose's ResNet ``Bottleneck`` that hosts plugins (stock keys unchanged); see
    :class:`mmattn.models.hrnet.PluginBottleneck`."""


@MODELS.register_module()
class PosePluginHRNet(PluginHRNetMixin, _PoseHRNet):
    """mmpose's HRNet (Sun et al. 2019) with ``plugins`` in its residual blocks.

    Same arguments as ``mmpose.models.backbones.HRNet`` plus ``plugins``, with the
    meaning, placement and checkpoint compatibility of :class:`mmattn.models.hrnet.PluginHRNet`:
    ``y = ReLU(BN2(conv2(P(ReLU(BN1(conv1(x)))))) + shortcut(x))`` for a plugin ``P`` at
    ``after_conv1`` of a BasicBlock.
    """

    blocks_dict = {'BASIC': PosePluginBasicBlock, 'BOTTLENECK': PosePluginBottleneck}
