"""Polarized Self-Attention (arXiv 2107.00782): the maths against float64 references, the
checkpoint keys of the public implementations, gradients, the branches alone, the mask hooks
and the error cases.

Two references live here:

* ``paper_*``: written from the paper's Eq. 1-5 with plain torch ops (einsum, softmax, sigmoid
  and a LayerNorm formula of our own) on a dict of weights;
* ``release_*``: transcribed from the forward of the authors' release (DeLightCMU/PSA,
  ``semantic-segmentation/network/PSA.py``, ``PSA_p`` / ``PSA_s``: ``spatial_pool`` is the
  channel branch, ``channel_pool`` the spatial one). That reference follows the release's code
  on purpose: the release *is* the definition of ``variant='official'``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mmattn.layers.psa import (PolarizedChannelAttention, PolarizedSelfAttention,
                               PolarizedSpatialAttention)
from mmattn.registry import MODELS

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(1, 4, 1, 1), (2, 8, 7, 5), (1, 6, 7, 5), (3, 2, 2, 3), (2, 10, 4, 4), (2, 32, 3, 5)]
MODES = ['parallel', 'sequential']
LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by both public implementations


# ---------------------------------------------------------------- reference building blocks
def conv1x1(x: Tensor, sd: dict, name: str) -> Tensor:
    """A 1x1 convolution written as a sum over input channels."""
    y = torch.einsum('oc,nchw->nohw', sd[f'{name}.weight'][:, :, 0, 0], x)
    if f'{name}.bias' in sd:
        y = y + sd[f'{name}.bias'][None, :, None, None]
    return y


def layer_norm(t: Tensor, dims: tuple[int, ...], weight: Tensor, bias: Tensor) -> Tensor:
    """(t - E[t]) / sqrt(Var[t] + eps) * weight + bias over ``dims`` (biased variance)."""
    mean = t.mean(dims, keepdim=True)
    var = ((t - mean) ** 2).mean(dims, keepdim=True)
    return (t - mean) / torch.sqrt(var + LN_EPS) * weight + bias


def softmax_pixels(t: Tensor) -> Tensor:
    """Softmax over H and W of an N x K x H x W tensor: exp(t) / sum_hw exp(t)."""
    e = torch.exp(t - t.amax((2, 3), keepdim=True))
    return e / e.sum((2, 3), keepdim=True)


# ---------------------------------------------------------------- the paper (Eq. 1-5)
def paper_channel_mask(x: Tensor, sd: dict) -> Tensor:
    """Eq. 1: A^ch = sigmoid(LN_C(W_z(W_v x . softmax_HW(W_q x)))), shape N x C x 1 x 1."""
    v = conv1x1(x, sd, 'ch_wv')                           # N x C/2 x H x W
    q = softmax_pixels(conv1x1(x, sd, 'ch_wq'))[:, 0]     # N x H x W
    z = torch.einsum('nchw,nhw->nc', v, q)                # N x C/2
    z = torch.einsum('oc,nc->no', sd['ch_wz.weight'][:, :, 0, 0], z) + sd['ch_wz.bias']
    z = layer_norm(z, (1,), sd['ln.weight'], sd['ln.bias'])
    return torch.sigmoid(z)[:, :, None, None]


def paper_spatial_mask(x: Tensor, sd: dict) -> Tensor:
    """Eq. 3: A^sp = sigmoid(softmax_C(GP(W_q x)) . W_v x), shape N x 1 x H x W."""
    q = torch.softmax(conv1x1(x, sd, 'sp_wq').mean((2, 3)), dim=1)   # N x C/2
    v = conv1x1(x, sd, 'sp_wv')                                      # N x C/2 x H x W
    return torch.sigmoid(torch.einsum('nc,nchw->nhw', q, v))[:, None]


def paper_psa(x: Tensor, sd: dict, mode: str) -> Tensor:
    """Eq. 5: parallel A^ch(x) x + A^sp(x) x; sequential A^sp(z) z with z = A^ch(x) x."""
    z = paper_channel_mask(x, sd) * x
    if mode == 'parallel':
        return z + paper_spatial_mask(x, sd) * x
    return paper_spatial_mask(z, sd) * z


# ---------------------------------------------------------------- the release (PSA_p / PSA_s)
def release_spatial_pool(x: Tensor, sd: dict, mode: str) -> Tensor:
    """``PSA_*.spatial_pool`` (the channel branch), returns ``x * mask_ch``."""
    input_x = conv1x1(x, sd, 'conv_v_right')
    batch, channel, height, width = input_x.shape
    input_x = input_x.reshape(batch, channel, height * width)
    context_mask = conv1x1(x, sd, 'conv_q_right').reshape(batch, 1, height * width)
    context_mask = torch.softmax(context_mask, dim=2)
    context = torch.matmul(input_x, context_mask.transpose(1, 2)).unsqueeze(-1)
    if mode == 'parallel':   # conv_up = Conv2d(IC, C, 1, bias=False)
        context = conv1x1(context, sd, 'conv_up')
    else:                    # conv_up = Sequential(Conv2d, LayerNorm([IC/r, 1, 1]), ReLU, Conv2d)
        context = conv1x1(context, sd, 'conv_up.0')
        context = layer_norm(context, (1, 2, 3), sd['conv_up.1.weight'], sd['conv_up.1.bias'])
        context = torch.relu(context)
        context = conv1x1(context, sd, 'conv_up.3')
    return x * torch.sigmoid(context)


def release_channel_pool(x: Tensor, sd: dict, mode: str) -> Tensor:
    """``PSA_*.channel_pool`` (the spatial branch), returns ``x * mask_sp``."""
    g_x = conv1x1(x, sd, 'conv_q_left')
    batch, channel, height, width = g_x.shape
    avg_x = g_x.mean((2, 3), keepdim=True).reshape(batch, channel, 1).permute(0, 2, 1)
    theta_x = conv1x1(x, sd, 'conv_v_left').reshape(batch, channel, height * width)
    if mode == 'parallel':   # PSA_p: softmax_left on the product
        context = torch.softmax(torch.matmul(avg_x, theta_x), dim=2)
    else:                    # PSA_s: softmax_left on theta_x
        context = torch.matmul(avg_x, torch.softmax(theta_x, dim=2))
    return x * torch.sigmoid(context.reshape(batch, 1, height, width))


def release_psa(x: Tensor, sd: dict, mode: str) -> Tensor:
    """``PSA_p.forward`` (sum of both branches) / ``PSA_s.forward`` (channel, then spatial)."""
    if mode == 'parallel':
        return release_channel_pool(x, sd, mode) + release_spatial_pool(x, sd, mode)
    return release_channel_pool(release_spatial_pool(x, sd, mode), sd, mode)


# ---------------------------------------------------------------- the public checkpoints' keys
def xmu_keys(c: int) -> dict[str, tuple[int, ...]]:
    """External-Attention-pytorch ``Parallel/SequentialPolarizedSelfAttention(channel=c)``."""
    return {'ch_wv.weight': (c // 2, c, 1, 1), 'ch_wv.bias': (c // 2,),
            'ch_wq.weight': (1, c, 1, 1), 'ch_wq.bias': (1,),
            'ch_wz.weight': (c, c // 2, 1, 1), 'ch_wz.bias': (c,),
            'ln.weight': (c,), 'ln.bias': (c,),
            'sp_wv.weight': (c // 2, c, 1, 1), 'sp_wv.bias': (c // 2,),
            'sp_wq.weight': (c // 2, c, 1, 1), 'sp_wq.bias': (c // 2,)}


def release_keys(c: int, mode: str, ratio: int = 4) -> dict[str, tuple[int, ...]]:
    """DeLightCMU/PSA ``PSA_p(c, c)`` / ``PSA_s(c, c)`` (``ratio = 4`` in the release)."""
    ic = c // 2
    keys = {'conv_q_right.weight': (1, c, 1, 1), 'conv_v_right.weight': (ic, c, 1, 1)}
    if mode == 'parallel':
        keys['conv_up.weight'] = (c, ic, 1, 1)
    else:
        r = ic // ratio
        keys.update({'conv_up.0.weight': (r, ic, 1, 1), 'conv_up.0.bias': (r,),
                     'conv_up.1.weight': (r, 1, 1), 'conv_up.1.bias': (r, 1, 1),
                     'conv_up.3.weight': (c, r, 1, 1), 'conv_up.3.bias': (c,)})
    keys.update({'conv_q_left.weight': (ic, c, 1, 1), 'conv_v_left.weight': (ic, c, 1, 1)})
    return keys


def random_state(keys: dict[str, tuple[int, ...]], std: float = 0.5) -> dict[str, Tensor]:
    """Random float64 weights (LayerNorm affines and biases too, so every term matters)."""
    return {k: torch.randn(shape, dtype=F64) * std for k, shape in keys.items()}


def shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def loaded(cls: type, c: int, sd: dict, **kwargs) -> torch.nn.Module:
    block = cls(c, dtype=F64, **kwargs)
    block.load_state_dict(sd, strict=True)
    return block.eval()


def official_ratio(c: int) -> int:
    """The release's ratio 4 where C/2 allows it, else the largest ratio that does."""
    return min(4, c // 2)


# ---------------------------------------------------------------- the maths
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES)
def test_paper_matches_equations(mode: str, shape: tuple[int, ...]) -> None:
    c = shape[1]
    sd = random_state(xmu_keys(c))
    block = loaded(PolarizedSelfAttention, c, sd, mode=mode)
    x = torch.randn(shape, dtype=F64)
    torch.testing.assert_close(block(x), paper_psa(x, sd, mode), **TOL)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES)
