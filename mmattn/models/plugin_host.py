"""Plugin hosting for residual blocks and HRNet backbones, independent of the host library.

The mixins here give a ResNet ``BasicBlock`` / ``Bottleneck`` subclass plugin positions
(``after_conv1`` / ``after_conv2`` / ``after_conv3``) and an HRNet subclass a ``plugins=``
argument. They import neither mmseg nor mmpose: ``mmattn/models/hrnet.py`` combines them with
mmseg's classes (``mmattn.PluginHRNet``), ``mmattn/models/pose_hrnet.py`` with mmpose's
(``mmattn.PosePluginHRNet``), so each backbone needs only its own library. See
docs/hrnet_plugins.md.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_plugin_layer
from mmengine.registry import MODELS
from torch import nn

from mmattn.utils.registry_names import check_type_name

__all__ = ['PluginBasicMixin', 'PluginBottleneckMixin', 'PluginHRNetMixin', 'check_plugin']

_BASIC_POSITIONS = ('after_conv1', 'after_conv2')
_BOTTLENECK_POSITIONS = ('after_conv1', 'after_conv2', 'after_conv3')
_NUM_STAGES = 4


class PluginHostMixin:
    """Plugin hosting shared by the BasicBlock and Bottleneck subclasses.

    ``plugins`` is a list of ``dict(cfg=dict(type=...), position=...)``; the plugins at one
    position run in list order, each on the previous one's output. A plugin's module name
    is mmcv's ``abbr + postfix`` (``postfix`` may be given inside ``cfg``); two plugins with
    the same name in one block raise a ValueError that asks for a distinct ``postfix``.
    """

    plugin_positions: tuple[str, ...] = ()

    def __init__(self, *args: Any, plugins: Sequence[dict] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the stock block
        self.plugin_names: dict[str, list[str]] = {p: [] for p in self.plugin_positions}
        if plugins:
            self.add_plugins(plugins)

    def add_plugins(self, plugins: Sequence[dict]) -> None:
        """Build ``plugins`` and append them at their positions (after any already there)."""
        block = type(self).__name__
        for plugin in plugins:
            cfg, position = check_plugin(plugin, block, allowed_keys=('cfg', 'position'))
            if position not in self.plugin_positions:
                raise ValueError(f'{block}: plugin position must be one of '
                                 f'{self.plugin_positions}, got {position!r}')
            conv = getattr(self, 'conv' + position[-1])
            cfg = dict(cfg)
            postfix = cfg.pop('postfix', '')
            name, layer = build_plugin_layer(cfg, postfix=postfix,
                                             in_channels=conv.out_channels)
            if hasattr(self, name):
                raise ValueError(
                    f'{block}: plugin name {name!r} (abbr + postfix) is already taken in '
                    f'this block; give the plugin cfg a distinct postfix, e.g. '
                    f"dict(type={cfg['type']!r}, postfix=2)")
            self.add_module(name, layer)
            self.plugin_names[position].append(name)

    def forward_plugins(self, x: torch.Tensor, position: str) -> torch.Tensor:
        """Apply the plugins at ``position`` in order: ``P_n(...P_2(P_1(x)))``."""
        for name in self.plugin_names[position]:
            x = getattr(self, name)(x)
        return x

    def _checkpointed(self, inner: Callable[[torch.Tensor], torch.Tensor],
                      x: torch.Tensor) -> torch.Tensor:
        """``inner(x)``, through activation checkpointing when ``with_cp`` (as the stock blocks)."""
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


class PluginBasicMixin(PluginHostMixin):
    """BasicBlock with plugins:
    ``y = ReLU(P2(BN2(conv2(P1(ReLU(BN1(conv1(x))))))) + shortcut(x))``."""

    plugin_positions = _BASIC_POSITIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stock BasicBlock forward with the plugin positions filled in."""

        def _inner_forward(x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.forward_plugins(out, 'after_conv1')
            out = self.norm2(self.conv2(out))
            out = self.forward_plugins(out, 'after_conv2')
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        return self.relu(self._checkpointed(_inner_forward, x))


class PluginBottleneckMixin(PluginHostMixin):
    """Bottleneck with plugins: ``P1`` after ReLU(BN1(conv1)), ``P2`` after
    ReLU(BN2(conv2)), ``P3`` after BN3(conv3), before the residual sum."""

    plugin_positions = _BOTTLENECK_POSITIONS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stock Bottleneck forward with the plugin positions filled in."""

        def _inner_forward(x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.forward_plugins(out, 'after_conv1')
            out = self.relu(self.norm2(self.conv2(out)))
            out = self.forward_plugins(out, 'after_conv2')
            out = self.norm3(self.conv3(out))
            out = self.forward_plugins(out, 'after_conv3')
            identity = x if self.downsample is None else self.downsample(x)
            return out + identity

        return self.relu(self._checkpointed(_inner_forward, x))


def check_plugin(plugin: Any, owner: str, allowed_keys: tuple[str, ...]) -> tuple[dict, str]:
    """Validate one ``plugins`` entry and return its ``(cfg, position)``."""
    if not isinstance(plugin, dict):
        raise ValueError(f'{owner}: each plugins entry must be a dict with keys '
                         f'{allowed_keys}, got {plugin!r}')
    unknown = sorted(set(plugin) - set(allowed_keys))
    if unknown:
        raise ValueError(f'{owner}: plugins entry has unknown keys {unknown}; '
                         f'expected keys {allowed_keys}')
    cfg = plugin.get('cfg')
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f"{owner}: plugins entry 'cfg' must be a dict with a 'type', "
                         f'got {cfg!r}')
    if 'position' not in plugin:
        raise ValueError(f"{owner}: plugins entry needs a 'position', got {plugin!r}")
    # the registry mmcv's build_plugin_layer looks the type up in (the current default
    # scope's): a misspelled name fails here, named, with the closest registered names
    with MODELS.switch_scope_and_registry(None) as registry:
        check_type_name(cfg['type'], registry, f"{owner}: plugins entry cfg.type")
    return cfg, plugin['position']


class PluginHRNetMixin:
    """Turns a stock HRNet subclass into one that takes ``plugins``.

    The subclass sets ``blocks_dict`` to plugin-capable blocks (identical to the stock
    ones while they hold no plugin), lets the stock constructor build the network, then
    adds each plugin to every block of its stages.
    """

    def __init__(self, extra: dict, *args: Any, plugins: Sequence[dict] | None = None,
                 **kwargs: Any) -> None:
        per_stage = self._split_plugins(extra, plugins)
        super().__init__(extra, *args, **kwargs)  # the stock HRNet
        self.plugins = copy.deepcopy(plugins)
        self._add_stage_plugins(per_stage)

    def _split_plugins(self, extra: dict,
                       plugins: Sequence[dict] | None) -> list[list[dict]]:
        """Validate ``plugins`` against ``extra`` and split them per stage (before building)."""
        owner = type(self).__name__
        per_stage: list[list[dict]] = [[] for _ in range(_NUM_STAGES)]
        if plugins is None:
            return per_stage
        if not isinstance(plugins, (list, tuple)):
            raise ValueError(f'{owner}: plugins must be a list of dicts, got {plugins!r}')
        for plugin in plugins:
            cfg, position = check_plugin(plugin, owner,
                                          allowed_keys=('cfg', 'position', 'stages'))
            stages = plugin.get('stages')
            if stages is None:
                stages = (True,) * _NUM_STAGES
            if (not isinstance(stages, (list, tuple)) or len(stages) != _NUM_STAGES
                    or not all(isinstance(s, bool) for s in stages)):
                raise ValueError(f'{owner}: plugin stages must be {_NUM_STAGES} bools '
                                 f'(stage1..stage4), got {stages!r}')
            for i, selected in enumerate(stages):
                if not selected:
                    continue
                block_type = extra.get(f'stage{i + 1}', {}).get('block')
                if block_type not in self.blocks_dict:
                    continue   # a malformed extra: the stock constructor reports it
                allowed = self.blocks_dict[block_type].plugin_positions
                if position not in allowed:
                    raise ValueError(
                        f'{owner}: plugin position must be one of {allowed} for stage{i + 1} '
                        f'(block {block_type!r}), got {position!r}')
                per_stage[i].append(dict(cfg=copy.deepcopy(cfg), position=position))
        return per_stage

    def stage_blocks(self, stage: int) -> Iterator[nn.Module]:
        """The residual blocks of ``stage`` (1..4), in module order."""
        if stage == 1:
            yield from self.layer1
            return
        for hr_module in getattr(self, f'stage{stage}'):
            for branch in hr_module.branches:
                yield from branch

    def _add_stage_plugins(self, per_stage: list[list[dict]]) -> None:
        for i, stage_plugins in enumerate(per_stage):
            if stage_plugins:
                for block in self.stage_blocks(i + 1):
                    block.add_plugins(stage_plugins)
        # the stock constructor froze its stages before the plugins existed
        self._freeze_stages()

    def train(self, mode: bool = True) -> nn.Module:
        """Stock ``train`` (frozen stages, ``norm_eval``), returning ``self`` as
        ``nn.Module.train`` does (the stock ones return None, so ``.eval()`` did too)."""
        super().train(mode)
        return self
