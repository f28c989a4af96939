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

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension  # noqa: F401  (defines the op schemas)
from .dispatch import select_backend
from .param_grads import bias_grad

__all__ = ['outlook_attention', 'outlook_attention_block', 'outlook_attention_reference',
           'outlook_pool', 'outlook_softmax', 'outlook_weights']


def unfold_windows(n: int, kernel_size: int, padding: int, stride: int) -> int:
    """Windows the unfold places along an axis of length ``n`` (outlook.h's ``h``/``w``)."""
    return (n + 2 * padding - kernel_size) // stride + 1 if n + 2 * padding >= kernel_size else 0


def check_outlook_arguments(v: Tensor, attn: Tensor, kernel_size: int, padding: int,
                            stride: int) -> None:
    """The compiled ops' argument checks (outlook.h's ``outlook_check``), for the reference
    path: the geometry, the ranks, ``attn``'s window and grid sizes and the heads dividing the
    channels, each named with the value it got (as ValueError / TypeError)."""
    # here, not at the top: mmattn.layers imports this module
    from mmattn.layers.checks import check_positive
    op = 'outlook_attention'
    for name, value, least in (('kernel_size', kernel_size, 1), ('padding', padding, 0),
                               ('stride', stride, 1)):
        check_positive(name, value, op, minimum=least)
    for name, t in (('v', v), ('attn', attn)):
        if not isinstance(t, Tensor):
            raise TypeError(f'{op}: {name} must be a torch.Tensor, got {type(t).__name__}')
        if not t.is_floating_point():
            raise TypeError(f'{op}: {name} must be floating point, got dtype {t.dtype}')
    if v.dim() != 4:
        raise ValueError(f'{op}: v must be 4-D (B, H, W, C), got shape {tuple(v.shape)}')
    if attn.dim() != 6:
        raise ValueError(f'{op}: attn must be 6-D (B, h, w, N, K*K, K*K), got shape '
                         f'{tuple(attn.shape)}')
    kk = kernel_size * kernel_size
    if attn.shape[4] != kk or attn.shape[5] != kk:
        raise ValueError(f"{op}: attn's last two dims must be K*K = {kk} (kernel_size "
                         f'{kernel_size}), got {attn.shape[4]} x {attn.shape[5]}')
    heads, channels = attn.shape[3], v.shape[3]
    if heads < 1 or channels % heads:
        raise ValueError(f'{op}: the channels C = {channels} of v must be divisible by the '
                         f'heads N = attn.size(3) = {heads}')
    grid = (v.shape[0], unfold_windows(v.shape[1], kernel_size, padding, stride),
            unfold_windows(v.shape[2], kernel_size, padding, stride))
    if tuple(attn.shape[:3]) != grid:
        raise ValueError(f"{op}: attn's (B, h, w) must be {grid} for v of shape "
                         f'{tuple(v.shape)} and kernel_size={kernel_size}, padding={padding}, '
                         f'stride={stride}, got {tuple(attn.shape[:3])}')