def test_official_matches_release(mode: str, shape: tuple[int, ...]) -> None:
    c = shape[1]
    ratio = official_ratio(c) if mode == 'sequential' else None
    sd = random_state(release_keys(c, mode, ratio or 4))
    block = loaded(PolarizedSelfAttention, c, sd, mode=mode, variant='official', ratio=ratio)
    x = torch.randn(shape, dtype=F64)
    torch.testing.assert_close(block(x), release_psa(x, sd, mode), **TOL)


def test_default_construction_is_paper_parallel() -> None:
    block = PolarizedSelfAttention(32)
    assert (block.mode, block.variant, block.ratio) == ('parallel', 'paper', None)
    assert shapes_of(block) == xmu_keys(32)
    x = torch.randn(2, 32, 5, 3, dtype=F64)
    sd = {k: v.to(F64) for k, v in block.state_dict().items()}
    torch.testing.assert_close(block.to(F64)(x), paper_psa(x, sd, 'parallel'), **TOL)


def test_variants_differ() -> None:
    """The release is not the paper: same input, different maths (guards against the two
    variants silently sharing one code path)."""
    x = torch.randn(2, 8, 5, 4, dtype=F64)
    for mode in MODES:
        sd_p, sd_o = random_state(xmu_keys(8)), random_state(release_keys(8, mode))
        paper = loaded(PolarizedSelfAttention, 8, sd_p, mode=mode)(x)
        assert not torch.allclose(paper, release_psa(x, sd_o, mode))
        assert not torch.allclose(release_psa(x, sd_o, mode), paper_psa(x, sd_p, mode))


