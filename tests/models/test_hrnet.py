"""Plugin-capable HRNet (mmattn.models.hrnet, .pose_hrnet): plugin placement and chaining inside the
residual blocks, stage selection, stock-checkpoint compatibility, errors, for both the
mmseg and the mmpose host, and each host's backbone importing only its own library."""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from mmpose.models.backbones import HRNet as PoseHRNet
from mmpose.models.backbones.resnet import BasicBlock as PoseBasicBlock
from mmseg.models.backbones import HRNet as SegHRNet
from mmseg.models.backbones.resnet import BasicBlock as SegBasicBlock
from torch import nn

from mmattn.models.hrnet import PluginBasicBlock, PluginBottleneck, PluginHRNet
from mmattn.models.pose_hrnet import PosePluginBasicBlock, PosePluginBottleneck, PosePluginHRNet
from mmattn.registry import MODELS


class Affine(nn.Module):
    """Test plugin ``y = w * x + b`` with per-channel ``w``, ``b``: two of them with different
    constants do not commute, so the order in which a host applies them is visible."""

    _abbr_ = 'affine'

    def __init__(self, in_channels: int, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.weight = nn.Parameter(torch.full((in_channels,), scale))
        self.bias = nn.Parameter(torch.full((in_channels,), shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNamed(Affine):
    """An Affine whose mmcv name would be ``conv<postfix>``."""

    _abbr_ = 'conv'


def affine(position: str, scale: float, shift: float, postfix: str = '', **extra) -> dict:
    cfg = dict(type=Affine, scale=scale, shift=shift)
    if postfix:
        cfg['postfix'] = postfix
    return dict(cfg=cfg, position=position, **extra)


# (HRNet, stock HRNet, BasicBlock, Bottleneck, Bottleneck(32, x) second argument for a
# 32 -> 8 -> 32 block, stock BasicBlock)
STAGES_2_TO_4 = (False, True, True, True)
SEG = (PluginHRNet, SegHRNet, PluginBasicBlock, PluginBottleneck, 8, SegBasicBlock)
POSE = (PosePluginHRNet, PoseHRNet, PosePluginBasicBlock, PosePluginBottleneck, 32,
        PoseBasicBlock)
HOSTS = pytest.mark.parametrize('host', [SEG, POSE], ids=['mmseg', 'mmpose'])

# W18 widths, fewer modules/blocks than HRNetV2-W18 (stage3 keeps 2 modules so that
# blocks are found across modules)
EXTRA = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(2,),
                num_channels=(16,)),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(2, 2),
                num_channels=(18, 36)),
    stage3=dict(num_modules=2, num_branches=3, block='BASIC', num_blocks=(1, 1, 1),
                num_channels=(18, 36, 72)),
    stage4=dict(num_modules=1, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1),
                num_channels=(18, 36, 72, 144), multiscale_output=True))
BLOCKS_PER_STAGE = (2, 4, 6, 4)


def randomize_bn(module: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not identity."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


# ----------------------------------------------------------------------------- blocks
def basic_reference(block: nn.Module, x: torch.Tensor, p1, p2) -> torch.Tensor:
    """The official PSA placement, written out: ReLU(p2(BN2(conv2(p1(ReLU(BN1(conv1 x)))))) + x)."""
    h = torch.relu(block.norm1(block.conv1(x)))
    h = block.norm2(block.conv2(p1(h)))
    return torch.relu(p2(h) + x)


def bottleneck_reference(block: nn.Module, x: torch.Tensor, p1, p2, p3) -> torch.Tensor:
    h = p1(torch.relu(block.norm1(block.conv1(x))))
    h = p2(torch.relu(block.norm2(block.conv2(h))))
    return torch.relu(p3(block.norm3(block.conv3(h))) + x)


def affine_fn(scale: float, shift: float):
    return lambda t: t * scale + shift


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


@HOSTS
@pytest.mark.parametrize('order', [(2.0, 1.0, -3.0, 0.5), (-3.0, 0.5, 2.0, 1.0)])
def test_basic_block_chains_plugins_in_order(host, order) -> None:
    basic = host[2]
    s1, b1, s2, b2 = order
    block = basic(8, 8, plugins=[affine('after_conv1', s1, b1, postfix='_a'),
                                 affine('after_conv1', s2, b2, postfix='_b'),
                                 affine('after_conv2', 0.5, 0.25)]).double().eval()
    randomize_bn(block)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    # y = P_b(P_a(h)) at after_conv1: the second plugin sees the first one's output
    p1 = lambda t: affine_fn(s2, b2)(affine_fn(s1, b1)(t))  # noqa: E731
    expected = basic_reference(block, x, p1, affine_fn(0.5, 0.25))
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    # the order matters: the other order is a different function
    swapped = lambda t: affine_fn(s1, b1)(affine_fn(s2, b2)(t))  # noqa: E731
    assert not torch.allclose(block(x), basic_reference(block, x, swapped,
                                                        affine_fn(0.5, 0.25)))
    assert block.plugin_names == {'after_conv1': ['affine_a', 'affine_b'],
                                  'after_conv2': ['affine']}


@HOSTS
def test_bottleneck_positions_and_chaining(host) -> None:
    bottleneck, mid = host[3], 8
    block = bottleneck(32, host[4], plugins=[affine('after_conv3', 2.0, 1.0, postfix=3),
                                             affine('after_conv1', 1.5, -1.0, postfix=1),
                                             affine('after_conv2', -1.0, 0.5, postfix=2),
                                             affine('after_conv3', 0.5, 0.5, postfix=4)])
    block = block.double().eval()
    randomize_bn(block)
    assert [getattr(block, n).in_channels for n in ('affine1', 'affine2', 'affine3')] == \
        [mid, mid, 32]
    x = torch.randn(1, 32, 6, 5, dtype=torch.float64)
    p3 = lambda t: affine_fn(0.5, 0.5)(affine_fn(2.0, 1.0)(t))  # noqa: E731
    expected = bottleneck_reference(block, x, affine_fn(1.5, -1.0), affine_fn(-1.0, 0.5), p3)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)


