"""The contract every registered attention block follows (see mmattn/layers/__init__.py):
constructed from ``in_channels`` alone, NCHW in and the same shape out for any H and W,
contiguous or channels_last, autocast, device/dtype factory arguments, clear errors, every
parameter trained, copies (deepcopy, pickle, torch.save) that compute the same, and usable
from mm configs, mmcv plugins, timm and the exporters, including TorchScript
(``torch.jit.script``) and torch.fx (``symbolic_trace``, timm's FX feature extraction)."""
from __future__ import annotations

import copy
import inspect
import io
import pickle
import re

import pytest
import torch
from timm.layers import LayerNorm2d
from torch import nn

from compile_checks import check_compiled_training

from mmattn.layers import attention_blocks, create_attn
from mmattn.registry import MODELS

BLOCKS = attention_blocks()
NAMES = sorted(BLOCKS)
C = 32

# blocks with a feature that cannot work, and why (the block's docstring says it too)
UNSUPPORTED: dict[tuple[str, str], str] = {}
# blocks that export only through the dynamo-based exporter: mmcv's CrissCrossAttention
# builds its mask with aten::diag, which the TorchScript-based exporter cannot translate
ONNX_DYNAMO = {'RecurrentCrissCrossAttention'}


def skip_unsupported(name: str, feature: str) -> None:
    reason = UNSUPPORTED.get((name, feature))
    if reason:
        pytest.skip(f'{name} does not support {feature}: {reason}')


def make(name: str, channels: int = C, **kwargs) -> nn.Module:
    """A block whose output depends on every parameter: zero-initialised scales
    (DANet's gammas, non-local's output projection) are set to non-zero values."""
    block = BLOCKS[name](channels, **kwargs)
    perturb_zero_params(block)
    return block


