"""Checks of a whole PSA block computed by some implementation (the compiled CUDA block on a
GPU, or its kernels under the CPU emulation), shared by ``test_kernels_emulated.py`` and
``test_psa_block_cuda.py``: outputs against the equations written out in
``tests/layers/test_psa.py``, every gradient against autograd through the module's reference
path (1x1 convolutions and softmaxes on the full maps, standard operators), and, in float32,
bfloat16 and float16, an error against float64 (of the same rounded inputs) at most about
twice the eager reference's.
"""
from __future__ import annotations

import copy
import os.path as osp
import sys
from typing import Any

import torch
from torch import Tensor

from mmattn.layers import PolarizedSelfAttention
from mmattn.ops.psa_block import psa_block_weights

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_psa_block import block, equations  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def block_function(fwd, bwd) -> type:
    """An autograd function of the op pair ``fwd(x, weights, form, eps) -> (y, state)`` /
    ``bwd(grad, x, state, weights, form, eps) -> (dx, weight gradients)`` (the C++ autograd
    pairs them so on a GPU; the emulated ops have none)."""

    class Block(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor, form: int, eps: float, *weights: Tensor) -> Tensor:
            y, state = fwd(x, list(weights), form, eps)
            ctx.save_for_backward(x, *weights, *state)
            ctx.form, ctx.eps, ctx.weights = form, eps, len(weights)
            return y

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> tuple:
            x, *rest = ctx.saved_tensors
            weights, state = rest[:ctx.weights], rest[ctx.weights:]
            dx, dws = bwd(grad, x, state, weights, ctx.form, ctx.eps)
            return (dx, None, None, *dws)

    return Block


def through(function: type):
    """``(module, x) -> output`` through ``function``, differentiable in x and the module's
    parameters."""
    def run(b: PolarizedSelfAttention, x: Tensor) -> Tensor:
        weights, form, eps = psa_block_weights(b)
        return function.apply(x, form, eps, *weights)
    return run


def all_grads(fn, b: PolarizedSelfAttention, x: Tensor, g: Tensor) -> list[Tensor]:
    b.zero_grad()
    xi = x.detach().clone().requires_grad_()
    fn(b, xi).backward(g)
    return [xi.grad] + [p.grad.clone() for p in b.parameters()]


def reference(b: PolarizedSelfAttention, x: Tensor) -> Tensor:
    b.backend = 'reference'
    return b(x)


def close_to_scale(got: Tensor, want: Tensor, name: str) -> None:
    """float64 ``got`` within 1e-11 of ``want``'s largest magnitude (at least 1) everywhere:
    the bound for sums of many large terms (at C >= 512 the blocks of ``block`` give weight
    gradients of ~1e3 whose small entries cancel, and two summation orders differ by ~1e-10
    there)."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if want.numel():
        scale = max(want.abs().max().item(), 1.0)
        err = (got - want).abs().max().item()
        assert err <= 1e-11 * scale, f'{name}: error {err:.3g} against a scale of {scale:.3g}'


def check_matches(fn, mode: str, shape: tuple[int, ...], layout: torch.memory_format,
                  variant: str = 'official', scaled: bool = False,
                  device: str = 'cpu') -> None:
    """``fn``'s output against the equations (the release's, or the paper's) and its gradients
    against autograd through the reference, float64, x and G in ``layout`` (kept by y and dx);
    each within 1e-10 (``scaled``: within 1e-11 of its largest magnitude, close_to_scale).
    The equations and the reference run on the CPU; ``fn`` on a copy of the block, x and G on
    ``device``."""
    def close(got: Tensor, want: Tensor, name: str) -> None:
        got = got.cpu()
        if scaled:
            close_to_scale(got, want, name)
        else:
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f'{name}: {m}')

    b = block(variant, mode, shape[1], 'reference')
    x = torch.randn(shape, dtype=F64)
    g = torch.randn(shape, dtype=F64)
    names = ['x'] + [name for name, _ in b.named_parameters()]
    want_y, want_grads = equations(b, x), all_grads(reference, b, x, g)
    on = copy.deepcopy(b).to(device)
    xl, gl = (t.to(device).contiguous(memory_format=layout) for t in (x, g))
    y = fn(on, xl)
    assert y.is_contiguous(memory_format=layout)
    close(y, want_y, 'y')
    ours = all_grads(fn, on, xl, gl)
    assert ours[0].is_contiguous(memory_format=layout)
    for name, got, want in zip(names, ours, want_grads):
        close(got, want, name)


def check_low_precision(fn, mode: str, shape: tuple[int, ...], dtype: torch.dtype,
                        variant: str = 'official', bound: torch.dtype | None = None,
                        slack: float = 1.0, atol: float = 0.0) -> None:
    """``fn``'s output and every gradient in ``dtype``: error against float64 at most about
    twice the eager reference's own in ``bound`` (default: ``dtype``; the reference on the
    CPU), that bound times ``slack``, plus ``atol``. Every computation starts from the same
    inputs, x, the output's gradient and the weights as ``dtype`` holds them (the truth in
    float64 of those, the reference in ``bound`` of those): an error is then the
    implementation's own, not the rounding of the inputs, which the result of an
    ill-conditioned gradient can amplify past both (a weight gradient off by 0.2 at |8.8| for
    every implementation, bf16 rounding of the inputs alone, with the reference's own error
    cancelling it by chance at the largest error's place: 0.04)."""
    b = block(variant, mode, shape[1], 'reference').to(dtype)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(0.3)
    xh, gh = torch.randn(shape, dtype=F64).to(dtype), torch.randn(shape, dtype=F64).to(dtype)
    tb = copy.deepcopy(b).to(F64)
    x, g = xh.to(F64), gh.to(F64)
    truth, truth_g = reference(tb, x), all_grads(reference, tb, x, g)
    bound = bound or dtype
    rb = copy.deepcopy(b).to(bound)
    xb, gb = xh.to(bound), gh.to(bound)
    ref, ref_g = reference(rb, xb), all_grads(reference, rb, xb, gb)
    ours, ours_g = fn(b, xh), all_grads(fn, b, xh, gh)
    floors = [1e-6] + [1e-3 * t.abs().max().item() for t in truth_g]
    assert_within_twice(['y', 'x'] + [n for n, _ in b.named_parameters()], [ours, *ours_g],
                        [ref, *ref_g], [truth, *truth_g], floors, dtype, slack, atol)


def assert_within_twice(names: list[str], ours: list[Tensor], refs: list[Tensor],
                        truths: list[Tensor], floors: list[float], dtype: torch.dtype,
                        slack: float = 1.0, atol: float = 0.0) -> None:
    """The rule of the low-precision checks (here and ``test_psa_op.check_low_precision``):
    each of ``ours`` (an output or a gradient, in ``dtype``, on any device) errs against its
    float64 truth at most ``slack`` times (twice the error of the eager reference's result,
    plus its floor for results near-exact in both), plus ``atol``."""
    def err(a: Tensor, t: Tensor) -> float:
        return (a.double().cpu() - t).abs().max().item()

    for name, a, r, t, floor in zip(names, ours, refs, truths, floors, strict=True):
        assert a.dtype == dtype, f'{name}: {a.dtype}, expected {dtype}'
        got, allowed = err(a, t), slack * (2 * err(r, t) + floor) + atol
        assert got <= allowed, f'{name}: error {got:.3g} where {allowed:.3g} is allowed'