@HOSTS
def test_blocks_without_plugins_match_stock(host) -> None:
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    basic = host[2](8, 8).double().eval()
    randomize_bn(basic)
    torch.testing.assert_close(basic(x), basic_reference(basic, x, identity, identity))
    stock = host[5](8, 8).double().eval()
    stock.load_state_dict(basic.state_dict())
    torch.testing.assert_close(basic(x), stock(x), rtol=0, atol=0)


@HOSTS
def test_with_cp_matches_and_trains_plugins(host) -> None:
    plugins = [affine('after_conv1', 2.0, 1.0), affine('after_conv2', 0.5, 0.0, postfix=2)]
    block = host[2](8, 8, plugins=plugins)
    block_cp = host[2](8, 8, plugins=plugins, with_cp=True)
    block_cp.load_state_dict(block.state_dict())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    y, y_cp = block(x), block_cp(x)
    torch.testing.assert_close(y, y_cp)
    y_cp.square().sum().backward()
    assert block_cp.affine.weight.grad.abs().sum() > 0
    assert block_cp.affine2.weight.grad.abs().sum() > 0


@HOSTS
def test_block_errors(host) -> None:
    with pytest.raises(ValueError, match="position must be one of.*'after_conv3'"):
        host[2](8, 8, plugins=[affine('after_conv3', 1.0, 0.0)])
    with pytest.raises(ValueError, match='already taken.*postfix'):
        host[2](8, 8, plugins=[affine('after_conv1', 1.0, 0.0), affine('after_conv2', 1.0, 0.0)])
    with pytest.raises(ValueError, match="'conv1'.*already taken"):   # would shadow conv1
        host[2](8, 8, plugins=[dict(cfg=dict(type=ConvNamed, postfix=1), position='after_conv1')])
    with pytest.raises(ValueError, match="unknown keys \\['stages'\\]"):
        host[2](8, 8, plugins=[affine('after_conv1', 1.0, 0.0, stages=(True,) * 4)])


# ----------------------------------------------------------------------------- backbones
def build(cls, plugins=None, **kwargs) -> nn.Module:
    if plugins is not None:
        kwargs['plugins'] = plugins
    return cls(copy.deepcopy(EXTRA), **kwargs)


def plugin_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the plugins, found from each block's ``plugin_names``."""
    keys = set()
    for path, module in model.named_modules():
        for names in getattr(module, 'plugin_names', {}).values():
            for name in names:
                keys |= {f'{path}.{name}.{k}' for k in getattr(module, name).state_dict()}
    return keys


