"""NonLocalAttention against the non-local paper's Eq. 1-2 and Sec. 3.2-3.3 written out in
float64 (every pairwise function, sub-sampling, W_z with and without BN), the SDPA path against the
explicit one, the memory claim (no HW x HW tensor on the SDPA path), mmcv NonLocal2d's keys and
outputs, attention_map, gradcheck and the argument checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compile_checks import check_compiled_training
from op_recorder import OpRecorder

from mmattn.layers import NonLocalAttention
from mmattn.layers.non_local import softmax_attention

MODES = ('embedded_gaussian', 'dot_product', 'gaussian', 'concatenation')
SHAPES = [(2, 8, 5, 7), (1, 8, 1, 1), (1, 6, 3, 3), (2, 4, 4, 6), (1, 8, 1, 9)]


def branch_conv(branch: nn.Module) -> nn.Conv2d:
    """The 1x1 conv of a g/theta/phi branch (a ConvModule, or Sequential(ConvModule, pool))."""
    return branch[0].conv if isinstance(branch, nn.Sequential) else branch.conv


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    out = torch.einsum('oc,bchw->bohw', conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, stride 2; a ragged last row/column forms its own (smaller) window."""
    b, c, h, w = x.shape
    x = F.pad(x, (0, w % 2, 0, h % 2), value=-math.inf)
    return x.reshape(b, c, (h + 1) // 2, 2, (w + 1) // 2, 2).amax(dim=(3, 5))


def pairwise_reference(m: NonLocalAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x_i, x_j) / C(x) as (B, N, M), g(x_j) as (B, C', M)) from Sec. 3.2."""
    if m.mode == 'gaussian':
        theta, phi = x, x
    else:
        theta, phi = conv1x1(x, branch_conv(m.theta)), conv1x1(x, branch_conv(m.phi))
    g = conv1x1(x, branch_conv(m.g))
    if m.sub_sample:  # Sec. 3.3: max pooling after phi and g
        phi, g = max_pool_2x2(phi), max_pool_2x2(g)
    th, ph, g = theta.flatten(2), phi.flatten(2), g.flatten(2)
    n_keys = ph.shape[-1]
    dot = torch.einsum('bdi,bdj->bij', th, ph)
    if m.mode in ('embedded_gaussian', 'gaussian'):
        s = 1 / math.sqrt(th.shape[1]) if m.scale else 1.0
        f = torch.exp(dot * s)
        return f / f.sum(dim=-1, keepdim=True), g
    if m.mode == 'dot_product':
        return dot / n_keys, g
    # concatenation: ReLU(w_f^T [theta(x_i), phi(x_j)]), the concatenation built literally
    n, d = th.shape[-1], th.shape[1]
    pair = torch.cat([th[:, :, :, None].expand(-1, d, n, n_keys),
                      ph[:, :, None, :].expand(-1, d, n, n_keys)], dim=1)
    w_f = m.concat_project.conv.weight.flatten()
    return F.relu(torch.einsum('k,bkij->bij', w_f, pair)) / n_keys, g


def nonlocal_reference(m: NonLocalAttention, x: torch.Tensor) -> torch.Tensor:
    """z = W_z y + x with y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j) (Eq. 1-2)."""
    b, _, h, w = x.shape
    weights, g = pairwise_reference(m, x)
    y = torch.einsum('bij,bcj->bci', weights, g).reshape(b, -1, h, w)
    z = conv1x1(y, m.conv_out.conv)
    if m.conv_out.with_norm:  # BN in eval mode
        bn = m.conv_out.norm
        z = ((z - bn.running_mean[None, :, None, None])
             / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
             * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    return z + x


def randomise(m: NonLocalAttention) -> NonLocalAttention:
    """Non-zero W_z (zero at init) and BN statistics, so the attention term shows."""
    with torch.no_grad():
        for p in m.conv_out.parameters():
            p.normal_(0, 0.5)
        if m.conv_out.with_norm:
            m.conv_out.norm.running_mean.normal_()
            m.conv_out.norm.running_var.uniform_(0.5, 2.0)
    return m.eval()


def make(c: int, **kw) -> NonLocalAttention:
    return randomise(NonLocalAttention(c, dtype=torch.float64, **kw))


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('sub_sample', [False, True])
@pytest.mark.parametrize('mode', MODES)
def test_matches_paper(mode: str, sub_sample: bool, shape: tuple) -> None:
    m = make(shape[1], mode=mode, sub_sample=sub_sample, efficient=False)
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), nonlocal_reference(m, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('sub_sample', [False, True])
@pytest.mark.parametrize('mode', ['embedded_gaussian', 'gaussian'])
@pytest.mark.parametrize('scale', [False, True])
def test_efficient_matches_paper_and_explicit(mode: str, sub_sample: bool, scale: bool,
                                              shape: tuple) -> None:
    fast = make(shape[1], mode=mode, sub_sample=sub_sample, scale=scale)
    assert fast.efficient  # the default for the softmax modes
    slow = NonLocalAttention(shape[1], mode=mode, sub_sample=sub_sample, scale=scale,
                             efficient=False, dtype=torch.float64).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    out = fast(x)
    torch.testing.assert_close(out, slow(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(out, nonlocal_reference(fast, x), rtol=0, atol=1e-10)


def test_scale_divides_logits_by_sqrt_width() -> None:
    """scale=True is f = exp(theta_i.phi_j / sqrt(C')) (C in gaussian mode), and it changes
    the output."""
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    for mode, width in (('embedded_gaussian', 4), ('gaussian', 8)):
        m = make(8, mode=mode, scale=True, efficient=False)
        weights, _ = pairwise_reference(m, x)
        th = x if mode == 'gaussian' else conv1x1(x, m.theta.conv)
        ph = x if mode == 'gaussian' else conv1x1(x, m.phi.conv)
        logits = torch.einsum('bdi,bdj->bij', th.flatten(2), ph.flatten(2)) / math.sqrt(width)
        torch.testing.assert_close(weights, torch.softmax(logits, -1), rtol=0, atol=1e-12)
        unscaled = NonLocalAttention(8, mode=mode, efficient=False, dtype=torch.float64).eval()
        unscaled.load_state_dict(m.state_dict())
        assert (m(x) - unscaled(x)).abs().max() > 1e-6


@pytest.mark.parametrize('d, e', [(4, 4), (8, 3), (2, 8), (3, 7), (1, 5)])
def test_softmax_attention_paths_agree(d: int, e: int) -> None:
    """softmax(s q k^T) v written out, against both paths (v padded / split into heads)."""
    q = torch.randn(2, 11, d, dtype=torch.float64)
    k = torch.randn(2, 6, d, dtype=torch.float64)
    v = torch.randn(2, 6, e, dtype=torch.float64)
    logits = torch.einsum('bnd,bmd->bnm', q, k) * 0.7
    p = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    ref = torch.einsum('bnm,bme->bne', p, v)
    for efficient in (False, True):
        out = softmax_attention(q, k, v, scale=0.7, efficient=efficient)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize('d, e, copies', [(8, 3, 3), (4, 4, 3), (3, 6, 3), (3, 7, 4)])
def test_softmax_attention_copies(d: int, e: int, copies: int) -> None:
    """The SDPA path copies q, k and v once each (unit stride along the head dim, and no view
    saved for torch.compile's backward); padding v is its copy where one head holds it
    ('gaussian' mode, d = C > e). Only v split into heads it must pad is copied twice. And
    SDPA takes a fused kernel, never the quadratic maths."""
    q, k, v = torch.randn(2, 11, d), torch.randn(2, 6, d), torch.randn(2, 6, e)
    with OpRecorder() as ops:
        softmax_attention(q, k, v, scale=0.7, efficient=True)
    sdpa = next(i for i, name in enumerate(ops.names) if 'scaled_dot_product' in name)
    before = ops.names[:sdpa]
    assert sum(name in ('clone', 'constant_pad_nd', 'copy_', '_to_copy')
               for name in before) == copies, before
    assert not any(name.startswith(('bmm', 'matmul', '_softmax')) for name in ops.names)


@pytest.mark.parametrize('mode', ['embedded_gaussian', 'gaussian'])
def test_efficient_path_never_builds_hw_by_hw(mode: str) -> None:
    """Forward and backward of the SDPA path keep every tensor far below (HW)^2 elements; the
    explicit path (the control) does build it."""
    x = torch.randn(1, 8, 16, 24, requires_grad=True)
    hw2 = (16 * 24) ** 2
    for efficient in (True, False):
        m = randomise(NonLocalAttention(8, mode=mode, efficient=efficient))
        with OpRecorder() as probe:
            m(x).sum().backward()
        if efficient:
            assert probe.largest < hw2 // 16, probe.largest
        else:
            assert probe.largest >= hw2


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('norm_cfg', [None, dict(type='BN')])
def test_identity_at_init(mode: str, norm_cfg: dict | None) -> None:
    """Sec. 3.3: W_z (or its BN scale) starts at zero, so z = x exactly (train mode too)."""
    m = NonLocalAttention(8, mode=mode, norm_cfg=norm_cfg, sub_sample=True)
    x = torch.randn(2, 8, 5, 6)
    assert torch.equal(m(x), x)
    zeroed = m.conv_out.norm if norm_cfg else m.conv_out.conv
    assert not zeroed.weight.any() and not zeroed.bias.any()


@pytest.mark.parametrize('mode', MODES)
def test_with_batch_norm_matches_paper(mode: str) -> None:
    m = make(8, mode=mode, norm_cfg=dict(type='BN'), sub_sample=True)
    x = torch.randn(2, 8, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x), nonlocal_reference(m, x), rtol=0, atol=1e-10)


def test_reduction_and_inter_channels() -> None:
    assert NonLocalAttention(32).inter_channels == 16
    assert NonLocalAttention(32, reduction=4).inter_channels == 8
    assert NonLocalAttention(3, reduction=8).inter_channels == 1
    m = make(3, reduction=8, mode='dot_product')
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), nonlocal_reference(m, x), rtol=0, atol=1e-10)


def test_sub_sample_key_grid() -> None:
    """Keys are pooled 2x2 (ceil): a 5x7 map has 3x4 keys, a 1x1 map keeps its one pixel."""
    m = make(8, sub_sample=True)
    assert m.attention_map(torch.randn(1, 8, 5, 7, dtype=torch.float64), 0).shape == (1, 3, 4)
    assert m.attention_map(torch.randn(1, 8, 1, 1, dtype=torch.float64), 0).shape == (1, 1, 1)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('sub_sample', [False, True])
def test_attention_map(mode: str, sub_sample: bool) -> None:
    m = make(6, mode=mode, sub_sample=sub_sample)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    weights, _ = pairwise_reference(m, x)
    grid = (3, 2) if sub_sample else (5, 4)
    for index in (0, 7, 19):
        amap = m.attention_map(x, index)
        assert amap.shape == (2, *grid)
        torch.testing.assert_close(amap.flatten(1), weights[:, index], rtol=0, atol=1e-12)
    torch.testing.assert_close(m.attention_map(x, (1, 3)), m.attention_map(x, 7))
    if mode in ('embedded_gaussian', 'gaussian'):
        torch.testing.assert_close(amap.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize('mode, efficient', [(mode, False) for mode in MODES]
                         + [('embedded_gaussian', True), ('gaussian', True)])
def test_gradcheck(mode: str, efficient: bool) -> None:
    m = make(4, mode=mode, efficient=efficient, sub_sample=mode == 'gaussian')
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def mmcv_to_mmattn_scale(mode: str, use_scale: bool) -> bool:
    """The ``scale`` that reproduces mmcv ``NonLocal2d(mode=mode, use_scale=use_scale)``, read
    from mmcv's source: only ``embedded_gaussian`` divides by ``sqrt(inter_channels)``;
    ``gaussian``, ``dot_product`` and ``concatenation`` never look at ``use_scale``."""
    return use_scale if mode == 'embedded_gaussian' else False


def mmcv_pair(mode: str, use_scale: bool, sub_sample: bool, norm_cfg: dict | None,
              scale: bool | None = None) -> tuple[nn.Module, NonLocalAttention]:
    """mmcv's NonLocal2d with random weights and NonLocalAttention (``scale`` mapped from
    ``use_scale`` unless given) holding the same weights. The key mapping is the identity
    within the block (the plugin prefix, ``nonlocal_block`` in mmcv hosts and ``nonlocal`` in
    ours, lies outside it): every key of one is a key of the other, with the same shape."""
    from mmcv.cnn import NonLocal2d
    theirs = NonLocal2d(8, mode=mode, sub_sample=sub_sample, norm_cfg=norm_cfg,
                        use_scale=use_scale).double()
    if scale is None:
        scale = mmcv_to_mmattn_scale(mode, use_scale)
    ours = NonLocalAttention(8, mode=mode, sub_sample=sub_sample, norm_cfg=norm_cfg, scale=scale,
                             dtype=torch.float64)
    key_map = {key: key for key in theirs.state_dict()}
    assert sorted(key_map.values()) == sorted(ours.state_dict())
    randomise(theirs)
    ours.load_state_dict({key_map[k]: v for k, v in theirs.state_dict().items()})  # strict
    return theirs, ours.eval()


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('use_scale', [False, True])
@pytest.mark.parametrize('sub_sample', [False, True])
@pytest.mark.parametrize('norm_cfg', [None, dict(type='BN')])
def test_mmcv_non_local_2d_keys_and_outputs(mode: str, use_scale: bool, sub_sample: bool,
                                            norm_cfg: dict | None) -> None:
    """Same keys and output as mmcv's NonLocal2d for every mode and use_scale, with scale
    mapped as the docstring says (an odd map without sub_sample; with it an even map, where
    mmcv's floor-mode pooling equals our ceil mode)."""
    theirs, ours = mmcv_pair(mode, use_scale, sub_sample, norm_cfg)
    x = torch.randn((2, 8, 4, 6) if sub_sample else (2, 8, 5, 7), dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize('sub_sample', [False, True])
def test_mmcv_gaussian_never_scales(sub_sample: bool) -> None:
    """mmcv's gaussian mode gives one output whatever use_scale, equal to scale=False here;
    scale=True here (logits / sqrt(C)) differs from both."""
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    theirs_scaled, ours_plain = mmcv_pair('gaussian', True, sub_sample, None, scale=False)
    theirs_plain = mmcv_pair('gaussian', False, sub_sample, None)[0]
    theirs_plain.load_state_dict(theirs_scaled.state_dict())
    reference = theirs_scaled(x)
    torch.testing.assert_close(theirs_plain(x), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours_plain(x), reference, rtol=0, atol=1e-10)
    ours_scaled = NonLocalAttention(8, mode='gaussian', sub_sample=sub_sample, scale=True,
                                    dtype=torch.float64).eval()
    ours_scaled.load_state_dict(theirs_scaled.state_dict())
    assert (ours_scaled(x) - reference).abs().max() > 1e-3
    torch.testing.assert_close(ours_scaled(x), nonlocal_reference(ours_scaled, x), rtol=0,
                               atol=1e-10)


def test_channels_last_and_dtype() -> None:
    m = make(8, sub_sample=True)
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), rtol=0,
                               atol=1e-12)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.parametrize('mode', ['embedded_gaussian', 'gaussian'])
def test_torch_compile_trains_across_input_sizes(mode: str) -> None:
    """Compiled training steps at a second input size, where torch.compile recompiles with
    dynamic sizes: Inductor (torch 2.13.0) fails on a tensor saved for the backward that is a
    view of the flattened pixels (pytorch/pytorch#185510), which the SDPA path and W_z's input
    were until they became copies. Outputs and every gradient equal the eager block's."""
    torch._dynamo.reset()
    block = make(8, mode=mode).float()
    check_compiled_training(block, torch.compile(block), [(2, 8, 5, 7), (3, 8, 6, 4)])


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match='mode'):
        NonLocalAttention(8, mode='softmax')
    with pytest.raises(ValueError, match='reduction'):
        NonLocalAttention(8, reduction=0)
    with pytest.raises(ValueError, match='in_channels'):
        NonLocalAttention(0)
    with pytest.raises(ValueError, match="scale=True.*'dot_product'"):
        NonLocalAttention(8, mode='dot_product', scale=True)
    with pytest.raises(ValueError, match="efficient=True.*'concatenation'"):
        NonLocalAttention(8, mode='concatenation', efficient=True)
    m = NonLocalAttention(8)
    with pytest.raises(ValueError, match='in_channels=8'):
        m(torch.randn(1, 4, 3, 3))
    x = torch.randn(1, 8, 3, 4)
    for bad in (12, -1, (3, 0), (0, 4), True):
        with pytest.raises(ValueError, match='index'):
            m.attention_map(x, bad)