def test_paper_ch_wq_bias_is_redundant() -> None:
    """The checkpoint-compatible ``ch_wq.bias`` shifts all pixel logits equally, which the
    softmax over pixels removes (the module docstring says so)."""
    sd = random_state(xmu_keys(8))
    x = torch.randn(2, 8, 5, 3, dtype=F64)
    block = loaded(PolarizedSelfAttention, 8, sd)
    ref = block(x)
    with torch.no_grad():
        block.ch_wq.bias.add_(3.0)
    torch.testing.assert_close(block(x), ref, **TOL)


def test_official_parallel_spatial_mask_range() -> None:
    """PSA_p applies the sigmoid to a softmax over pixels: the mask lies in (0.5, sigmoid(1)]
    and averages 0.5 + O(1/HW) (the module docstring states this)."""
    block = PolarizedSpatialAttention(16, variant='official', mode='parallel', dtype=F64)
    mask = block.spatial_mask(torch.randn(2, 16, 16, 16, dtype=F64))
    assert mask.shape == (2, 1, 16, 16)
    assert mask.min() > 0.5 and mask.max() <= 1 / (1 + math.exp(-1))
    torch.testing.assert_close(mask.mean((1, 2, 3)), torch.full((2,), 0.5 + 0.25 / 256, dtype=F64),
                               rtol=0, atol=1e-3)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('c', [8, 48, 64])
def test_paper_loads_external_attention_checkpoint(mode: str, c: int) -> None:
    assert shapes_of(PolarizedSelfAttention(c, mode=mode)) == xmu_keys(c)
    sd = random_state(xmu_keys(c))
    block = loaded(PolarizedSelfAttention, c, sd, mode=mode)
    x = torch.randn(1, c, 3, 4, dtype=F64)
    torch.testing.assert_close(block(x), paper_psa(x, sd, mode), **TOL)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('c', [8, 48, 96])   # 48/96: HRNet-W48 branches (deattn = PSA_s)
def test_official_loads_release_checkpoint(mode: str, c: int) -> None:
    assert shapes_of(PolarizedSelfAttention(c, mode=mode, variant='official')) == \
        release_keys(c, mode)
    sd = random_state(release_keys(c, mode))
    block = loaded(PolarizedSelfAttention, c, sd, mode=mode, variant='official')
    x = torch.randn(1, c, 3, 4, dtype=F64)
    torch.testing.assert_close(block(x), release_psa(x, sd, mode), **TOL)


