"""The PSA leaderboard configs (configs/psa*_hrnet*.py): each loads offline, changes the
stock mmseg/mmpose config's model and nothing else, and builds the stock model plus exactly
the 104 PSA blocks of the official placement (after conv1 + BN + ReLU of every BasicBlock of
HRNet-W48)."""
from __future__ import annotations

import copy
import functools
import importlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hub import get_config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DefaultScope
from torch import nn

from mmattn.layers import PolarizedSelfAttention

ROOT = Path(__file__).resolve().parents[1]
SEG_BASE = 'mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
POSE_BASE = ('mmpose::body_2d_keypoint/topdown_heatmap/coco/'
             'td-hm_hrnet-w48_udp-8xb32-210e_coco-{}.py')
# config -> (package, stock base config, PSA mode)
CONFIGS = {
    'psa_hrnet_ocr_cityscapes.py': ('mmseg', SEG_BASE, 'parallel'),
    'psa-s_hrnet_ocr_cityscapes.py': ('mmseg', SEG_BASE, 'sequential'),
    'psa_udp_hrnet_w48_coco_256x192.py': ('mmpose', POSE_BASE.format('256x192'), 'parallel'),
    'psa_udp_hrnet_w48_coco_384x288.py': ('mmpose', POSE_BASE.format('384x288'), 'parallel'),
    'psa-s_udp_hrnet_w48_coco_384x288.py': ('mmpose', POSE_BASE.format('384x288'), 'sequential'),
}
BACKBONE = {'mmseg': 'mmattn.PluginHRNet', 'mmpose': 'mmattn.PosePluginHRNet'}

# HRNet-W48 (Sun et al. 2019): stage k has num_modules x branches x 4 BasicBlocks with branch
# widths 48 * 2^b -- stage2: 1 x (48, 96); stage3: 4 x (48, 96, 192); stage4:
# 3 x (48, 96, 192, 384). One PSA per BasicBlock, in_channels = the branch width:
PSA_WIDTHS = Counter({48: (1 + 4 + 3) * 4, 96: (1 + 4 + 3) * 4, 192: (4 + 3) * 4, 384: 3 * 4})
assert sum(PSA_WIDTHS.values()) == 104


@functools.lru_cache(maxsize=None)
def load(name: str) -> Config:
    return Config.fromfile(str(ROOT / 'configs' / name))


@functools.lru_cache(maxsize=None)
def load_base(base: str) -> Config:
    return get_config(base)


def build(package: str, model_cfg, device: str = 'meta') -> nn.Module:
    """Build with the package's registry and scope; on the meta device by default (the W48
    models' structure and parameter shapes without allocating ~300 MB each)."""
    registry = importlib.import_module(f'{package}.registry').MODELS
    with DefaultScope.overwrite_default_scope(package), torch.device(device):
        return registry.build(copy.deepcopy(model_cfg))


@functools.lru_cache(maxsize=None)
def built(name: str) -> nn.Module:
    package, _, _ = CONFIGS[name]
    return build(package, load(name).model)


@functools.lru_cache(maxsize=None)
def built_base(base: str) -> nn.Module:
    package = base.split('::')[0]
    return build(package, load_base(base).model)


