"""A linear layer and a LayerNorm whose parameters' gradients come from mmattn's column-sum
kernels on CUDA.

A linear layer's bias gradient and a LayerNorm's weight and bias gradients are sums over the
rows of the output gradient (``Σ_r g``, ``Σ_r g x̂``). PyTorch's kernels for them were the
largest kernels of mmattn's eager VOLO-D1 training step that compiled timm does not pay
(H100, batch 128, bf16: the bias gradients' column reductions 3.4 ms a step, LayerNorm's
weight-gradient kernel 3.1 ms; on an H200 a [100352, 192] bf16 ``grad.sum(0)`` took 123 µs,
0.31 TB/s). ``mmattn::linear`` / ``mmattn::layer_norm`` run ATen's forward and, backward, ATen's
products (and LayerNorm's input gradient without its parameter reduction) with the sums on
``mmattn::bias_grad`` / ``mmattn::layer_norm_param_grads`` (``csrc/column_sums.cuh``: one pass
over the rows in 16-byte vectors, then a small kernel over the blocks' partial sums); their
autograd is registered in C++ (``csrc/param_grads.cpp``), first-order gradients only.

:func:`linear` and :func:`layer_norm` take that path for CUDA tensors when the kernels are
loaded, and ``torch.nn.functional``'s otherwise: on the CPU, under ``torch.jit.script`` /
``trace``, ``torch.onnx.export`` and ``torch.fx`` (recorded as one call), under
``torch.compile`` (whose generated reductions fuse with their neighbours), with
``MMATTN_BACKEND=reference``, and with ``MMATTN_COLUMN_SUMS=0`` (read per call: a switch to time
the two in one run). Under CUDA autocast they cast their inputs as autocast casts ``linear``'s
(to the autocast dtype) and ``layer_norm``'s (to float32).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension
from .dispatch import env_backend

__all__ = ['ENV_COLUMN_SUMS', 'bias_grad', 'column_sum_kernels', 'layer_norm', 'linear']

ENV_COLUMN_SUMS = 'MMATTN_COLUMN_SUMS'
#: the ops with CUDA kernels of their own (mmattn::linear / layer_norm are composite: ATen's
#: ops and these, registered by the same library)
_CUDA_OPS = ('bias_grad', 'layer_norm_param_grads')
_ready: dict[Optional[str], bool] = {}


@torch.library.register_fake('mmattn::bias_grad')
def _(grad):
    return grad.new_empty(grad.shape[-1:])


@torch.library.register_fake('mmattn::layer_norm_param_grads')
def _(grad, x, mean, rstd):
    return grad.new_empty(grad.shape[-1:]), grad.new_empty(grad.shape[-1:])


@torch.library.register_fake('mmattn::linear')
def _(x, weight, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake('mmattn::layer_norm')
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def _env_column_sums() -> bool:
    value = os.environ.get(ENV_COLUMN_SUMS, '').strip()
    if value not in ('', '0', '1'):
        raise ValueError(f'environment variable {ENV_COLUMN_SUMS} must be 0 or 1 (unset: 1), '
                         f'got {value!r}')
    return value != '0'


def _kernels_ready() -> bool:
    key = extension.load_extension()
    ready = _ready.get(key)
    if ready is None:
        ready = _ready[key] = all(extension.has_kernel(op, 'cuda') for op in _CUDA_OPS)
    return ready


def column_sum_kernels(x: Tensor) -> bool:
    """Whether :func:`linear` / :func:`layer_norm` / :func:`bias_grad` take the column-sum
    kernels for ``x`` (see the module's docstring)."""
    # (torch.onnx.export records with torch.jit's tracer, or with torch.export's, under which
    # is_compiling() holds)
    if not x.is_cuda or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if not _env_column_sums() or env_backend() == 'reference':
        return False
    return _kernels_ready()


def bias_grad(grad: Tensor) -> Tensor:
    """``grad`` summed over every dimension but the last (a bias's gradient), in its dtype."""
    if column_sum_kernels(grad):
        return torch.ops.mmattn.bias_grad(grad)
    return grad.reshape(-1, grad.shape[-1]).sum(0)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)``; on CUDA, the bias gradient on mmattn's kernel."""
    if torch.jit.is_scripting():
        return F.linear(x, weight, bias)
    return _linear(x, weight, bias)


@torch.jit.unused
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if not column_sum_kernels(x):
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled('cuda'):
        x, weight, bias = _cast(torch.get_autocast_dtype('cuda'), x, weight, bias)
    return torch.ops.mmattn.linear(x, weight, bias)


def layer_norm(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``; on CUDA over the last
    dimension with a weight in x's dtype, the parameters' gradients on mmattn's kernel."""
    if torch.jit.is_scripting():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return _layer_norm(x, normalized_shape, weight, bias, eps)


@torch.jit.unused
def _layer_norm(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float) -> Tensor:
    if weight is None or len(normalized_shape) != 1 or not column_sum_kernels(x):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if torch.is_autocast_enabled('cuda'):  # autocast runs layer_norm in float32
        x, weight, bias = _cast(torch.float32, x, weight, bias)
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        # (parameters kept in another dtype than x's, float32 LayerNorms in a bf16 model: the
        # sums would be rounded to x's dtype)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    return torch.ops.mmattn.layer_norm(x, weight, bias, eps)


def _cast(dtype: torch.dtype, *tensors: Optional[Tensor]) -> tuple:
    """Each of ``tensors`` in ``dtype`` if it is floating point (autocast's rule); None stays."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
