"""The folded PSA op (``mmattn::psa_paper_folded``) against the paper's equations.

The reference here is written from Eq. 1-5 of arXiv 2107.00782 with the 1x1 convolutions
applied to the full maps (einsum over channels), a softmax over pixels, a LayerNorm formula of
our own and the sigmoid gates; the op computes the same thing with the convolutions folded onto
C-vectors, so only the order of the sums differs.
"""
from __future__ import annotations

import os.path as osp
import sys

import pytest
import torch
from torch import Tensor

from mmattn.analysis import saved_bytes
from mmattn.layers import psa as psa_layer
from mmattn.layers.psa import PolarizedSelfAttention
from mmattn.ops import KernelUnavailableError, polarized_self_attention
from mmattn.ops.psa import PARAM_NAMES, _psa_folded_op, psa_paper_folded, psa_paper_reference

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from psa_block_checks import assert_within_twice  # noqa: E402

F64 = torch.float64
MODES = ['parallel', 'sequential']
EPS = 1e-5
SHAPES = [(1, 2, 1, 1), (2, 8, 7, 5), (1, 6, 7, 5), (3, 4, 1, 9), (2, 32, 3, 5)]


def random_params(c: int, dtype: torch.dtype = F64, std: float = 0.5) -> dict[str, Tensor]:
    """Random weights in the op's matrix form (every bias and affine non-trivial)."""
    h = c // 2
    shapes = {'ch_wq': (c,), 'ch_bq': (1,), 'ch_wv': (h, c), 'ch_bv': (h,), 'ch_wz': (c, h),
              'ch_bz': (c,), 'ln_weight': (c,), 'ln_bias': (c,), 'sp_wq': (h, c), 'sp_bq': (h,),
              'sp_wv': (h, c), 'sp_bv': (h,)}
    return {k: torch.randn(shape, dtype=dtype) * std for k, shape in shapes.items()}


def paper_psa(x: Tensor, w: dict[str, Tensor], mode: str) -> Tensor:
    """Eq. 1-5, eager: A^ch = sigmoid(LN(W_z(W_v x . softmax_HW(W_q x)))),
    A^sp = sigmoid(softmax_C(GP(W_q' x)) . W_v' x); parallel A^ch x + A^sp x,
    sequential A^sp(z) z with z = A^ch x."""
    def channel_mask(t: Tensor) -> Tensor:
        v = torch.einsum('oc,nchw->nohw', w['ch_wv'], t) + w['ch_bv'][:, None, None]
        logit = torch.einsum('c,nchw->nhw', w['ch_wq'], t) + w['ch_bq']
        att = torch.exp(logit - logit.amax((1, 2), keepdim=True))
        att = att / att.sum((1, 2), keepdim=True)
        z = torch.einsum('oc,nc->no', w['ch_wz'], torch.einsum('nchw,nhw->nc', v, att))
        z = z + w['ch_bz']
        z = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True)
                                                       + EPS)
        return torch.sigmoid(z * w['ln_weight'] + w['ln_bias'])[:, :, None, None]

    def spatial_mask(t: Tensor) -> Tensor:
        q = torch.einsum('oc,nchw->nohw', w['sp_wq'], t).mean((2, 3)) + w['sp_bq']
        q = torch.softmax(q, dim=1)
        v = torch.einsum('oc,nchw->nohw', w['sp_wv'], t) + w['sp_bv'][:, None, None]
        return torch.sigmoid(torch.einsum('nc,nchw->nhw', q, v))[:, None]

    z = channel_mask(x) * x
    if mode == 'parallel':
        return z + spatial_mask(x) * x
    return spatial_mask(z) * z


def folded(x: Tensor, w: dict[str, Tensor], mode: str) -> Tensor:
    return psa_paper_folded(x, *(w[k] for k in PARAM_NAMES), eps=EPS,
                            sequential=mode == 'sequential')


