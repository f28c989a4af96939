"""The release's ``PSA_p`` / ``PSA_s`` as one C++ function per direction made of ATen operations
(``mmattn/ops/csrc/psa_release.cpp``): the CUDA implementation of ``mmattn::psa_block_fwd`` /
``psa_block_bwd``, which is also registered on every device as ``mmattn::psa_release_fwd`` /
``psa_release_bwd``, so that the very code a GPU runs is checked here on the CPU.

Outputs are checked against the release's equations written out in ``tests/layers/test_psa.py``
(``release_psa``), gradients against autograd through the module's reference path (1x1
convolutions and softmaxes on the full maps) and by float64 gradcheck; in float32, bfloat16 and
float16 the error against float64 is at most about twice the eager reference's in that dtype.
On a GPU the module's ``backend='cuda'`` runs it (``test_psa_block_cuda.py``).
"""
from __future__ import annotations

import os.path as osp
import sys
from typing import Any

import pytest
import torch
from torch import Tensor

from mmattn.layers import PolarizedSelfAttention
from mmattn.ops import KernelUnavailableError
from mmattn.ops.dispatch import can_use_psa_block_cuda
from mmattn.ops.psa_block import psa_block_weights

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_psa_block import SHAPES, block, equations  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
MODES = ['parallel', 'sequential']


def block_function(fwd, bwd, state: bool = False) -> type:
    """An autograd function of the op pair ``fwd(x, weights, form, eps)`` /
    ``bwd(grad, x, weights, form, eps)``, or with ``state`` of ``fwd -> (y, state)`` /
    ``bwd(grad, x, state, weights, form, eps)`` (on the GPU the C++ autograd pairs them)."""

    class Block(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, form: int, eps: float, *weights: Tensor) -> Tensor:
            out = fwd(x, list(weights), form, eps)
            y, kept = (out[0], list(out[1])) if state else (out, [])
            ctx.save_for_backward(x, *weights, *kept)
            ctx.form, ctx.eps, ctx.weights = form, eps, len(weights)
            return y

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple:
            x, *rest = ctx.saved_tensors
            weights, kept = rest[:ctx.weights], rest[ctx.weights:]
            args = (grad, x, kept, weights) if state else (grad, x, weights)
            dx, dws = bwd(*args, ctx.form, ctx.eps)
            return (dx, None, None, *dws)

    return Block


def through(function: type):
    """``(module, x) -> output`` through ``function``, differentiable in x and the module's
    parameters."""
    def run(b: PolarizedSelfAttention, x: Tensor) -> Tensor:
        weights, form, eps = psa_block_weights(b)
        return function.apply(x, form, eps, *weights)
    return run


RELEASE = block_function(torch.ops.mmattn.psa_release_fwd, torch.ops.mmattn.psa_release_bwd)
release_op = through(RELEASE)


def all_grads(fn, b: PolarizedSelfAttention, x: Tensor, g: Tensor) -> list[Tensor]:
    b.zero_grad()
    xi = x.detach().clone().requires_grad_()
    fn(b, xi).backward(g)
    return [xi.grad] + [p.grad.clone() for p in b.parameters()]


def reference(b: PolarizedSelfAttention, x: Tensor) -> Tensor:
    b.backend = 'reference'
    return b(x)


def check_matches(fn, mode: str, shape: tuple[int, ...], layout: torch.memory_format,
                  variant: str = 'official') -> None:
    """``fn``'s output against the equations (the release's, or the paper's) and its gradients
    against autograd through the reference, float64, x and G in ``layout`` (kept by y and dx)."""
    b = block(variant, mode, shape[1], 'reference')
    x = torch.randn(shape, dtype=F64)
    xl = x.contiguous(memory_format=layout)
    y = fn(b, xl)
    assert y.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y, equations(b, x), **TOL)
    g = torch.randn(shape, dtype=F64).contiguous(memory_format=layout)
    ours = all_grads(fn, b, xl, g)
    assert ours[0].is_contiguous(memory_format=layout)
    for got, want in zip(ours, all_grads(reference, b, x, g)):
        torch.testing.assert_close(got, want, **TOL)


