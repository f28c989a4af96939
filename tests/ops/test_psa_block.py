"""The fused CPU PSA block (``mmattn::psa_block_fwd`` / ``psa_block_bwd``, autograd registered in
C++) for the four forms: the paper's Eq. 5 (parallel, sequential) and the authors' ``PSA_p`` /
``PSA_s``.

Its outputs are checked against the equations written out in ``tests/layers/test_psa.py``
(``paper_psa``, ``release_psa``), its gradients against autograd through the module's
reference path (1x1 convolutions and softmaxes on the full maps, standard operators) and by
float64 gradcheck.
"""
from __future__ import annotations

import os.path as osp
import sys

import pytest
import torch

from mmattn.analysis import saved_bytes
from mmattn.layers import PolarizedSelfAttention
from mmattn.ops import KernelUnavailableError
from mmattn.ops.dispatch import PSA_CPU_MAX_WORK, can_use_psa_cpu
from mmattn.ops.psa_block import psa_block, psa_block_weights

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'layers'))
from test_psa import paper_psa, release_psa  # noqa: E402  (the equations, written out)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
FORMS = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
         ('official', 'sequential')]
# the last one is large enough for PSA_s to run its (C/2 x C) products on BLAS (psa_cpu.cpp)
SHAPES = [(1, 8, 4, 4), (2, 8, 7, 5), (3, 2, 1, 1), (1, 6, 1, 9), (2, 32, 3, 5), (2, 48, 12, 10)]


