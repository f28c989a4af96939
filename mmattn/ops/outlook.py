r"""Outlook attention's aggregation (VOLO, arXiv 2106.13112, Eq. 4-5) as a functional op with
backend dispatch.

.. math::
    Y_{\Delta(i,j)} = \hat A_{i,j} V_{\Delta(i,j)}, \qquad
    \tilde Y_{u,v} = \sum_{(i,j,m):\ \Delta(i,j)_m = (u,v)} (Y_{\Delta(i,j)})_m

* the *reference* (:func:`outlook_attention_reference`) gathers the K^2 shifted windows of the
  padded value map with strided slices, multiplies by the weights and scatters the K^2 results
  back (what timm does with ``unfold``/``fold``, without ``im2col``): it materialises two
  tensors K^2 / s^2 times the size of ``v`` and keeps one of them for the backward;
* the compiled kernels (``mmattn::outlook_fwd`` / ``outlook_bwd``, ``mmattn/ops/csrc/outlook*``:
  CUDA and a C++ CPU twin sharing the index code) compute each output pixel directly as a sum
  over the windows that cover it, and the backward likewise; nothing larger than ``v`` is
  materialised and only ``v`` and the weights are kept for the backward.

The kernels are registered with fake and autograd implementations, so ``torch.compile`` traces
them and autograd differentiates them (first order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension  # noqa: F401  (defines the op schemas)
from .dispatch import select_backend

__all__ = ['outlook_attention', 'outlook_attention_reference']


def outlook_attention_reference(v: Tensor, attn: Tensor, *, kernel_size: int, padding: int,
                                stride: int) -> Tensor:
    """Eq. 4-5 with the K^2 windows gathered and scattered by strided slices of the padded map
    (standard operators only: traceable and exportable). Shapes as :func:`outlook_attention`."""
    batch, height, width, channels = v.shape
    h, w, heads = attn.shape[1], attn.shape[2], attn.shape[3]
    k = kernel_size
    span_h, span_w = stride * (h - 1) + 1, stride * (w - 1) + 1
    vp = F.pad(v, (0, 0, padding, padding, padding, padding))
    offsets = [(a, b) for a in range(k) for b in range(k)]
    windows = torch.stack([vp[:, a:a + span_h:stride, b:b + span_w:stride] for a, b in offsets],
                          dim=3)  # (B, h, w, K^2, C)
    windows = windows.view(batch, h, w, k * k, heads, channels // heads).transpose(3, 4)
    out = torch.matmul(attn, windows).transpose(3, 4)  # (B, h, w, K^2, N, C/N)
    out = out.reshape(batch, h, w, k * k, channels)
    y = out.new_zeros(batch, height + 2 * padding, width + 2 * padding, channels)
    for idx, (a, b) in enumerate(offsets):
        y[:, a:a + span_h:stride, b:b + span_w:stride] += out[:, :, :, idx]
    return y[:, padding:padding + height, padding:padding + width]


@torch.library.register_fake('mmattn::outlook_fwd')
def _(v, attn, kernel_size, padding, stride):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.register_fake('mmattn::outlook_bwd')
def _(grad_out, v, attn, kernel_size, padding, stride):
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(attn, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    v, attn, ctx.kernel_size, ctx.padding, ctx.stride = inputs
    ctx.save_for_backward(v, attn)


def _backward(ctx, grad_out):
    v, attn = ctx.saved_tensors
    grad_v, grad_attn = torch.ops.mmattn.outlook_bwd(grad_out.contiguous(), v, attn,
                                                     ctx.kernel_size, ctx.padding, ctx.stride)
    return grad_v, grad_attn, None, None, None


torch.library.register_autograd('mmattn::outlook_fwd', _backward, setup_context=_setup_context)


def outlook_attention(v: Tensor, attn: Tensor, *, kernel_size: int, padding: int, stride: int,
                      backend: str = 'auto') -> Tensor:
    """Outlook aggregation, Eq. 4-5 of arXiv 2106.13112, on channels-last tensors.

    Args:
        v: Values ``V`` (B, H, W, C).
        attn: Normalised weights (B, h, w, N, K^2, K^2), ``attn[..., m, n]`` the weight of
            source position n for window position m; ``(h, w)`` the pooled grid
            (:func:`mmattn.layers.outlook.outlook_grid_size`), N heads (each owns C/N
            consecutive channels).
        kernel_size, padding, stride: The window geometry K, p, s.
        backend: ``'auto'`` (the compiled kernel for the device where it is loaded, else the
            reference; see :mod:`mmattn.ops.dispatch`), ``'reference'``, ``'cuda'`` or
            ``'cpu'`` (the compiled kernels; raise, saying how to build them, when missing).

    Returns:
        The folded output (B, H, W, C), before the output projection.
    """
    chosen, _ = select_backend('outlook', v, backend)
    if chosen == 'reference':
        return outlook_attention_reference(v, attn, kernel_size=kernel_size, padding=padding,
                                           stride=stride)
    attn = attn.to(v.dtype)  # autocast may leave the weights in float32
    return torch.ops.mmattn.outlook_fwd(v.contiguous(), attn.contiguous(), kernel_size, padding,
                                        stride)