def outlook_attention_reference(v: Tensor, attn: Tensor, *, kernel_size: int, padding: int,
                                stride: int) -> Tensor:
    """Eq. 4-5 with the K^2 windows gathered and scattered by strided slices of the padded map
    (standard operators only: traceable and exportable). Shapes as :func:`outlook_attention`."""
    batch, height, width, channels = v.shape[0], v.shape[1], v.shape[2], v.shape[3]
    h, w, heads = attn.shape[1], attn.shape[2], attn.shape[3]
    k = kernel_size
    span_h, span_w = stride * (h - 1) + 1, stride * (w - 1) + 1
    vp = F.pad(v, (0, 0, padding, padding, padding, padding))
    # window position m = a * K + b (row offset a, column offset b); one loop, so that
    # torch.jit.script compiles it
    windows = torch.stack([vp[:, m // k:m // k + span_h:stride, m % k:m % k + span_w:stride]
                           for m in range(k * k)], dim=3)  # (B, h, w, K^2, C)
    windows = windows.view(batch, h, w, k * k, heads, channels // heads).transpose(3, 4)
    out = torch.matmul(attn, windows).transpose(3, 4)  # (B, h, w, K^2, N, C/N)
    out = out.reshape(batch, h, w, k * k, channels)
    y = out.new_zeros(batch, height + 2 * padding, width + 2 * padding, channels)
    for m in range(k * k):
        a, b = m // k, m % k
        y[:, a:a + span_h:stride, b:b + span_w:stride] += out[:, :, :, m]
    return y[:, padding:padding + height, padding:padding + width]


#: outlook_fwd's ones_column: the channels it appends, (1, 0, ..., 0) (outlook.h's kOnesChannels)
ONES_CHANNELS = 8


@torch.library.register_fake('mmattn::outlook_fwd')
def _(v, attn, kernel_size, padding, stride, ones_column=False):
    return v.new_empty(*v.shape[:3], v.shape[3] + (ONES_CHANNELS if ones_column else 0))


@torch.library.register_fake('mmattn::outlook_bwd')
def _(grad_out, v, attn, kernel_size, padding, stride, softmax_scale=None):
    return (torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(attn, memory_format=torch.contiguous_format))


@torch.library.register_fake('mmattn::outlook_softmax')
def _(logits, kernel_size, scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake('mmattn::outlook_unpool_add')
def _(grad, pooled, stride):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake('mmattn::outlook_pool')
def _(x, stride):
    batch, height, width, channels = x.shape
    return x.new_empty(batch, -(-height // stride), -(-width // stride), channels)


def _setup_context(ctx, inputs, output) -> None:
    v, attn, ctx.kernel_size, ctx.padding, ctx.stride = inputs[:5]
    ctx.save_for_backward(v, attn)


def _backward(ctx, grad_out):
    v, attn = ctx.saved_tensors
    grad_out = grad_out[..., :v.shape[-1]]   # (the ones_column channels are constants)
    grad_v, grad_attn = torch.ops.mmattn.outlook_bwd(grad_out.contiguous(), v, attn,
                                                     ctx.kernel_size, ctx.padding, ctx.stride)
    return grad_v, grad_attn, None, None, None, None


torch.library.register_autograd('mmattn::outlook_fwd', _backward, setup_context=_setup_context)


def outlook_attention(v: Tensor, attn: Tensor, kernel_size: int, padding: int, stride: int,
                      backend: str = 'auto') -> Tensor:
    """Outlook aggregation, Eq. 4-5 of arXiv 2106.13112, on channels-last tensors (pass the
    geometry by keyword; the arguments are not keyword-only because TorchScript cannot compile
    keyword-only arguments with defaults).

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

    Under ``torch.jit.script`` this compiles to the reference (an explicit compiled backend
    raises). :class:`~mmattn.layers.OutlookAttention` declares it with ``torch.fx.wrap``, so
    a ``torch.fx`` graph calls it as one node that chooses its path when the graph runs, as
    the eager module does.
    """
    if torch.jit.is_scripting():
        if backend != 'auto' and backend != 'reference':
            raise RuntimeError(f"outlook_attention: backend='{backend}' is a compiled kernel, "
                               "which TorchScript cannot call; use 'auto' or 'reference'")
        return outlook_attention_reference(v, attn, kernel_size=kernel_size, padding=padding,
                                           stride=stride)
    chosen, _ = select_backend('outlook', v, backend)
    if chosen == 'reference':  # (the compiled ops check their arguments in C++)
        check_outlook_arguments(v, attn, kernel_size, padding, stride)
        return outlook_attention_reference(v, attn, kernel_size=kernel_size, padding=padding,
                                           stride=stride)
    attn = attn.to(v.dtype)  # autocast may leave the weights in float32
    return torch.ops.mmattn.outlook_fwd(v.contiguous(), attn.contiguous(), kernel_size, padding,
                                        stride)


def outlook_pool(x: Tensor, stride: int) -> Tensor:
    """Ceil-mode average pooling with kernel and stride s of a (B, H, W, C) map (VOLO's): the
    mean of each s x s cell, a last row or column of cells that overhangs the map the mean of
    the pixels it holds.

    (``count_include_pad=False``: the same means without padding, and the gradient
    ``torch.compile`` computes right. Inductor's ``avg_pool2d`` backward with the default
    ``True`` divides an overhanging cell's gradient by s^2 where the forward divided by its
    pixel count, pytorch/pytorch#198119, torch 2.13.0: wrong input gradients on the last row
    and column of a map whose side s does not divide.)"""
    if stride == 1:
        return x
    return F.avg_pool2d(x.permute(0, 3, 1, 2), stride, stride, ceil_mode=True,
                        count_include_pad=False).permute(0, 2, 3, 1)


def _block_pool(x: Tensor, stride: int) -> Tensor:
    """:func:`outlook_pool` inside the compiled block (no autograd: its backward spreads the
    pooled gradient itself): on CUDA the kernel ``mmattn::outlook_pool`` (16-byte vectors along
    the channels), where PyTorch's channels-last ``avg_pool2d`` ran at 0.3 TB/s on an H100
    (126 us a call at VOLO-D1's stage 1, twice a block per step); on the CPU, and for an x
    that is an NCHW map's permuted view (the block called on NCHW input), ``avg_pool2d``
    (PyTorch's NCHW kernel then, where the op would copy x first)."""
    if stride == 1 or x.device.type != 'cuda' or not x.is_contiguous():
        return outlook_pool(x, stride)
    return torch.ops.mmattn.outlook_pool(x, stride)


def outlook_softmax(logits: Tensor, *, num_heads: int, kernel_size: int,
                    scale: float) -> Tensor:
    """``softmax(scale * reshape(logits))``: the projected pooled map (B, h, w, N K^4) as
    weights (B, h, w, N, K^2, K^2), normalised over the last axis (Eq. 3)."""
    k2 = kernel_size * kernel_size
    logits = logits.reshape(logits.shape[0], logits.shape[1], logits.shape[2], num_heads, k2,
                            k2)
    return (logits * scale).softmax(dim=-1)


def outlook_weights(x: Tensor, project: Callable[[Tensor], Tensor], *, num_heads: int,
                    kernel_size: int, stride: int, scale: float,
                    pool: Callable[[Tensor, int], Tensor] = outlook_pool) -> Tensor:
    """The normalised outlook weights of ``x`` (B, H, W, C), Eq. 3:
    ``softmax(scale * reshape(project(AvgPool_s(x))))``, shape (B, h, w, N, K^2, K^2), the
    softmax over the last axis. ``project`` is ``W_A`` (the block's ``attn`` layer), ``pool``
    the pooling (``pool(x, stride)``; :func:`outlook_pool` by default)."""
    return outlook_softmax(project(pool(x, stride)), num_heads=num_heads,
                           kernel_size=kernel_size, scale=scale)


class _RecomputingOutlook(torch.autograd.Function):
    """The whole outlook-attention block on the compiled kernels, keeping only its input and
    the normalised weights for the backward (see :func:`outlook_attention_block`). Returns the
    output as a (B H W, C) matrix, the projection's own result: a (B, H, W, C) view of it made
    inside the Function could not be changed in place by the caller (autograd forbids it for a
    custom Function's view outputs; timm's blocks do change an ``attn_layer``'s output in
    place); :func:`outlook_attention_block` views it outside."""

    @staticmethod
    def forward(ctx, x: Tensor, v_weight: Tensor, v_bias: Tensor | None, attn_weight: Tensor,
                attn_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                geometry: tuple[int, int, int, int, float]) -> Tensor:
        k, p, s, heads, scale = geometry
        v = F.linear(x, v_weight, v_bias)
        # Eq. 3's weights: the scaling and the softmax in one pass (mmattn::outlook_softmax)
        logits = F.linear(_block_pool(x, s), attn_weight, attn_bias).to(v.dtype)
        attn = torch.ops.mmattn.outlook_softmax(logits, k, scale).view(
            *logits.shape[:3], heads, k * k, k * k)
        y = torch.ops.mmattn.outlook_fwd(v.contiguous(), attn, k, p, s)
        device = x.device.type
        ctx.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.geometry, ctx.has_v_bias = geometry, v_bias is not None
        ctx.save_for_backward(x, attn, v_weight, v_bias, attn_weight, proj_weight)
        return F.linear(y.reshape(-1, y.shape[-1]), proj_weight, proj_bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, attn, v_weight, v_bias, attn_weight, proj_weight = ctx.saved_tensors
        k, p, s, heads, scale = ctx.geometry
        device, amp, amp_dtype = ctx.amp
        with torch.autocast(device, dtype=amp_dtype, enabled=amp):
            c = x.shape[-1]
            grad_out = grad_out.reshape(*x.shape[:3], c)
            v = F.linear(x, v_weight, v_bias).contiguous()            # recomputed
            # y recomputed, with a channel of ones after it (and 7 zeros, for alignment): the
            # projection's bias gradient, the sum of grad_out over the pixels, comes out of the
            # weight gradient's product as its row c (on an H200 at VOLO-D1's stage 1, bf16,
            # grad_out.sum(0) took 123 us a call: 192 sums of 100,352 values each); the weight
            # gradient is then that product's transposed view (copied into the weight's layout)
            y = torch.ops.mmattn.outlook_fwd(v, attn, k, p, s, True)
            g2 = grad_out.reshape(-1, c)
            prod = y.reshape(-1, c + ONES_CHANNELS).to(g2.dtype).t() @ g2   # (c + 8, c)
            g_proj_w, g_proj_b = prod[:c].t(), prod[c]
            dy = (grad_out @ proj_weight.to(grad_out.dtype)).to(v.dtype).contiguous()
            # the logits' gradient, scale attn (dattn - sum(attn dattn)), in the kernel that
            # computes dattn, from its float products (on an H200 at VOLO-D1's stage 1, bf16,
            # PyTorch's softmax backward and the scaling after it were two more passes over
            # the weights' 24 MB and two more operator calls, 2026-11-27)
            dv, dlogits = torch.ops.mmattn.outlook_bwd(dy, v, attn, k, p, s, scale)
            pooled = _block_pool(x, s)
            dlogits = dlogits.reshape(*pooled.shape[:3], -1).to(pooled.dtype)
            d2 = dlogits.reshape(-1, dlogits.shape[-1])
            g_attn_w = d2.t() @ pooled.reshape(-1, c).to(d2.dtype)
            g_attn_b = bias_grad(d2)
            dpooled = dlogits @ attn_weight.to(dlogits.dtype)
            dx = dv @ v_weight.to(dv.dtype)
            if s == 1:
                dx = dx + dpooled
            else:
                # the pooling's backward added to dx in one pass (on an H200 at VOLO-D1's stage
                # 1, bf16, PyTorch's broadcast add of the spread gradient took 70 us for 87 MB;
                # its NHWC average-pooling backward, 362 us on an H100)
                dx = torch.ops.mmattn.outlook_unpool_add(dx.contiguous(),
                                                         dpooled.to(dx.dtype).contiguous(), s)
            dv2 = dv.reshape(-1, c)
            g_v_w = dv2.t() @ x.reshape(-1, c).to(dv2.dtype)
            g_v_b = bias_grad(dv2) if ctx.has_v_bias else None
        params = (v_weight, v_bias, attn_weight, attn_weight, proj_weight, proj_weight)
        grads = (g_v_w, g_v_b, g_attn_w, g_attn_b, g_proj_w, g_proj_b)
        # (each in its parameter's dtype and dense layout, at most one copy each)
        grads = tuple(None if g is None else g.to(prm.dtype, memory_format=torch.contiguous_format)
                      for g, prm in zip(grads, params))
        return (dx.to(x.dtype),) + grads + (None,)


def outlook_attention_block(x: Tensor, v_weight: Tensor, v_bias: Tensor | None,
                            attn_weight: Tensor, attn_bias: Tensor, proj_weight: Tensor,
                            proj_bias: Tensor, *, num_heads: int, kernel_size: int, padding: int,
                            stride: int, scale: float) -> Tensor:
    """VOLO's outlook attention (Eq. 3-5 of arXiv 2106.13112 with its projections) on the
    compiled aggregation kernels, for channels-last ``x`` (B, H, W, C)::

        A = softmax(scale * W_A pool_s(x)),  y = Fold(A V_Delta),  V = W_V x,  out = W_P y

    The backward recomputes ``V`` (one matrix product) and ``y`` (one kernel call) instead of
    keeping them, and the pooled map (an average pooling): the block keeps its input and the
    normalised weights ``A`` for the backward, nothing else (timm's keeps the pooled map,
    ``A``, the unfolded values, K^2 / s^2 times ``x``, and the projection's input). No
    attention dropout (the caller uses this only when it is off). Under autocast the backward
    runs with the forward's autocast state."""
    out = _RecomputingOutlook.apply(x, v_weight, v_bias, attn_weight, attn_bias, proj_weight,
                                    proj_bias, (kernel_size, padding, stride, num_heads, scale))
    return out.view(*x.shape[:3], out.shape[-1])