def block(variant: str, mode: str, c: int, backend: str, dtype=F64) -> PolarizedSelfAttention:
    torch.manual_seed(3)
    ratio = max(1, min(4, c // 4)) if (variant, mode) == ('official', 'sequential') else None
    b = PolarizedSelfAttention(c, mode=mode, variant=variant, ratio=ratio, backend=backend,
                               dtype=dtype)
    with torch.no_grad():   # non-trivial biases, LayerNorm affines and mask ranges
        for p in b.parameters():
            p.normal_(0, 0.5)
    return b


def pair(variant: str, mode: str, c: int, dtype=F64):
    fused = block(variant, mode, c, 'cpu', dtype)
    ref = block(variant, mode, c, 'reference', dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def equations(b: PolarizedSelfAttention, x: torch.Tensor) -> torch.Tensor:
    sd = {k: v.detach() for k, v in b.state_dict().items()}
    if b.variant == 'paper':
        return paper_psa(x, sd, b.mode)
    return release_psa(x, sd, b.mode)


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('shape', SHAPES)
def test_matches_equations_and_reference_gradients(cpu_kernels: str, variant: str, mode: str,
                                                   shape: tuple[int, ...]) -> None:
    fused, ref = pair(variant, mode, shape[1])
    x = torch.randn(shape, dtype=F64)
    assert fused.selected_backend(x)[0] == 'cpu'
    torch.testing.assert_close(fused(x), equations(fused, x), **TOL)
    g = torch.randn(shape, dtype=F64)
    grads = []
    for b in (fused, ref):
        xi = x.clone().requires_grad_()
        b(xi).backward(g)
        grads.append([xi.grad] + [p.grad for p in b.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL)


def op_args(variant: str, mode: str, shape: tuple[int, ...]) -> tuple:
    """(x, weights, form, eps) for the op itself, all leaves requiring gradients."""
    weights, form, eps = psa_block_weights(block(variant, mode, shape[1], 'cpu'))
    weights = [w.detach().clone().requires_grad_() for w in weights]
    return torch.randn(shape, dtype=F64, requires_grad=True), weights, form, eps


@pytest.mark.parametrize('variant, mode', FORMS)
def test_gradcheck(cpu_kernels: str, variant: str, mode: str) -> None:
    x, weights, form, eps = op_args(variant, mode, (2, 8, 3, 2))
    assert torch.autograd.gradcheck(lambda x, *w: psa_block(x, list(w), form, eps),
                                    (x, *weights))


@pytest.mark.parametrize('variant, mode', FORMS)
def test_opcheck(cpu_kernels: str, variant: str, mode: str) -> None:
    """Schema, fake tensor, the C++ autograd registration and AOT dispatch (torch.compile)."""
    torch.library.opcheck(torch.ops.mmattn.psa_block_fwd.default,
                          op_args(variant, mode, (2, 8, 3, 5)))


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_and_channels_last(cpu_kernels: str, variant: str, mode: str,
                                         dtype: torch.dtype, tol: float) -> None:
    """Computed in float32 whatever the input dtype; returns the input's dtype and layout."""
    fused, ref = pair(variant, mode, 16)
    x64 = torch.randn(2, 16, 5, 6, dtype=F64)
    want = ref(x64)
    fused = fused.to(dtype)
    for x in (x64.to(dtype), x64.to(dtype).contiguous(memory_format=torch.channels_last)):
        y = fused(x)
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=torch.channels_last) == \
            x.is_contiguous(memory_format=torch.channels_last)
        err = (y.double() - want).abs().max().item()
        # the bf16 bound: the input's own rounding (the op computes in float32)
        assert err <= tol * want.abs().max().item(), err


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_weights_and_gradients(cpu_kernels: str, variant: str, mode: str,
                                             dtype: torch.dtype) -> None:
    """A block cast to bf16/fp16, weights included: the output and every gradient (the
    weights' leave the op converted all at once, psa_block.h's weight_gradients) in that dtype,
    each within about twice the eager reference's own error against float64."""
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from psa_block_checks import check_low_precision
    check_low_precision(lambda b, x: psa_block(x, *psa_block_weights(b)), mode, (2, 32, 6, 5),
                        dtype, variant)


def test_keeps_only_x_for_backward(cpu_kernels: str) -> None:
    """Nothing the size of x (or of PSA_s's (C/2, H, W) value map) is saved beyond x itself."""
    for variant, mode in FORMS:
        fused, ref = pair(variant, mode, 32)
        x = torch.randn(2, 32, 16, 16, dtype=F64, requires_grad=True)
        assert saved_bytes(fused, x) == 0
        assert saved_bytes(ref, x) >= x.numel() * 8


def test_weight_gradients_sum_over_images(cpu_kernels: str) -> None:
    fused = block('official', 'sequential', 8, 'cpu')
    x = torch.randn(3, 8, 4, 3, dtype=F64)
    fused(x).square().sum().backward()
    together = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    for i in range(3):
        fused(x[i:i + 1]).square().sum().backward()
    for got, want in zip(together, [p.grad for p in fused.parameters()]):
        torch.testing.assert_close(got, want, **TOL)


def test_auto_takes_it_for_small_maps_only(cpu_kernels: str) -> None:
    side = 1 + int((PSA_CPU_MAX_WORK / 16) ** 0.5)
    large = torch.randn(1, 16, side, side)
    for variant, mode in FORMS:
        b = PolarizedSelfAttention(16, mode=mode, variant=variant)
        assert b.selected_backend(torch.randn(2, 16, 4, 4))[0] == 'cpu'
        assert b.selected_backend(large)[0] == 'folded'
        ok, reason = can_use_psa_cpu(large, heuristics=True)
        assert not ok and 'the folded path is as fast there' in reason
        assert can_use_psa_cpu(large[..., :side - 1, :side - 1], heuristics=True)[0]
        # asked for explicitly, it runs at any size
        b.backend = 'cpu'
        assert b.selected_backend(large)[0] == 'cpu'


def test_gate_hooks_keep_a_path_that_calls_the_gates(cpu_kernels: str) -> None:
    for variant, mode in FORMS:
        b = PolarizedSelfAttention(8, mode=mode, variant=variant)
        seen = []
        b.spatial_gate.register_forward_hook(lambda m, i, o: seen.append(o))
        chosen = b.selected_backend(torch.randn(1, 8, 3, 3))[0]
        assert chosen == ('reference' if variant == 'paper' else 'folded')
        b(torch.randn(1, 8, 3, 3))
        assert len(seen) == 1
        b.backend = 'cpu'
        with pytest.raises(KernelUnavailableError, match='hooks'):
            b(torch.randn(1, 8, 3, 3))


def test_torch_compile_fullgraph(cpu_kernels: str) -> None:
    torch._dynamo.reset()
    for variant, mode in FORMS:
        fused = block(variant, mode, 8, 'auto')
        compiled = torch.compile(fused, fullgraph=True, backend='aot_eager')
        x = torch.randn(2, 8, 3, 4, dtype=F64, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        y_ref = fused(x)
        y_ref.sum().backward()
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, x.grad, **TOL)


def test_input_errors(cpu_kernels: str) -> None:
    fused = block('paper', 'parallel', 8, 'cpu')
    weights, form, eps = psa_block_weights(fused)
    x = torch.randn(1, 8, 2, 2, dtype=F64)
    with pytest.raises(RuntimeError, match='psa_block: form 0 takes 12 weights, got 11'):
        torch.ops.mmattn.psa_block_fwd(x, weights[:-1], form, eps)
    with pytest.raises(RuntimeError, match='psa_block: weight 2 must have 32 elements'):
        torch.ops.mmattn.psa_block_fwd(x, weights[:2] + [weights[2][:1]] + weights[3:], form,
                                       eps)
    with pytest.raises(RuntimeError, match='psa_block: x must be .N, C, H, W., got 3 dims'):
        torch.ops.mmattn.psa_block_fwd(x[0], weights, form, eps)
    with pytest.raises(RuntimeError, match='psa_block: H and W must be positive'):
        torch.ops.mmattn.psa_block_fwd(x[..., :0], weights, form, eps)