@HOSTS
def test_no_plugins_matches_stock_backbone(host) -> None:
    stock, ours = build(host[1]), build(host[0])
    stock.eval()   # the stock HRNet.train returns None (ours returns self)
    assert ours.eval() is ours
    randomize_bn(stock)
    assert ours.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(ours(x), stock(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@HOSTS
def test_stage_selection_and_in_channels(host) -> None:
    model = build(host[0], plugins=[affine('after_conv1', 2.0, 0.0,
                                           stages=(False, True, False, True)),
                                    affine('after_conv3', 1.0, 1.0, postfix=3,
                                           stages=(True, False, False, False))])
    for stage in range(1, 5):
        blocks = list(model.stage_blocks(stage))
        assert len(blocks) == BLOCKS_PER_STAGE[stage - 1]
        for block in blocks:
            names = block.plugin_names
            if stage in (2, 4):
                assert names['after_conv1'] == ['affine'] and names['after_conv2'] == []
                # the PSA placement: in_channels = BasicBlock planes = branch width
                assert block.affine.in_channels == block.conv1.out_channels
            elif stage == 3:
                assert all(not n for n in names.values())
            else:
                assert names == {'after_conv1': [], 'after_conv2': [], 'after_conv3': ['affine3']}
                assert block.affine3.in_channels == 64   # 16 * Bottleneck expansion 4
    widths = sorted(b.affine.in_channels for s in (2, 4) for b in model.stage_blocks(s))
    assert widths == sorted([18, 18, 36, 36] + [18, 36, 72, 144])
    n_plugins = sum(isinstance(m, Affine) for m in model.modules())
    assert n_plugins == 2 + 4 + 4


@HOSTS
def test_stock_state_dict_loads_with_only_plugin_keys_missing(host) -> None:
    stock = build(host[1])
    randomize_bn(stock)
    model = build(host[0], plugins=[affine('after_conv1', 2.0, 0.0, stages=STAGES_2_TO_4),
                                    affine('after_conv1', 1.0, 1.0, postfix=2),
                                    affine('after_conv3', 1.0, 1.0, postfix=3,
                                           stages=(True, False, False, False))])
    expected_missing = plugin_keys(model)
    # 2 stage-1 Bottlenecks x 2 plugins + 14 BasicBlocks x 2 plugins, 2 tensors each
    assert len(expected_missing) == (2 * 2 + 14 * 2) * 2
    result = model.load_state_dict(stock.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == expected_missing
    ours = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(ours[key], value), key


@HOSTS
def test_forward_backward_with_plugins(host) -> None:
    model = build(host[0], plugins=[affine('after_conv1', 0.5, 0.1, stages=STAGES_2_TO_4)])
    x = torch.randn(2, 3, 32, 32)   # batch 2: training-mode BN on the 1x1 branch of stage 4
    outs = model(x)
    assert [tuple(o.shape) for o in outs][:1] == [(2, 18, 8, 8)]
    sum(o.sum() for o in outs).backward()
    for name, p in model.named_parameters():
        if '.affine.' in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@HOSTS
def test_frozen_stages_freeze_plugins(host) -> None:
    model = build(host[0], plugins=[affine('after_conv1', 1.0, 0.0, stages=STAGES_2_TO_4)],
                  frozen_stages=2)
    for stage, frozen in ((2, True), (3, False)):
        for block in model.stage_blocks(stage):
            assert block.affine.weight.requires_grad is not frozen


@HOSTS
def test_backbone_errors(host) -> None:
    with pytest.raises(ValueError, match="stage2 \\(block 'BASIC'\\), got 'after_conv3'"):
        build(host[0], plugins=[affine('after_conv3', 1.0, 0.0)])
    with pytest.raises(ValueError, match='4 bools'):
        build(host[0], plugins=[affine('after_conv1', 1.0, 0.0, stages=(True, False))])
    with pytest.raises(ValueError, match="unknown keys \\['stage'\\]"):
        build(host[0], plugins=[affine('after_conv1', 1.0, 0.0, stage=(True,) * 4)])
    with pytest.raises(ValueError, match="'cfg' must be a dict with a 'type'"):
        build(host[0], plugins=[dict(cfg=dict(scale=1.0), position='after_conv1')])
    with pytest.raises(ValueError, match='list of dicts'):
        build(host[0], plugins=dict(cfg=dict(type=Affine), position='after_conv1'))


@HOSTS
def test_misspelled_plugin_type_names_the_closest(host) -> None:
    """A typo in a plugin's registered name fails before the network is built, naming the
    typo and the registered names closest to it (not mmcv's 'Cannot find None')."""
    plugins = [dict(cfg=dict(type='mmattn.PolarizedSelfAtention'), position='after_conv1')]
    with pytest.raises(ValueError) as info:
        build(host[0], plugins=plugins)
    message = str(info.value)
    assert "'mmattn.PolarizedSelfAtention'" in message and 'cfg.type' in message
    assert "'mmattn.PolarizedSelfAttention'" in message


def test_registered_and_built_from_host_registries() -> None:
    from mmpose.registry import MODELS as POSE_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    plugins = [dict(cfg=dict(type='ContextBlock', ratio=1 / 4), position='after_conv1',
                    stages=(False, False, False, True))]
    assert MODELS.get('PluginHRNet') is PluginHRNet
    assert MODELS.get('PosePluginHRNet') is PosePluginHRNet
    seg = SEG_MODELS.build(dict(type='mmattn.PluginHRNet', extra=EXTRA, plugins=plugins))
    pose = POSE_MODELS.build(dict(type='mmattn.PosePluginHRNet', extra=EXTRA, plugins=plugins))
    assert type(seg) is PluginHRNet and type(pose) is PosePluginHRNet
    for model in (seg, pose):
        blocks = list(model.stage_blocks(4))
        assert [b.context_block.in_channels for b in blocks] == [18, 36, 72, 144]


@HOSTS
def test_pretrained_init_cfg_loads_stock_checkpoint(host, tmp_path) -> None:
    """The configs' path: ``init_cfg=dict(type='Pretrained')`` with a stock checkpoint."""
    stock = build(host[1])
    randomize_bn(stock)
    ckpt = tmp_path / 'stock.pth'
    torch.save({'state_dict': stock.state_dict()}, ckpt)
    model = build(host[0], plugins=[affine('after_conv1', 2.0, 0.5, stages=STAGES_2_TO_4)],
                  init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)))
    model.init_weights()
    ours = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(ours[key], value), key
    for block in model.stage_blocks(3):   # the plugins keep their own initialisation
        assert torch.equal(block.affine.weight, torch.full_like(block.affine.weight, 2.0))


# Builds one host's backbone through the registry (as a config does) in a fresh interpreter in
# which the other host's libraries cannot be imported, as on a machine without them.
_WITHOUT = textwrap.dedent("""
    import importlib.abc, sys
    blocked = set(sys.argv[1].split(','))

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in blocked:
                raise ModuleNotFoundError(f'No module named {name!r}', name=name)
            return None

    sys.meta_path.insert(0, Missing())
    from mmattn.registry import MODELS
    from mmattn.models.host_backbones import UNAVAILABLE
    model = MODELS.build(dict(type=sys.argv[2], extra=%r, plugins=[dict(
        cfg=dict(type='mmattn.SqueezeExcitation'), position='after_conv1',
        stages=(False, False, False, True))]))
    assert [type(b.se).__name__ for b in model.stage_blocks(4)] == ['SqueezeExcitation'] * 4
    loaded = sorted({m.split('.')[0] for m in sys.modules} & {'mmseg', 'mmpose', 'mmdet'})
    print(type(model).__name__, ','.join(loaded), sorted(UNAVAILABLE))
""" % (EXTRA,))


@pytest.mark.parametrize('backbone, blocked, library', [
    ('PluginHRNet', 'mmpose,mmdet', 'mmseg'),
    ('PosePluginHRNet', 'mmseg', None),
], ids=['mmseg-without-mmpose-mmdet', 'mmpose-without-mmseg'])
def test_backbone_needs_only_its_own_library(backbone, blocked, library) -> None:
    """mmattn.PluginHRNet builds where mmpose and mmdet are missing, mmattn.PosePluginHRNet
    where mmseg is; the missing library's backbone is reported unavailable, not an error."""
    result = subprocess.run([sys.executable, '-c', _WITHOUT, blocked, backbone],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    name, loaded, unavailable = result.stdout.strip().splitlines()[-1].split(' ', 2)
    assert name == backbone
    assert not set(loaded.split(',')) & set(blocked.split(','))
    if library is not None:
        assert library in loaded.split(',')
    other = {'PluginHRNet': 'PosePluginHRNet', 'PosePluginHRNet': 'PluginHRNet'}[backbone]
    assert unavailable == repr([other])


@pytest.mark.slow
@pytest.mark.parametrize('variant, mode', [('official', 'sequential'), ('paper', 'parallel')])
def test_psa_hrnet_compiles_as_one_graph(variant: str, mode: str) -> None:
    """torch.compile(fullgraph=True) traces a PSA PluginHRNet in training mode without a graph
    break (plugin hosting, backend choice and input checks included); the compiled forward
    and backward equal eager."""
    torch._dynamo.reset()
    model = PluginHRNet(extra=EXTRA, plugins=[dict(
        cfg=dict(type='mmattn.PolarizedSelfAttention', variant=variant, mode=mode),
        position='after_conv1', stages=STAGES_2_TO_4)]).double().train()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    # 64 px: the smallest branch is 2x2, so no BN normalises over only two values (which
    # would amplify rounding) and no PSA softmax runs over a single pixel (whose ch_wq
    # gradient is exactly zero in theory, rounding noise in practice)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = []
    for fn in (model, compiled):
        model.zero_grad()
        outs = fn(x)   # train-mode BN: both calls see the same batch statistics
        sum((o * o).mean() for o in outs).backward()
        results.append(([o.detach() for o in outs],
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (outs_ref, grads_ref), (outs_c, grads_c) = results
    for out_c, out_ref in zip(outs_c, outs_ref):
        torch.testing.assert_close(out_c, out_ref, rtol=1e-9, atol=1e-9)
    assert len(grads_c) == len(grads_ref) > 0
    for g_c, g_ref in zip(grads_c, grads_ref):
        torch.testing.assert_close(g_c, g_ref, rtol=1e-8, atol=1e-9)