def test_official_ratio_changes_bottleneck() -> None:
    block = PolarizedSelfAttention(32, mode='sequential', variant='official', ratio=2)
    assert shapes_of(block) == release_keys(32, 'sequential', ratio=2)


def test_official_init_is_kaiming_fan_in_without_bias() -> None:
    block = PolarizedSelfAttention(256, variant='official')
    for name in ('conv_q_right', 'conv_v_right', 'conv_q_left', 'conv_v_left'):
        conv = getattr(block, name)
        assert conv.bias is None
        # kaiming_normal_(fan_in, relu): std = sqrt(2 / fan_in), fan_in = 256
        assert abs(conv.weight.std().item() / math.sqrt(2 / 256) - 1) < 0.15, name


def test_keys_are_not_prefixed_by_branch_names() -> None:
    """The composed block registers both branches' parameters at its top level."""
    ch = PolarizedChannelAttention(8)
    sp = PolarizedSpatialAttention(8)
    assert set(shapes_of(ch)) | set(shapes_of(sp)) == set(xmu_keys(8))
    ch = PolarizedChannelAttention(8, variant='official', mode='sequential')
    sp = PolarizedSpatialAttention(8, variant='official', mode='sequential')
    assert set(shapes_of(ch)) | set(shapes_of(sp)) == set(release_keys(8, 'sequential'))


# ---------------------------------------------------------------- the branches alone, masks
def _split(sd: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


@pytest.mark.parametrize('shape', [(1, 4, 1, 1), (2, 8, 7, 5)])
def test_paper_branches_alone(shape: tuple[int, ...]) -> None:
    c = shape[1]
    sd = random_state(xmu_keys(c))
    x = torch.randn(shape, dtype=F64)
    ch = loaded(PolarizedChannelAttention, c, _split(sd, ('ch_', 'ln.')))
    sp = loaded(PolarizedSpatialAttention, c, _split(sd, ('sp_',)))
    torch.testing.assert_close(ch(x), paper_channel_mask(x, sd) * x, **TOL)
    torch.testing.assert_close(sp(x), paper_spatial_mask(x, sd) * x, **TOL)
    assert ch.channel_mask(x).shape == (shape[0], c, 1, 1)
    assert sp.spatial_mask(x).shape == (shape[0], 1, shape[2], shape[3])


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', [(1, 8, 1, 1), (2, 8, 7, 5)])
def test_official_branches_alone(mode: str, shape: tuple[int, ...]) -> None:
    c = shape[1]
    sd = random_state(release_keys(c, mode))
    x = torch.randn(shape, dtype=F64)
    ch = loaded(PolarizedChannelAttention, c, _split(sd, ('conv_q_right', 'conv_v_right',
                                                          'conv_up')),
                variant='official', mode=mode)
    sp = loaded(PolarizedSpatialAttention, c, _split(sd, ('conv_q_left', 'conv_v_left')),
                variant='official', mode=mode)
    torch.testing.assert_close(ch(x), release_spatial_pool(x, sd, mode), **TOL)
    torch.testing.assert_close(sp(x), release_channel_pool(x, sd, mode), **TOL)


@pytest.mark.parametrize('mode', MODES)
def test_gate_hooks_capture_the_masks_used(mode: str) -> None:
    sd = random_state(xmu_keys(6))
    block = loaded(PolarizedSelfAttention, 6, sd, mode=mode)
    seen: dict[str, Tensor] = {}
    for name in ('channel_gate', 'spatial_gate'):
        getattr(block, name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out))
    x = torch.randn(2, 6, 7, 5, dtype=F64)
    block(x)
    a_ch = paper_channel_mask(x, sd)
    torch.testing.assert_close(seen['channel_gate'], a_ch, **TOL)
    sp_input = x if mode == 'parallel' else a_ch * x
    torch.testing.assert_close(seen['spatial_gate'], paper_spatial_mask(sp_input, sd), **TOL)
    torch.testing.assert_close(block.channel_mask(x), a_ch, **TOL)
    torch.testing.assert_close(block.spatial_mask(x), paper_spatial_mask(x, sd), **TOL)


# ---------------------------------------------------------------- gradients, tracing
# the paper's branches do not depend on mode: one mode for them alone
GRAD_CASES = [(cls, variant, mode) for cls in (PolarizedSelfAttention, PolarizedChannelAttention,
                                               PolarizedSpatialAttention)
              for variant in ('paper', 'official') for mode in MODES
              if cls is PolarizedSelfAttention or variant == 'official' or mode == 'parallel']