def leaves(x: Tensor, w: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    return (x.detach().clone().requires_grad_(),
            {k: v.detach().clone().requires_grad_() for k, v in w.items()})


def grads(fn, x: Tensor, w: dict[str, Tensor], mode: str, g: Tensor) -> list[Tensor]:
    x, w = leaves(x, w)
    fn(x, w, mode).backward(g)
    return [x.grad] + [w[k].grad for k in PARAM_NAMES]


# ---------------------------------------------------------------- float64: the maths
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES)
def test_forward_matches_equations(mode: str, shape: tuple[int, ...]) -> None:
    w = random_params(shape[1])
    x = torch.randn(shape, dtype=F64)
    ref = paper_psa(x, w, mode)
    torch.testing.assert_close(folded(x, w, mode), ref, rtol=1e-12, atol=1e-12)
    out_cl = folded(x.contiguous(memory_format=torch.channels_last), w, mode)
    torch.testing.assert_close(out_cl, ref, rtol=1e-12, atol=1e-12)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape,layout', [((1, 4, 3, 2), torch.contiguous_format),
                                          ((2, 6, 1, 1), torch.contiguous_format),
                                          ((1, 4, 3, 3), torch.channels_last)])
def test_gradcheck(mode: str, shape: tuple[int, ...], layout: torch.memory_format) -> None:
    """The hand-written backward, w.r.t. x and all 12 parameters, in float64."""
    w = random_params(shape[1])
    x = torch.randn(shape, dtype=F64).contiguous(memory_format=layout).requires_grad_()
    params = [w[k].requires_grad_() for k in PARAM_NAMES]

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return psa_paper_folded(x, *ps, eps=EPS, sequential=mode == 'sequential')

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', [(2, 64, 16, 12), (1, 10, 9, 1)])
def test_gradients_match_autograd_of_equations(mode: str, shape: tuple[int, ...]) -> None:
    w = random_params(shape[1], std=0.2)
    x = torch.randn(shape, dtype=F64)
    g = torch.randn(shape, dtype=F64)
    ours, ref = grads(folded, x, w, mode, g), grads(paper_psa, x, w, mode, g)
    for name, a, b in zip(('x',) + PARAM_NAMES, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_query_bias_gradient_is_zero_up_to_rounding() -> None:
    """The softmax over pixels removes ``ch_bq``: its gradient is sum_p dl_p = 0."""
    w = random_params(8)
    x = torch.randn(2, 8, 5, 4, dtype=F64)
    g_bq = grads(folded, x, w, 'parallel', torch.randn_like(x))[2]
    assert g_bq.shape == (1,) and g_bq.abs().item() < 1e-12


# ---------------------------------------------------------------- float32, half, large
@pytest.mark.parametrize('mode', MODES)
def test_float32(mode: str) -> None:
    shape = (2, 64, 24, 20)
    w = random_params(64, std=0.2)
    x = torch.randn(shape, dtype=F64)
    g = torch.randn(shape, dtype=F64)
    ref_y, ref_g = paper_psa(x, w, mode), grads(paper_psa, x, w, mode, g)
    w32 = {k: v.float() for k, v in w.items()}
    y = folded(x.float(), w32, mode)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    ours_g = grads(folded, x.float(), w32, mode, g.float())
    for name, a, b in zip(('x',) + PARAM_NAMES, ours_g, ref_g):
        # ch_bq's true gradient is 0: only its rounding, on the scale of ch_wq's, is left
        scale = ref_g[1] if name == 'ch_bq' else b
        torch.testing.assert_close(a.double(), b, rtol=1e-4,
                                   atol=1e-4 * scale.abs().max().item(), msg=name)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('mode', MODES)
def test_half_error_at_most_twice_the_references(mode: str, dtype: torch.dtype) -> None:
    """In half precision the op may err at most about twice as much as the eager reference
    run in the same dtype (both measured against float64)."""
    check_low_precision(folded, (2, 32, 12, 10), 0.2, mode, dtype)


def check_low_precision(fn, shape: tuple[int, ...], std: float, mode: str, dtype: torch.dtype,
                        device: str = 'cpu') -> None:
    """``fn``'s output and 13 gradients in ``dtype`` on ``device``: error against float64 at
    most about twice the eager reference's own in that dtype, each computed from the same
    inputs (x, the output's gradient and the weights as ``dtype`` holds them; the truth in
    float64 of those), so that an error is the implementation's own, not the inputs'
    rounding amplified (psa_block_checks.check_low_precision, whose rule this shares)."""
    w = random_params(shape[1], std=std)
    wh = {k: v.to(device, dtype) for k, v in w.items()}
    xh = torch.randn(shape, dtype=F64).to(device, dtype)
    gh = torch.randn(shape, dtype=F64).to(device, dtype)
    w, x, g = {k: v.cpu().to(F64) for k, v in wh.items()}, xh.cpu().to(F64), gh.cpu().to(F64)
    truth, truth_g = paper_psa(x, w, mode), grads(paper_psa, x, w, mode, g)
    ref, ref_g = paper_psa(xh, wh, mode), grads(paper_psa, xh, wh, mode, gh)
    ours, ours_g = fn(xh, wh, mode), grads(fn, xh, wh, mode, gh)
    # ch_bq's true gradient is 0, so its floor is on the scale of ch_wq's
    floors = [1e-6] + [1e-3 * (truth_g[1] if name == 'ch_bq' else t).abs().max().item()
                       for name, t in zip(('x',) + PARAM_NAMES, truth_g)]
    assert_within_twice(['y', 'x', *PARAM_NAMES], [ours, *ours_g], [ref, *ref_g],
                        [truth, *truth_g], floors, dtype)


def test_very_large_hw_forward() -> None:
    """A 512 x 512 map: the softmax over 262144 pixels and the pixel means stay exact."""
    w = random_params(8, std=0.3)
    x = torch.randn(1, 8, 512, 512, dtype=F64)
    ref = paper_psa(x, w, 'sequential')
    y = folded(x.float(), {k: v.float() for k, v in w.items()}, 'sequential')
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- registration, memory
@pytest.mark.parametrize('mode', MODES)
def test_opcheck(mode: str) -> None:
    """Schema, fake tensor, autograd registration and AOT dispatch (what torch.compile uses)."""
    w = random_params(8)
    x = torch.randn(2, 8, 3, 5, dtype=F64, requires_grad=True)
    params = [w[k].requires_grad_() for k in PARAM_NAMES]
    torch.library.opcheck(_psa_folded_op, (x, *params, EPS, mode == 'sequential', False))


def test_saves_x_and_vectors_only() -> None:
    """The activations kept for backward: x itself plus (N, P) / (N, C) vectors, against
    several (N, C/2, H, W) maps for the eager form."""
    w = {k: v.requires_grad_() for k, v in random_params(32).items()}
    x = torch.randn(2, 32, 16, 16, dtype=F64, requires_grad=True)
    for mode in MODES:
        saved: dict[str, list[Tensor]] = {'folded': [], 'eager': []}
        for name, fn in (('folded', folded), ('eager', paper_psa)):
            def pack(t: Tensor, name: str = name) -> Tensor:
                saved[name].append(t)
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn(x, w, mode)

        def extra(ts: list[Tensor]) -> int:   # bytes beyond x and the weights
            seen = {t.data_ptr() for t in [x, *w.values()]}
            return sum(t.numel() * t.element_size() for t in ts if t.data_ptr() not in seen)

        x_bytes = x.numel() * x.element_size()
        assert extra(saved['folded']) < 0.1 * x_bytes
        assert extra(saved['eager']) > 2 * x_bytes


def test_double_backward_raises() -> None:
    w = {k: v.requires_grad_() for k, v in random_params(4).items()}
    x = torch.randn(1, 4, 3, 3, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(folded(x, w, 'parallel').sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


# ---------------------------------------------------------------- the public function
@pytest.mark.parametrize('backend', ['auto', 'reference', 'folded'])
def test_functional_backends_agree(backend: str) -> None:
    w = random_params(8)
    x = torch.randn(2, 8, 5, 3, dtype=F64)
    for mode in MODES:
        y = polarized_self_attention(x, **w, mode=mode, eps=EPS, backend=backend)
        torch.testing.assert_close(y, paper_psa(x, w, mode), rtol=1e-12, atol=1e-12)
    # the in-op reference is the eager form the layer's reference path computes
    torch.testing.assert_close(psa_paper_reference(x, *(w[k] for k in PARAM_NAMES), eps=EPS),
                               paper_psa(x, w, 'parallel'), rtol=1e-12, atol=1e-12)


def test_functional_errors() -> None:
    w = random_params(8)
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError, match="mode.*'diagonal'"):
        polarized_self_attention(x, **w, mode='diagonal')
    with pytest.raises(ValueError, match="backend.*'fast'"):
        polarized_self_attention(x, **w, backend='fast')
    with pytest.raises(KernelUnavailableError,
                       match="backend='cuda'.*input is on cpu, the kernel runs on cuda tensors"):
        polarized_self_attention(x, **w, backend='cuda')


@pytest.mark.parametrize('change, error, message', [
    (dict(x=torch.randn(8, 5, 3)), ValueError,
     'x must be 4-D (N, C, H, W) with C even and H, W >= 1, got shape (8, 5, 3)'),
    (dict(x=torch.randn(2, 7, 5, 3)), ValueError, 'with C even and H, W >= 1, got shape '
                                                  '(2, 7, 5, 3)'),
    (dict(x=torch.randn(2, 8, 0, 3)), ValueError, 'got shape (2, 8, 0, 3)'),
    (dict(x=torch.ones(2, 8, 5, 3, dtype=torch.long)), TypeError,
     'x must be a floating-point torch.Tensor, got dtype torch.int64'),
    (dict(x=torch.randn(2, 6, 5, 3)), ValueError,
     'ch_wq must have shape (6,) for x of shape (2, 6, 5, 3) (C=6), got (8,)'),
    (dict(ch_wv=torch.randn(4, 6)), ValueError, 'ch_wv must have shape (4, 8) for x of shape '
                                                '(2, 8, 5, 3) (C=8), got (4, 6)'),
    (dict(ch_wz=torch.randn(4, 8)), ValueError, 'ch_wz must have shape (8, 4)'),
    (dict(ln_weight=torch.randn(4)), ValueError, 'ln_weight must have shape (8,)'),
    (dict(ch_bq=torch.randn(())), ValueError, 'ch_bq must have shape (1,)'),
    (dict(sp_bv=None), TypeError, 'sp_bv must be a torch.Tensor, got NoneType'),
])
def test_functional_argument_shapes_are_named(change: dict, error: type, message: str) -> None:
    """Each path failed inside a convolution, a matmul or a LayerNorm with torch's message
    about its own operands; the function now names its argument with the shape (N, C, H, W)
    implies. Checked before the backend is chosen, so every backend says the same."""
    args = {'x': torch.randn(2, 8, 5, 3), **random_params(8, dtype=torch.float32), **change}
    for backend in ('reference', 'folded'):
        with pytest.raises(error) as info:
            polarized_self_attention(**args, backend=backend)
        assert str(info.value).startswith('polarized_self_attention: ')
        assert message in str(info.value)


# ---------------------------------------------------------------- the layer's backends
def _block(mode: str, backend: str, c: int = 8) -> PolarizedSelfAttention:
    block = PolarizedSelfAttention(c, mode=mode, backend=backend, dtype=F64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block


@pytest.mark.parametrize('mode', MODES)
def test_layer_folded_equals_reference(mode: str) -> None:
    folded_block, ref_block = _block(mode, 'folded'), _block(mode, 'reference')
    ref_block.load_state_dict(folded_block.state_dict())
    assert folded_block.state_dict().keys() == ref_block.state_dict().keys()
    x = torch.randn(2, 8, 7, 5, dtype=F64)
    g = torch.randn_like(x)
    outs = []
    for block in (folded_block, ref_block):
        xx = x.clone().requires_grad_()
        y = block(xx)
        y.backward(g)
        outs.append([y, xx.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert folded_block.selected_backend(x) == ('folded', 'requested')


@pytest.mark.parametrize('mode', MODES)
def test_layer_hooks_keep_the_reference_under_auto(mode: str) -> None:
    block = _block(mode, 'auto')
    x = torch.randn(2, 8, 4, 3, dtype=F64)
    # a fused path: the folded op, or the compiled CPU block where the kernels are loaded
    # (MMATTN_JIT=1 or a build with them)
    fused = block.selected_backend(x)[0]
    assert fused in ('folded', 'cpu')
    seen: list[Tensor] = []
    handle = block.spatial_gate.register_forward_hook(lambda m, a, out: seen.append(out))
    assert block.selected_backend(x)[0] == 'reference'
    y = block(x)
    assert len(seen) == 1 and seen[0].shape == (2, 1, 4, 3)
    handle.remove()
    assert block.selected_backend(x)[0] == fused
    torch.testing.assert_close(block(x), y, rtol=1e-12, atol=1e-12)   # fused again
    assert len(seen) == 1


def test_layer_forced_folded_with_hooks_raises() -> None:
    block = _block('parallel', 'folded')
    block.channel_gate.register_forward_pre_hook(lambda m, a: None)
    with pytest.raises(KernelUnavailableError, match='hooks'):
        block(torch.randn(1, 8, 3, 3, dtype=F64))


@pytest.fixture
def without_compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process as it is without mmattn's compiled kernels (no build, MMATTN_JIT unset),
    also where they are loaded (MMATTN_JIT=1): ``auto`` then takes the folded op on the CPU."""
    from mmattn.ops import extension
    monkeypatch.setattr(extension, '_state', {
        'loaded_from': None, 'error': f'not built (no mmattn._C); {extension.BUILD_HINT}'})
    monkeypatch.setattr(extension, 'has_kernel', lambda op, device: False)


def test_layer_env_forces_reference(monkeypatch: pytest.MonkeyPatch,
                                    without_compiled_kernels: None) -> None:
    block = _block('sequential', 'auto')
    x = torch.randn(1, 8, 3, 3, dtype=F64)
    expected = block(x)
    monkeypatch.setenv('MMATTN_BACKEND', 'reference')
    assert block.selected_backend(x) == ('reference', 'MMATTN_BACKEND=reference')

    def not_called(*args, **kwargs):
        raise AssertionError('the folded op ran although MMATTN_BACKEND=reference')

    monkeypatch.setattr(psa_layer, 'psa_paper_folded', not_called)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv('MMATTN_BACKEND', 'auto')
    assert block.selected_backend(x)[0] == 'folded'
    with pytest.raises(AssertionError, match='folded op ran'):
        block(x)


@pytest.mark.filterwarnings('ignore::DeprecationWarning', 'ignore::torch.jit.TracerWarning')
def test_layer_trace_records_the_reference() -> None:
    block = _block('parallel', 'auto').eval()
    x = torch.randn(1, 8, 5, 4, dtype=F64)
    traced = torch.jit.trace(block, x)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not any(kind.startswith('mmattn::') for kind in kinds)
    assert 'aten::_convolution' in kinds or 'aten::conv2d' in kinds
    torch.testing.assert_close(traced(x), block(x), rtol=1e-12, atol=1e-12)


def test_layer_backend_errors(without_compiled_kernels: None) -> None:
    with pytest.raises(ValueError, match="backend.*'fast'"):
        PolarizedSelfAttention(8, backend='fast')
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', "
                                         r"'cuda', 'cpu', 'folded'\), got 'kernel'"):
        PolarizedSelfAttention(8, variant='official', backend='kernel')
    assert PolarizedSelfAttention(8, variant='official').selected_backend(
        torch.randn(1, 8, 2, 2))[0] == 'folded'
    for variant in ('paper', 'official'):
        block = PolarizedSelfAttention(8, variant=variant, backend='cuda')
        with pytest.raises(KernelUnavailableError, match="backend='cuda'.*input is on cpu"):
            block(torch.randn(1, 8, 2, 2))
    for variant in ('paper', 'official'):   # the fused CPU block, not built in this process
        block = PolarizedSelfAttention(8, variant=variant, backend='cpu')
        with pytest.raises(KernelUnavailableError, match="backend='cpu'.*not loaded.*MMATTN_JIT"):
            block(torch.randn(1, 8, 2, 2))


# ---------------------------------------------------------------- the official variant
def _official(mode: str, backend: str, c: int = 12) -> PolarizedSelfAttention:
    torch.manual_seed(1)
    block = PolarizedSelfAttention(c, mode=mode, variant='official', backend=backend,
                                   ratio=2 if mode == 'sequential' else None, dtype=F64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.4)
    return block


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_official_folded_equals_its_reference(mode: str, layout: torch.memory_format) -> None:
    """The release's PSA_p / PSA_s: the partly folded path against the module's eager one
    (itself checked against the release's code in tests/layers/test_psa.py), output and every
    gradient, in float64."""
    fast, ref = _official(mode, 'folded'), _official(mode, 'reference')
    for shape in [(2, 12, 7, 5), (1, 12, 1, 1), (3, 12, 1, 8)]:
        x = torch.randn(shape, dtype=F64).contiguous(memory_format=layout).requires_grad_()
        y_fast, y_ref = fast(x), ref(x)
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y_ref)
        ours = torch.autograd.grad(y_fast, [x, *fast.parameters()], g)
        theirs = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
        for (name, _), a, b in zip([('x', None), *fast.named_parameters()], ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('mode', MODES)
def test_official_folded_hooks_fire_and_memory(mode: str) -> None:
    """The folded official path calls the gates (their hooks see the reference's masks) and
    keeps less for the backward than the reference."""
    fast, ref = _official(mode, 'auto', c=32), _official(mode, 'reference', c=32)
    x = torch.randn(2, 32, 16, 16, dtype=F64)
    seen: dict[str, list[Tensor]] = {'auto': [], 'reference': []}
    for name, block in (('auto', fast), ('reference', ref)):
        for gate in (block.channel_gate, block.spatial_gate):
            gate.register_forward_hook(lambda m, i, o, name=name: seen[name].append(o))
        block(x)
    assert fast.selected_backend(x) == ('folded', 'auto')
    for a, b in zip(seen['auto'], seen['reference'], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def kept(block: PolarizedSelfAttention) -> int:
        return saved_bytes(block, x.requires_grad_())

    # PSA_s keeps its softmaxed (N, C/2, H, W) value map; the rest are (N, P) / (N, C) vectors
    x_bytes = x.numel() * x.element_size()
    assert kept(fast) <= (0.7 if mode == 'sequential' else 0.15) * x_bytes
    assert kept(ref) >= (2 if mode == 'sequential' else 1) * x_bytes


# ---------------------------------------------------------------- the CUDA kernels
def kernel_folded(x: Tensor, w: dict[str, Tensor], mode: str) -> Tensor:
    return psa_paper_folded(x, *(w[k] for k in PARAM_NAMES), eps=EPS,
                            sequential=mode == 'sequential', kernel=True)


def on_cuda(w: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.cuda() for k, v in w.items()}


@pytest.mark.cuda
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_cuda_kernels_match_equations_float64(cuda_kernels: str, mode: str,
                                              layout: torch.memory_format) -> None:
    """Forward and all 13 gradients against the equations, with shapes from 1x1 to one with
    more pixels than a thread block's tile and C not a multiple of 32."""
    for shape in SHAPES + [(2, 64, 16, 12), (3, 10, 33, 17), (1, 96, 9, 1)]:
        w = random_params(shape[1], std=0.3)
        x = torch.randn(shape, dtype=F64)
        g = torch.randn(shape, dtype=F64)
        ref, ref_g = paper_psa(x, w, mode), grads(paper_psa, x, w, mode, g)
        xc = x.cuda().contiguous(memory_format=layout)
        y = kernel_folded(xc, on_cuda(w), mode)
        assert y.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-10, atol=1e-10)
        ours_g = grads(kernel_folded, xc, on_cuda(w), mode, g.cuda())
        for name, a, b in zip(('x',) + PARAM_NAMES, ours_g, ref_g):
            scale = ref_g[1] if name == 'ch_bq' else b
            torch.testing.assert_close(a.cpu(), b, rtol=1e-9,
                                       atol=1e-9 * max(1.0, scale.abs().max().item()), msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize('mode', MODES)
def test_cuda_kernels_gradcheck(cuda_kernels: str, mode: str) -> None:
    w = on_cuda(random_params(6))
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 6, 3, 4, dtype=F64, device='cuda')
        x = x.contiguous(memory_format=layout).requires_grad_()
        params = [w[k].requires_grad_() for k in PARAM_NAMES]

        def fn(x: Tensor, *ps: Tensor) -> Tensor:
            return psa_paper_folded(x, *ps, eps=EPS, sequential=mode == 'sequential',
                                    kernel=True)

        assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('mode', MODES)
def test_cuda_kernels_low_precision(cuda_kernels: str, mode: str, dtype: torch.dtype) -> None:
    """Error against float64 at most about twice the eager reference's in the same dtype, on
    the benchmark's channel count and a large map (split reductions over many blocks)."""
    check_low_precision(kernel_folded, (2, 256, 96, 80), 0.05, mode, dtype, 'cuda')


@pytest.mark.cuda
def test_cuda_kernels_very_large_hw_and_auto(cuda_kernels: str) -> None:
    w = random_params(8, std=0.3)
    x = torch.randn(1, 8, 512, 512, dtype=F64)
    ref = paper_psa(x, w, 'sequential')
    y = polarized_self_attention(x.float().cuda(), **{k: v.float() for k, v in on_cuda(w).items()},
                                 mode='sequential', eps=EPS)
    torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-4, atol=1e-5)
    block = PolarizedSelfAttention(8).cuda()
    assert block.selected_backend(torch.randn(1, 8, 4, 4, device='cuda')) == ('cuda', 'auto')


@pytest.mark.cuda
def test_cuda_kernels_opcheck(cuda_kernels: str) -> None:
    w = on_cuda(random_params(8))
    x = torch.randn(2, 8, 3, 5, dtype=F64, device='cuda', requires_grad=True)
    params = [w[k].requires_grad_() for k in PARAM_NAMES]
    torch.library.opcheck(_psa_folded_op, (x, *params, EPS, True, True))