def perturb_zero_params(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and not param.any():
                param.uniform_(0.1, 0.5)


def test_blocks_are_registered() -> None:
    expected = {'PolarizedSelfAttention', 'SqueezeExcitation', 'EfficientChannelAttention', 'CBAM',
                'CoordinateAttention', 'NonLocalAttention', 'PositionAttention',
                'ChannelAttention', 'DualAttention', 'RecurrentCrissCrossAttention',
                'OutlookAttention'}
    missing = expected - set(BLOCKS)
    assert not missing, f'not registered: {sorted(missing)}'


@pytest.mark.parametrize('name', NAMES)
def test_build_from_config(name: str) -> None:
    from mmseg.registry import MODELS as SEG_MODELS
    block = MODELS.build(dict(type=f'mmattn.{name}', in_channels=C))
    assert type(block) is BLOCKS[name]
    assert block.in_channels == C
    # from another OpenMMLab package's registry, through the scope prefix
    assert type(SEG_MODELS.build(dict(type=f'mmattn.{name}', in_channels=C))) is BLOCKS[name]
    assert type(create_attn(name, C)) is BLOCKS[name]


@pytest.mark.parametrize('name', NAMES)
def test_abbr_names_plugin(name: str) -> None:
    from mmcv.cnn import build_plugin_layer
    assert '_abbr_' in vars(BLOCKS[name]), f'{name} needs its own _abbr_'
    layer_name, layer = build_plugin_layer(dict(type=f'mmattn.{name}'), postfix='_1', in_channels=C)
    assert layer_name == BLOCKS[name]._abbr_ + '_1'
    assert isinstance(layer, BLOCKS[name])


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('shape', [(1, 1, 1), (1, 7, 5), (2, 8, 8), (2, 3, 12), (1, 13, 11)])
def test_any_spatial_size(name: str, shape: tuple[int, int, int]) -> None:
    block = make(name).eval()
    n, h, w = shape
    x = torch.randn(n, C, h, w)
    with torch.no_grad():
        y = block(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize('name', NAMES)
def test_training_mode_and_every_parameter_gets_a_gradient(name: str) -> None:
    block = make(name).train()
    x = torch.randn(2, C, 9, 6, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    # PSA's ch_wq.bias shifts every pixel's logit equally, so the softmax over the pixels
    # removes it: its true gradient is 0 (the folded path returns exactly 0; the reference
    # path leaves rounding). It must still get a gradient tensor.
    exact_zero = {'ch_wq.bias'} if name == 'PolarizedSelfAttention' else set()
    no_grad = [n for n, p in block.named_parameters()
               if p.requires_grad and (p.grad is None or not (p.grad.abs().sum() > 0
                                                              or n in exact_zero))]
    assert not no_grad, f'parameters without gradient: {no_grad}'
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize('name', NAMES)
def test_output_depends_on_input(name: str) -> None:
    """Not the identity and not constant: the block does something with its input."""
    block = make(name).eval()
    x = torch.randn(2, C, 6, 7)
    with torch.no_grad():
        y = block(x)
        y2 = block(x * 2 + 1)
    assert not torch.allclose(y, x)
    assert not torch.allclose(y, y2)


@pytest.mark.parametrize('name', NAMES)
def test_channels_last(name: str) -> None:
    block = make(name).eval()
    x = torch.randn(2, C, 7, 9)
    with torch.no_grad():
        ref = block(x)
        out = block(x.contiguous(memory_format=torch.channels_last))
        out_cl_module = block.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cl_module, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(name: str, dtype: torch.dtype) -> None:
    block = make(name).eval()
    x = torch.randn(2, C, 6, 5)
    with torch.no_grad():
        ref = block(x)
        with torch.autocast('cpu', dtype=dtype):
            out = block(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    # half precision keeps about 3 significant digits; the blocks add a few roundings
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('name', NAMES)
def test_factory_kwargs(name: str) -> None:
    block = BLOCKS[name](C, dtype=torch.float64)
    tensors = list(block.parameters()) + [b for b in block.buffers() if b.is_floating_point()]
    assert tensors and all(t.dtype == torch.float64 for t in tensors)
    meta = BLOCKS[name](C, device='meta')
    assert all(t.device.type == 'meta' for t in list(meta.parameters()) + list(meta.buffers()))
    with torch.no_grad():
        y = block.eval()(torch.randn(1, C, 4, 4, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize('name', NAMES)
def test_copies_compute_what_the_block_does(name: str) -> None:
    """What EMA hooks (``copy.deepcopy``), ``torch.save(model)`` and multiprocessing (pickle)
    make of a block, after it has run forward and backward once (so whatever it decides at
    the first call has been decided), computes exactly what the block does."""
    block = make(name).train()
    x = torch.randn(2, C, 7, 6)
    block(x).sum().backward()
    block.eval()
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    copies = {'deepcopy': copy.deepcopy(block),
              'torch.save': torch.load(buffer, weights_only=False),
              'pickle': pickle.loads(pickle.dumps(block))}
    with torch.no_grad():
        expected = block(x)
        for how, other in copies.items():
            assert type(other) is type(block), how
            assert torch.equal(other(x), expected), how


@pytest.mark.parametrize('name', NAMES)
def test_bad_input_errors(name: str) -> None:
    block = make(name)
    with pytest.raises(ValueError, match=r'in_channels') as info:
        block(torch.randn(1, C + 1, 5, 5))
    assert str(C + 1) in str(info.value) and str(C) in str(info.value)
    assert f'(shape (1, {C + 1}, 5, 5))' in str(info.value)
    with pytest.raises(ValueError, match=r'4-D'):
        block(torch.randn(C, 5, 5))
    # under torch.jit.trace (as mmengine's FLOP counter runs a model) the sizes are tensors;
    # the message still reads as plain numbers, not 'tensor(1)'
    with pytest.raises(ValueError) as info, torch.no_grad():
        torch.jit.trace(block.eval(), torch.randn(1, C + 1, 5, 5), check_trace=False)
    assert f'(shape (1, {C + 1}, 5, 5))' in str(info.value)


# (block, argument) for every constructor argument that takes an mmcv norm config
NORM_CFG_ARGS = [(name, arg) for name in NAMES
                 for arg in inspect.signature(BLOCKS[name]).parameters if arg.endswith('norm_cfg')]


def test_norm_config_arguments_are_found() -> None:
    assert {name for name, _ in NORM_CFG_ARGS} >= {'CBAM', 'CoordinateAttention',
                                                   'NonLocalAttention'}


@pytest.mark.parametrize('name, arg', NORM_CFG_ARGS)
@pytest.mark.parametrize('cfg, match', [
    ('BN', r" must be None or an mmcv norm config, a dict with a 'type' key.*got 'BN'"),
    (dict(typ='BN'), r" must be None or an mmcv norm config.*got \{'typ': 'BN'\}"),
    (dict(type='BatchNrom'), r"\['type'\] must be a norm class or a norm layer name registered "
                             r"in mmengine's MODELS.*got 'BatchNrom'"),
    (dict(type='GN'), r" builds a GroupNorm, which needs num_groups.*got \{'type': 'GN'\}"),
    (dict(type='LN'), r" builds a LayerNorm, which does not normalise the channels of an "
                      r"\(N, C, H, W\) map"),
    (dict(type='BN1d'), r" builds a BatchNorm1d, which does not normalise the channels"),
])
def test_bad_norm_config_error(name: str, arg: str, cfg: object, match: str) -> None:
    """mmcv's build_norm_layer answers these with a bare AssertionError or "Cannot find None
    in registry"; the block names itself and the argument instead."""
    with pytest.raises(ValueError, match=rf'^{name}: {arg}{match}'):
        BLOCKS[name](C, **{arg: cfg})


@pytest.mark.parametrize('name, arg', NORM_CFG_ARGS)
@pytest.mark.parametrize('cfg', [dict(type='GN', num_groups=1), dict(type=nn.BatchNorm2d),
                                 dict(type='mmseg.SyncBN'), dict(type=LayerNorm2d)])
def test_good_norm_configs_build(name: str, arg: str, cfg: dict) -> None:
    """What mmcv builds is accepted: a GroupNorm with its groups, a class (also a subclass of
    a refused one: timm's LayerNorm2d), a scoped name."""
    block = BLOCKS[name](C, **{arg: cfg})
    types = {type(m) for m in block.modules()}
    expected = {'GN': nn.GroupNorm, 'mmseg.SyncBN': nn.SyncBatchNorm}.get(cfg['type'],
                                                                          cfg['type'])
    assert any(issubclass(t, expected) for t in types), (cfg, types)
    if expected is not nn.SyncBatchNorm:  # which runs only in a process group on a GPU
        x = torch.randn(2, C, 5, 6)
        assert block(x).shape == x.shape


def arguments_annotated(annotation: str) -> list[tuple[str, str]]:
    """(block, argument) for every constructor argument annotated ``annotation``."""
    return [(name, arg) for name in NAMES
            for arg, prm in inspect.signature(BLOCKS[name]).parameters.items()
            if prm.annotation == annotation]


FLAGS = arguments_annotated('bool')
ACTIVATIONS = arguments_annotated('LayerType')


def test_flags_and_activations_are_found() -> None:
    assert len(FLAGS) >= 8 and len(ACTIVATIONS) >= 7, (FLAGS, ACTIVATIONS)


@pytest.mark.parametrize('name, arg', FLAGS)
@pytest.mark.parametrize('value', ['no', None, 2])
def test_a_flag_takes_only_a_bool(name: str, arg: str, value: object) -> None:
    """A truthy non-bool (``'no'``, ``2``) would switch the feature on without a word."""
    with pytest.raises(ValueError, match=rf"^{name}: {arg} must be one of \(True, False\), "
                                         rf'got {value!r}'):
        BLOCKS[name](C, **{arg: value})


@pytest.mark.parametrize('name, arg', ACTIVATIONS)
@pytest.mark.parametrize('value', [3, ('relu', ), 'rleu'])
def test_an_activation_is_a_name_or_a_class(name: str, arg: str, value: object) -> None:
    """Not an unknown name, and not a value timm would call (``'int' object is not
    callable``)."""
    with pytest.raises(ValueError, match=rf'^{name}: {arg} must be a timm activation name .*'
                                         rf'got {re.escape(repr(value))}'):
        BLOCKS[name](C, **{arg: value})


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('dtype', [torch.int64, torch.uint8, torch.bool])
def test_non_float_input_error(name: str, dtype: torch.dtype) -> None:
    """An image tensor fed without conversion: one TypeError naming the dtype and the fix."""
    block = make(name)
    with pytest.raises(TypeError, match=r'floating-point input') as info:
        block(torch.ones(1, C, 5, 5, dtype=dtype))
    assert str(dtype) in str(info.value) and 'x.float()' in str(info.value)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('hw', [(0, 5), (5, 0), (0, 0)])
def test_zero_sized_spatial_input_error(name: str, hw: tuple[int, int]) -> None:
    block = make(name)
    with pytest.raises(ValueError, match=r'H >= 1 and W >= 1') as info:
        block(torch.randn(1, C, *hw))
    assert f'H={hw[0]}, W={hw[1]}' in str(info.value)


@pytest.mark.parametrize('name', NAMES)
def test_jit_trace(name: str) -> None:
    skip_unsupported(name, 'jit.trace')
    block = make(name).eval()
    x = torch.randn(2, C, 7, 6)
    with torch.no_grad():
        traced = torch.jit.trace(block, x, check_trace=False)
        torch.testing.assert_close(traced(x), block(x))


def eager_reference(block: nn.Module, x: torch.Tensor,
                    monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The eager output on the reference path (what TorchScript compiles, and what torch.fx
    traces where a block has a faster path)."""
    with monkeypatch.context() as patch:
        patch.setenv('MMATTN_BACKEND', 'reference')
        return block(x)


@pytest.mark.parametrize('name', NAMES)
def test_jit_script(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.jit.script compiles the block; same outputs and input gradients as eager (in
    training mode too), and the input checks still raise with their message."""
    skip_unsupported(name, 'jit.script')
    block = make(name)
    scripted = torch.jit.script(block)
    x = torch.randn(2, C, 7, 6)
    for train in (False, True):
        block.train(train)
        scripted.train(train)
        xs, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref = scripted(xs), eager_reference(block, xe, monkeypatch)
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(xs.grad, xe.grad)
    with pytest.raises(Exception, match=rf'{name}: the input has {C + 1} channels'):
        scripted(torch.randn(1, C + 1, 5, 5))


def test_jit_script_refuses_a_fast_backend() -> None:
    """TorchScript compiles the reference path; an explicit faster backend refuses, naming it."""
    block = BLOCKS['PolarizedSelfAttention'](C, backend='folded')
    with pytest.raises(RuntimeError, match="backend='folded'"):
        torch.jit.script(block)


@pytest.mark.parametrize('name', NAMES)
def test_fx_symbolic_trace(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.fx.symbolic_trace traces the block (no leaf modules of its own); the graph
    gives the eager outputs, keeps the input checks, and compiles with torch.jit.script."""
    skip_unsupported(name, 'fx')
    block = make(name).eval()
    graph = torch.fx.symbolic_trace(block)
    x = torch.randn(2, C, 7, 6)
    with torch.no_grad():
        ref = eager_reference(block, x, monkeypatch)
        torch.testing.assert_close(graph(x), ref)
        torch.testing.assert_close(torch.jit.script(graph)(x), ref)
    with pytest.raises(ValueError, match=rf'{name}: the input has {C + 1} channels'):
        graph(torch.randn(1, C + 1, 5, 5))


@pytest.mark.parametrize('name', NAMES)
def test_fx_feature_extraction_in_timm_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As timm's own attention layers: in a timm ResNet (``attn_layer``), timm's FX feature
    extraction (``FeatureGraphNet``, what ``feature_cls='fx'`` builds, with timm's tracer
    settings) traces through the blocks and returns the eager features."""
    import timm
    monkeypatch.setenv('MMATTN_BACKEND', 'reference')  # the path torch.fx traces
    model = timm.create_model('resnet10t', pretrained=False,
                              block_args=dict(attn_layer=BLOCKS[name])).eval()
    perturb_zero_params(model)
    features = timm.models.FeatureGraphNet(model, out_indices=(1, 2))  # timm's tracer settings
    # traced through, not kept as a leaf module: the graph reaches into the blocks (``se``)
    graph = features.graph_module.graph
    assert _count(features, BLOCKS[name]) == 0
    assert any('.se.' in str(node.target) for node in graph.nodes)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = features(x)
        refs = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert len(outs) == len(refs) == 2
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('name', NAMES)
def test_torch_compile(name: str) -> None:
    skip_unsupported(name, 'torch.compile')
    torch._dynamo.reset()
    block = make(name).eval()
    x = torch.randn(2, C, 7, 6)
    compiled = torch.compile(block, fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


# The blocks whose compiled training graph torch 2.13.0's Inductor breaks on the CPU once the
# input size changes (the memory format of the input that shows it): Inductor converts a
# graph's convolution operands to channels-last there, and with dynamic sizes a backward
# then asserts stale strides or fails on a saved view (docs/train.md, "torch.compile and
# input sizes that change"). Measured 2026-11-29: each fails with torch.compile's defaults.
LAYOUT_OPTIMIZATION_FAILURES = {
    'SqueezeExcitation': torch.contiguous_format,
    'EfficientChannelAttention': torch.contiguous_format,
    'NonLocalAttention': torch.channels_last,
    'RecurrentCrissCrossAttention': torch.contiguous_format,
}


@pytest.mark.parametrize('name', sorted(LAYOUT_OPTIMIZATION_FAILURES))
def test_torch_compile_trains_across_sizes_without_layout_optimization(name: str) -> None:
    """The workaround docs/train.md gives, which compiles once for every size:
    ``options={'layout_optimization': False}``. Training steps at three input sizes (dynamic
    from the second) give the eager block's output and every gradient."""
    torch._dynamo.reset()
    block = make(name)
    compiled = torch.compile(block, options={'layout_optimization': False})
    check_compiled_training(block, compiled, [(2, C, 5, 7), (3, C, 6, 4), (2, C, 4, 4)],
                            LAYOUT_OPTIMIZATION_FAILURES[name])


@pytest.mark.parametrize('name', NAMES)
def test_onnx_export(name: str) -> None:
    skip_unsupported(name, 'onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    block = make(name).eval()
    x = torch.randn(2, C, 7, 6)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(block, (x,), buffer, input_names=['x'], output_names=['y'],
                          dynamo=name in ONNX_DYNAMO, opset_version=18)
        ref = block(x).numpy()
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {'x': x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=1e-4, atol=1e-5)


# --- inside host networks -------------------------------------------------------------

def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _plugins(name: str, positions: tuple[str, ...], stages: tuple[bool, ...]) -> list[dict]:
    # one plugin per position, each with its own postfix (mmcv names the submodule
    # `<_abbr_><postfix>`; mmseg 1.2.2 keeps only the last of several plugins at one position)
    return [dict(cfg=dict(type=f'mmattn.{name}', postfix=f'_{i}'), position=pos, stages=stages)
            for i, pos in enumerate(positions)]


@pytest.mark.parametrize('name', NAMES)
def test_plugin_in_mmseg_resnetv1c(name: str) -> None:
    """All three positions of a Bottleneck ResNet, last stage."""
    from mmseg.models.backbones import ResNetV1c
    model = ResNetV1c(depth=50, base_channels=16, stem_channels=16, out_indices=(3,),
                      plugins=_plugins(name, ('after_conv1', 'after_conv2', 'after_conv3'),
                                       (False, False, False, True)))
    model.eval()  # mmseg's ResNet.train() returns None: do not chain it
    assert _count(model, BLOCKS[name]) == 3 * 3
    assert hasattr(model.layer4[0], BLOCKS[name]._abbr_ + '_2')
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 48))
    assert out.shape == (1, 16 * 4 * 8, 2, 2)


@pytest.mark.parametrize('name', NAMES)
def test_plugin_in_mmdet_resnet(name: str) -> None:
    """mmdet's ResNet (plugins only in its Bottleneck), two positions, two stages."""
    from mmdet.models.backbones import ResNet
    model = ResNet(depth=50, base_channels=16, out_indices=(2, 3),
                   plugins=_plugins(name, ('after_conv2', 'after_conv3'), (False, False, True, True)))
    model.eval()
    assert _count(model, BLOCKS[name]) == 2 * (6 + 3)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [16 * 4 * 4, 16 * 4 * 8]


@pytest.mark.parametrize('name', NAMES)
def test_timm_attn_layer(name: str) -> None:
    import timm
    model = timm.create_model('resnet26', pretrained=False, num_classes=5,
                              block_args=dict(attn_layer=BLOCKS[name]))
    assert _count(model, BLOCKS[name]) == 8
    perturb_zero_params(model)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5)
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'