def check_low_precision(fn, mode: str, shape: tuple[int, ...], dtype: torch.dtype,
                        variant: str = 'official') -> None:
    """``fn``'s output and every gradient in ``dtype``: error against float64 at most about
    twice the eager reference's own in that dtype (the reference on the CPU)."""
    b = block(variant, mode, shape[1], 'reference')
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(0.3)
    x, g = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    truth, truth_g = reference(b, x), all_grads(reference, b, x, g)
    b = b.to(dtype)
    xh, gh = x.to(dtype), g.to(dtype)
    ref, ref_g = reference(b, xh), all_grads(reference, b, xh, gh)
    ours, ours_g = fn(b, xh), all_grads(fn, b, xh, gh)
    assert ours.dtype == dtype

    def err(a: Tensor, t: Tensor) -> float:
        return (a.double().cpu() - t).abs().max().item()

    assert err(ours, truth) <= 2 * err(ref, truth) + 1e-6
    names = ['x'] + [n for n, _ in b.named_parameters()]
    for name, a, r, t in zip(names, ours_g, ref_g, truth_g):
        assert a.dtype == dtype, name
        assert err(a, t) <= 2 * err(r, t) + 1e-3 * t.abs().max().item(), name


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_matches_equations_and_reference_gradients(cpu_kernels: str, mode: str,
                                                   shape: tuple[int, ...],
                                                   layout: torch.memory_format) -> None:
    check_matches(release_op, mode, shape, layout)


@pytest.mark.parametrize('mode', MODES)
def test_gradcheck(cpu_kernels: str, mode: str) -> None:
    weights, form, eps = psa_block_weights(block('official', mode, 8, 'reference'))
    weights = [w.detach().clone().requires_grad_() for w in weights]
    x = torch.randn(2, 8, 3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *w: RELEASE.apply(x, form, eps, *w),
                                    (x, *weights))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(cpu_kernels: str, mode: str, dtype: torch.dtype) -> None:
    """The products with x run in x's dtype, as the reference's convolutions do; the
    softmaxes and the C-sized chain in float32."""
    check_low_precision(release_op, mode, (2, 64, 9, 10), dtype)


@pytest.mark.parametrize('mode', MODES)
def test_opcheck(cpu_kernels: str, mode: str) -> None:
    """Schema and fake tensors of both ops (their autograd is psa_block_fwd's, in C++)."""
    weights, form, eps = psa_block_weights(block('official', mode, 8, 'reference'))
    weights = [w.detach() for w in weights]
    x = torch.randn(2, 8, 3, 5, dtype=F64)
    checks = ('test_schema', 'test_faketensor')
    torch.library.opcheck(torch.ops.mmattn.psa_release_fwd.default, (x, weights, form, eps),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.mmattn.psa_release_bwd.default,
                          (torch.randn_like(x), x, weights, form, eps), test_utils=checks)


def test_input_errors(cpu_kernels: str) -> None:
    weights, form, eps = psa_block_weights(block('official', 'sequential', 8, 'reference'))
    paper, paper_form, _ = psa_block_weights(block('paper', 'parallel', 8, 'reference'))
    x = torch.randn(1, 8, 2, 2, dtype=F64)
    fwd, bwd = torch.ops.mmattn.psa_release_fwd, torch.ops.mmattn.psa_release_bwd
    with pytest.raises(RuntimeError, match="only the release's forms run .* got form 0"):
        fwd(x, paper, paper_form, eps)
    with pytest.raises(RuntimeError, match='psa_block: form 3 takes 10 weights, got 9'):
        fwd(x, weights[:-1], form, eps)
    with pytest.raises(RuntimeError, match='psa_block: C must be even and >= 2, got 7'):
        fwd(x[:, :7], weights, form, eps)
    with pytest.raises(RuntimeError, match=r"psa_block_bwd: grad must have x's shape"):
        bwd(x[..., :1], x, weights, form, eps)


def test_cuda_backend_declines_cpu_tensors() -> None:
    """``auto`` never takes it for a CPU tensor; asked for explicitly it says why not."""
    x = torch.randn(1, 8, 3, 3)
    ok, reason = can_use_psa_block_cuda(x)
    assert not ok and 'input is on cpu' in reason
    for mode in MODES:
        b = PolarizedSelfAttention(8, mode=mode, variant='official')
        assert b.selected_backend(x)[0] != 'cuda'
        b.backend = 'cuda'
        with pytest.raises(KernelUnavailableError, match="backend='cuda'.*input is on cpu"):
            b(x)
