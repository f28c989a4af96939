"""Outlook attention (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition",
arXiv 2106.13112, Sec. 3.1, Eq. 3-5 and Algorithm 1).

For an input ``X`` (H x W x C), outlook attention predicts, from the (stride-pooled) token
at each location, the weights with which the K x K window around that location is
aggregated - no query-key products:

* ``A = W_A x_pool`` in ``R^{h x w x N K^4}`` (``self.attn``), reshaped per head to
  ``A_hat_{i,j}`` in ``R^{K^2 x K^2}`` and normalised with a softmax over its last axis;
* ``V = W_V X`` (``self.v``); ``V_Delta(i,j)`` the K x K window of ``V`` centred on pooled
  location ``(i, j)`` (an unfold with kernel K, padding p, stride s);
* ``Y_Delta(i,j) = softmax(A_hat_{i,j}) V_Delta(i,j)`` (Eq. 4), the K^2 outputs of window
  ``(i,j)``, one per window position;
* dense aggregation (Eq. 5): every output pixel is the sum of the window outputs that cover
  it (a fold, summing overlaps), followed by the output projection ``self.proj``.

Parameters carry the names of the official release (sail-sg/volo) and of timm's
``timm.models.volo.OutlookAttention``: ``v``, ``attn`` and ``proj`` Linear layers, so VOLO
checkpoints load strictly. As in both, the logits are scaled by ``(C/N)^-1/2`` before the
softmax (Algorithm 1 of the paper omits this factor); ``A``'s K^4 outputs are ordered
(window position m, source position n), the softmax runs over n.

The aggregation itself (Eq. 4-5 on NHWC tensors) is :func:`mmattn.ops.outlook_attention`,
shared by the NCHW block here and the NHWC ``Outlooker`` of ``mmattn.models.volo``: a
pure-PyTorch reference, or compiled kernels (CUDA, and C++ for CPU) that never materialise the
unfolded windows, chosen by ``backend=`` (see :mod:`mmattn.ops.dispatch`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmattn.ops.dispatch import backends_for, select_backend
from mmattn.ops.outlook import (outlook_attention, outlook_attention_block, outlook_pool,
                                outlook_softmax, unfold_windows)
from mmattn.registry import MODELS

from .checks import (check_choice, check_divisible, check_flag, check_input, check_nhwc,
                     check_positive, check_probability, check_scriptable_backend,
                     concrete_annotations, factory_kwargs)

__all__ = ['OutlookAttention', 'outlook_attention', 'outlook_grid_size']


def outlook_grid_size(height: int, width: int, kernel_size: int, padding: int, stride: int,
                      block: str = 'OutlookAttention') -> tuple[int, int]:
    """Size ``(h, w)`` of the pooled grid (``ceil(H/s) x ceil(W/s)``), after checking that the
    K x K windows (padding p, stride s) tile the input with exactly one window per pooled
    location, so that the fold gives back ``H x W``.

    Along an axis of length n an unfold yields ``floor((n + 2p - K)/s) + 1`` windows (0 when
    ``n + 2p < K``); ceil-mode pooling yields ``ceil(n/s) = floor((n + s - 1)/s)`` cells.
    They agree for *every* n iff ``K = 2p + 1`` (odd kernel, "same" padding: window ``(i,j)``
    is centred on pixel ``(s i, s j)``, the first pixel of pooled cell ``(i, j)``); other
    combinations work only for some sizes and raise ``ValueError`` for the others.

    Compiles under ``torch.jit.script``; the block declares it with ``torch.fx.wrap``, so a
    ``torch.fx`` graph checks the real sizes when it runs.
    """
    return (_grid_cells('height', height, kernel_size, padding, stride, block),
            _grid_cells('width', width, kernel_size, padding, stride, block))


def _pooled(n: int, stride: int) -> int:
    """Cells of the ceil-mode pooled grid along an axis of length ``n``."""
    return -(-n // stride)


def _grid_cells(name: str, n: int, kernel_size: int, padding: int, stride: int,
                block: str) -> int:
    """Pooled cells along one axis of length ``n`` (see :func:`outlook_grid_size`)."""
    pooled = _pooled(n, stride)
    windows = unfold_windows(n, kernel_size, padding, stride)
    if windows != pooled:
        raise ValueError(
            f'{block}: kernel_size={kernel_size}, padding={padding}, stride={stride} do not '
            f'tile an input of {name} {n}: the unfold gives {windows} windows but the pooled '
            f'grid has ceil({n}/{stride})={pooled} cells; use kernel_size = 2*padding + 1 '
            f'(any size works) or an input {name} for which floor((n + 2*padding - '
            f'kernel_size)/stride) + 1 == ceil(n/stride)')
    return pooled


# torch.fx records these calls (and checks the real tensors when the graph runs) instead of
# tracing into them: their checks branch on sizes, and outlook_attention picks its path (a
# compiled kernel or the reference) at run time, as the eager module does
torch.fx.wrap('check_input')
torch.fx.wrap('check_nhwc')
torch.fx.wrap('outlook_grid_size')
torch.fx.wrap('outlook_attention')


@MODELS.register_module()
class OutlookAttention(nn.Module):
    """Outlook attention of VOLO (arXiv 2106.13112, Sec. 3.1, Eq. 3-5).

    .. math::
        A = W_A\\,\\mathrm{AvgPool}_s(X), \\quad
        \\hat A_{i,j} = \\mathrm{softmax}\\big(d^{-1/2}\\,\\mathrm{reshape}_{K^2\\times K^2}(A_{i,j})\\big),
        \\quad V = W_V X, \\quad
        Y = W_P\\,\\mathrm{Fold}\\big(\\hat A_{i,j} V_{\\Delta(i,j)}\\big)

    per head (N heads of ``d = C/N`` channels); ``Fold`` sums each window's K^2 outputs back
    onto the pixels they came from (Eq. 5). ``W_A``, ``W_V``, ``W_P`` are ``self.attn``,
    ``self.v``, ``self.proj`` (nn.Linear, timm / sail-sg names). The pooling is ceil-mode
    average pooling with kernel and stride s (skipped for s=1).

    NCHW in and out as a plugin (``data_format='NCHW'``, the default); with
    ``data_format='NHWC'`` the forward takes and returns (B, H, W, C), as VOLO's Outlooker
    uses it (through ``__call__``, so forward hooks see the block in VOLO too). Any H, W when
    ``kernel_size == 2*padding + 1`` (the default); other geometries raise ``ValueError`` for
    sizes they cannot tile (see :func:`outlook_grid_size`), and at construction where they
    tile none.

    Args:
        in_channels: Channels C.
        num_heads: Heads N; must divide C.
        kernel_size: Window size K.
        padding: Zero padding p of the value map.
        stride: Stride s of the windows and of the pooling (VOLO uses 2).
        qkv_bias: Whether ``v`` has a bias (``attn`` and ``proj`` always have one).
        attn_drop: Dropout on the normalised weights.
        proj_drop: Dropout after the output projection.
        data_format: ``'NCHW'`` (plugin) or ``'NHWC'`` (channels-last tokens, as in VOLO).
        backend: The aggregation's path: ``'auto'`` (the compiled kernel where it is loaded for
            the input's device, else the reference), ``'reference'``, ``'cuda'`` or ``'cpu'``
            (see :func:`mmattn.ops.outlook_attention`). On a compiled kernel, without
            attention dropout in training and without forward hooks on ``v``/``attn``/``proj``
            (which it does not call), the whole block runs as
            :func:`mmattn.ops.outlook_attention_block`: its backward recomputes the values and
            the aggregation, so it keeps only the normalised weights for the backward.
    """

    _abbr_ = 'outlook'
    __constants__ = ['block_name']

    def __init__(self, in_channels: int, *, num_heads: int = 1, kernel_size: int = 3,
                 padding: int = 1, stride: int = 1, qkv_bias: bool = False,
                 attn_drop: float = 0., proj_drop: float = 0., data_format: str = 'NCHW',
                 backend: str = 'auto', device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_choice('data_format', data_format, ('NCHW', 'NHWC'), name)
        self.data_format = data_format
        check_choice('backend', backend, backends_for('outlook'), name)
        self.backend = backend
        self.in_channels = check_positive('in_channels', in_channels, name)
        self.num_heads = check_positive('num_heads', num_heads, name)
        check_divisible('in_channels', in_channels, 'num_heads', num_heads, name)
        self.kernel_size = check_positive('kernel_size', kernel_size, name)
        self.padding = check_positive('padding', padding, name, minimum=0)
        self.stride = check_positive('stride', stride, name)
        if stride > kernel_size:
            raise ValueError(f'{name}: stride must be <= kernel_size={kernel_size} (otherwise '
                             f'some pixels lie in no window), got stride={stride}')
        if padding >= kernel_size:
            raise ValueError(f'{name}: padding must be < kernel_size={kernel_size} (otherwise '
                             f'border windows see only padding), got padding={padding}')
        # from n = kernel_size on, stride more pixels add one window and one pooled cell:
        # a geometry that tiles no n up to kernel_size + stride tiles none
        if not any(unfold_windows(n, kernel_size, padding, stride) == _pooled(n, stride)
                   for n in range(1, kernel_size + stride + 1)):
            raise ValueError(
                f'{name}: kernel_size={kernel_size}, padding={padding}, stride={stride} tile no '
                f'input size (the unfold never gives ceil(n/stride) windows, one per pooled '
                f'cell); use kernel_size = 2*padding + 1 (any size works)')
        self.scale = (in_channels // num_heads) ** -0.5
        qkv_bias = check_flag('qkv_bias', qkv_bias, name)
        attn_drop = check_probability('attn_drop', attn_drop, name)
        proj_drop = check_probability('proj_drop', proj_drop, name)
        dd = factory_kwargs(device, dtype)
        self.v = nn.Linear(in_channels, in_channels, bias=qkv_bias, **dd)
        self.attn = nn.Linear(in_channels, kernel_size ** 4 * num_heads, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(in_channels, in_channels, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, kernel_size={self.kernel_size}, '
                f'padding={self.padding}, stride={self.stride}')

    def __prepare_scriptable__(self) -> OutlookAttention:
        """``torch.jit.script`` compiles the reference path: refuse another backend."""
        check_scriptable_backend(self.backend, self.block_name)
        return self

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outlook attention of ``x`` (N, C, H, W); returns (N, C, H, W). With
        ``data_format='NHWC'``: (B, H, W, C) in and out."""
        if self.data_format == 'NHWC':
            return self.forward_nhwc(x)
        check_input(x, self.in_channels, self.block_name)
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised outlook weights ``softmax(A_hat)`` of ``x`` (B, H, W, C), before dropout:
        (B, h, w, N, K^2, K^2)."""
        outlook_grid_size(x.shape[1], x.shape[2], self.kernel_size, self.padding, self.stride,
                          self.block_name)
        return outlook_softmax(self.attn(outlook_pool(x, self.stride)),
                               num_heads=self.num_heads, kernel_size=self.kernel_size,
                               scale=self.scale)

    def _fused_path(self, x: torch.Tensor) -> bool:
        """Whether the eager forward runs the whole block on a compiled kernel."""
        chosen = select_backend('outlook', x, self.backend)[0]
        hooked = any(m._forward_hooks or m._forward_pre_hooks
                     for m in (self.v, self.attn, self.proj))
        return chosen != 'reference' and not hooked and not (self.training and
                                                             self.attn_drop.p > 0)

    def forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Outlook attention of a channels-last ``x`` (B, H, W, C); returns (B, H, W, C).

        Under ``torch.jit.script`` and ``torch.fx`` tracing the forward is the unfused one
        (``v``, ``attn``, ``proj`` called as modules); its aggregation is compiled to the
        reference by TorchScript, and is one graph node choosing its path at run time under
        ``torch.fx``."""
        check_nhwc(x, self.in_channels, self.block_name)
        if not torch.jit.is_scripting():
            if self._fused_path(x):
                outlook_grid_size(x.shape[1], x.shape[2], self.kernel_size, self.padding,
                                  self.stride, self.block_name)
                y = outlook_attention_block(
                    x, self.v.weight, self.v.bias, self.attn.weight, self.attn.bias,
                    self.proj.weight, self.proj.bias, num_heads=self.num_heads,
                    kernel_size=self.kernel_size, padding=self.padding, stride=self.stride,
                    scale=self.scale)
                return self.proj_drop(y)
        attn = self.attn_drop(self.attention_weights(x))
        y = outlook_attention(self.v(x), attn, kernel_size=self.kernel_size,
                              padding=self.padding, stride=self.stride, backend=self.backend)
        return self.proj_drop(self.proj(y))