@pytest.mark.parametrize('cls,variant,mode', GRAD_CASES)
def test_gradcheck(cls: type, variant: str, mode: str) -> None:
    """Gradients w.r.t. the input and every parameter, in float64."""
    kwargs = dict(variant=variant, mode=mode)
    if cls is not PolarizedSpatialAttention and variant == 'official' and mode == 'sequential':
        kwargs['ratio'] = 2   # a 2-channel bottleneck, so its LayerNorm is not degenerate
    block = cls(8, dtype=F64, **kwargs)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(1, 8, 3, 2, dtype=F64, requires_grad=True)

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore::torch.jit.TracerWarning')
@pytest.mark.parametrize('variant', ['paper', 'official'])
@pytest.mark.parametrize('mode', MODES)
def test_trace_generalises_to_other_sizes(variant: str, mode: str) -> None:
    """No value-dependent Python control flow: a trace on one size is exact on others."""
    block = PolarizedSelfAttention(8, mode=mode, variant=variant, dtype=F64).eval()
    traced = torch.jit.trace(block, torch.randn(1, 8, 7, 5, dtype=F64))
    for shape in [(2, 8, 1, 1), (3, 8, 4, 6)]:
        x = torch.randn(shape, dtype=F64)
        torch.testing.assert_close(traced(x), block(x), **TOL)


@pytest.mark.parametrize('variant', ['paper', 'official'])
@pytest.mark.parametrize('mode', MODES)
def test_torch_compile_fullgraph_training(variant: str, mode: str) -> None:
    """torch.compile traces the block's default path (the folded op for the paper form, the
    folded PyTorch form for the release's; the fused C++ block where the compiled kernels are
    loaded, MMATTN_JIT=1) as one graph, forward and backward: the backend choice and the input
    checks break no graph. Output and gradients equal eager."""
    torch._dynamo.reset()
    block = PolarizedSelfAttention(8, mode=mode, variant=variant, dtype=F64)
    assert block.selected_backend(torch.empty(1, 8, 2, 2, dtype=F64))[0] in ('folded', 'cpu')
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 8, 5, 3, dtype=F64, requires_grad=True)
    grads = []
    for fn in (block, compiled):
        block.zero_grad()
        x.grad = None
        y = fn(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum().backward()
        grads.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]))
    (y_ref, gx_ref, gp_ref), (y_c, gx_c, gp_c) = grads
    torch.testing.assert_close(y_c, y_ref, **TOL)
    torch.testing.assert_close(gx_c, gx_ref, **TOL)
    for g_c, g_ref in zip(gp_c, gp_ref):
        torch.testing.assert_close(g_c, g_ref, **TOL)


# ---------------------------------------------------------------- registry and errors
def test_registered() -> None:
    for name in ('PolarizedSelfAttention', 'PolarizedChannelAttention',
                 'PolarizedSpatialAttention'):
        block = MODELS.build(dict(type=f'mmattn.{name}', in_channels=8, variant='official'))
        assert type(block).__name__ == name
    assert PolarizedSelfAttention._abbr_ == 'psa'


@pytest.mark.parametrize('cls', [PolarizedSelfAttention, PolarizedChannelAttention,
                                 PolarizedSpatialAttention])
def test_errors(cls: type) -> None:
    with pytest.raises(ValueError, match='in_channels.*even.*in_channels=7'):
        cls(7)
    with pytest.raises(ValueError, match='in_channels'):
        cls(0)
    with pytest.raises(ValueError, match="mode.*'diagonal'"):
        cls(8, mode='diagonal')
    with pytest.raises(ValueError, match="variant.*'authors'"):
        cls(8, variant='authors')
    with pytest.raises(ValueError, match='in_channels=8'):
        cls(8)(torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match='4-D'):
        cls(8)(torch.randn(8, 3, 3))


@pytest.mark.parametrize('cls', [PolarizedSelfAttention, PolarizedChannelAttention])
def test_ratio_errors(cls: type) -> None:
    with pytest.raises(ValueError, match='ratio.*only used'):
        cls(8, ratio=4)
    with pytest.raises(ValueError, match='ratio.*only used'):
        cls(8, variant='official', mode='parallel', ratio=4)
    with pytest.raises(ValueError, match='ratio'):
        cls(8, variant='official', mode='sequential', ratio=0)
    with pytest.raises(ValueError, match='in_channels=4, ratio=4'):
        cls(4, variant='official', mode='sequential')