def without_scope(value):
    """``value`` without the ``_scope_`` keys mmengine adds to dicts of a cross-package
    (``mmseg::``/``mmpose::``) base config."""
    if isinstance(value, dict):
        return {k: without_scope(v) for k, v in value.items() if k != '_scope_'}
    if isinstance(value, (list, tuple)):
        return type(value)(without_scope(v) for v in value)
    return value


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_changes_the_backbone_only(name: str) -> None:
    package, base, mode = CONFIGS[name]
    cfg, stock = without_scope(load(name).to_dict()), without_scope(load_base(base).to_dict())
    assert cfg.pop('custom_imports') == dict(imports=['mmattn'], allow_failed_imports=False)
    assert cfg.keys() == stock.keys()
    for key in cfg:
        if key != 'model':
            assert cfg[key] == stock[key], key
    backbone = cfg['model']['backbone']
    assert backbone.pop('type') == BACKBONE[package]
    assert backbone.pop('plugins') == [dict(
        cfg=dict(type='mmattn.PolarizedSelfAttention', mode=mode, variant='official'),
        position='after_conv1', stages=(False, True, True, True))]
    stock['model']['backbone'].pop('type')
    assert cfg['model'] == stock['model']


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_model_is_stock_plus_104_psa_blocks(name: str) -> None:
    package, base, mode = CONFIGS[name]
    model, stock = built(name), built_base(base)
    backbone = model.backbone
    psa = [m for m in model.modules() if isinstance(m, PolarizedSelfAttention)]
    assert len(psa) == 104
    assert Counter(m.in_channels for m in psa) == PSA_WIDTHS
    assert all(m.mode == mode and m.variant == 'official' for m in psa)
    # the placement: exactly one plugin per BasicBlock, after conv1 (+ BN + ReLU)
    assert not any(any(b.plugin_names.values()) for b in backbone.stage_blocks(1))
    for stage in (2, 3, 4):
        for block in backbone.stage_blocks(stage):
            names = block.plugin_names
            assert len(names['after_conv1']) == 1 and names['after_conv2'] == []
            plugin = getattr(block, names['after_conv1'][0])
            assert isinstance(plugin, PolarizedSelfAttention)
            assert plugin.in_channels == block.conv1.out_channels
    # parameters: stock + the 104 blocks' parameters, summed from their in_channels
    per_width = {c: n_params(PolarizedSelfAttention(c, mode=mode, variant='official',
                                                    device='meta'))
                 for c in PSA_WIDTHS}
    psa_total = sum(count * per_width[c] for c, count in PSA_WIDTHS.items())
    assert n_params(model) - n_params(stock) == psa_total
    # every stock key is kept with its shape; the other keys are the PSA blocks'
    ours, theirs = model.state_dict(), stock.state_dict()
    assert all(ours[k].shape == v.shape for k, v in theirs.items())
    psa_keys = {k for k in ours if k not in theirs}
    expected = {f'{path}.{k}' for path, m in model.named_modules()
                if isinstance(m, PolarizedSelfAttention) for k in m.state_dict()}
    assert psa_keys == expected


# HRNet-W18 widths with one module and one block per branch: the configs' plugins in a
# backbone small enough for a CPU forward and backward
SMALL_EXTRA = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1,),
                num_channels=(16,)),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1),
                num_channels=(18, 36)),
    stage3=dict(num_modules=1, num_branches=3, block='BASIC', num_blocks=(1, 1, 1),
                num_channels=(18, 36, 72)),
    stage4=dict(num_modules=1, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1),
                num_channels=(18, 36, 72, 144), multiscale_output=True))


# one config per (host, PSA mode): the two parallel pose configs share their plugins
@pytest.mark.parametrize('name', ['psa_hrnet_ocr_cityscapes.py', 'psa-s_hrnet_ocr_cityscapes.py',
                                  'psa_udp_hrnet_w48_coco_256x192.py',
                                  'psa-s_udp_hrnet_w48_coco_384x288.py'])
def test_config_plugins_forward_in_a_small_hrnet(name: str) -> None:
    package, _, _ = CONFIGS[name]
    backbone_cfg = dict(type=load(name).model.backbone.type, extra=SMALL_EXTRA,
                        plugins=load(name).model.backbone.plugins)
    backbone = build(package, backbone_cfg, device='cpu')
    psa = [m for m in backbone.modules() if isinstance(m, PolarizedSelfAttention)]
    assert sorted(m.in_channels for m in psa) == [18, 18, 18, 36, 36, 36, 72, 72, 144]
    outs = backbone(torch.randn(2, 3, 32, 32))
    assert tuple(outs[0].shape) == (2, 18, 8, 8)
    sum(o.square().mean() for o in outs).backward()
    for m in psa:
        assert all(p.grad is not None for p in m.parameters())
    assert any(p.grad.abs().sum() > 0 for m in psa for p in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('name', ['psa_hrnet_ocr_cityscapes.py',
                                  'psa-s_udp_hrnet_w48_coco_384x288.py'])
def test_w48_model_builds_and_runs(name: str) -> None:
    """The full W48 model, allocated and run on a 64x64 image (a few seconds on CPU)."""
    package, _, _ = CONFIGS[name]
    model = revert_sync_batchnorm(build(package, load(name).model, device='cpu'))
    model.eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.randn(1, 3, 64, 64))
    assert tuple(feats[0].shape) == (1, 48, 16, 16)
    assert all(torch.isfinite(f).all() for f in feats)
