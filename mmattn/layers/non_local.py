"""Non-local neural networks (Wang et al., CVPR 2018, arXiv 1711.07971).

Also home of :func:`softmax_attention`, the softmax-attention kernel shared with the
DANet position attention (``danet.py``): an explicit reference and a memory-efficient
path through :func:`torch.nn.functional.scaled_dot_product_attention` (SDPA).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import constant_init, normal_init
from torch import nn

from mmattn.registry import MODELS

from .bricks import ScriptableConvModule
from .checks import (check_choice, check_flag, check_input, check_norm_cfg, check_positive,
                     concrete_annotations)

__all__ = ['NonLocalAttention', 'softmax_attention']

# torch.fx records these as one call each (run on the real tensors when the graph runs)
# instead of tracing their branches on sizes and dtypes
torch.fx.wrap('check_input')
torch.fx.wrap('softmax_attention')

_MODES = ('embedded_gaussian', 'dot_product', 'gaussian', 'concatenation')
_SOFTMAX_MODES = ('embedded_gaussian', 'gaussian')


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                      efficient: bool) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` over key positions, for ``q (B, N, d)``, ``k (B, M, d)``,
    ``v (B, M, e)``; returns ``(B, N, e)``.

    ``efficient=False`` builds the ``N x M`` weight matrix explicitly (the reference).
    ``efficient=True`` calls SDPA with an explicit ``scale=`` (SDPA would otherwise divide by
    ``sqrt`` of its head dim, which here is not the paper's ``d``), so PyTorch may pick a fused
    kernel that never stores the ``N x M`` matrix. The fused kernels want one head dim for
    ``q``, ``k`` and ``v`` (CPU flash attention falls back to the quadratic-memory maths
    otherwise), so ``v`` is zero-padded and, when ``e > d``, split into ``ceil(e / d)`` heads of
    width ``d`` that share the broadcast ``q`` and ``k`` (padding ``q``/``k`` instead would
    leave the scores unchanged too, but push the head dim past what CUDA flash accepts).
    """
    if not efficient:
        weights = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * scale, dim=-1)
        return torch.matmul(weights.to(v.dtype), v)
    if q.dtype != v.dtype or k.dtype != v.dtype:  # gaussian mode under autocast: x vs. g(x)
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    b, m, e = v.shape
    n, d = q.shape[1], q.shape[2]
    heads = max(1, -(-e // d))
    # The fused kernels want unit stride along the head dim: (B, HW, d) from a transposed
    # NCHW map has stride HW there, and would silently send SDPA to the quadratic maths.
    # Each a copy, never a view (even where .contiguous() would have nothing to copy):
    # torch.compile saves q, k and v for the backward, and Inductor fails on a saved view
    # once the sizes are dynamic (a second input size; pytorch/pytorch#185510, torch 2.13.0).
    q, k = (t.unsqueeze(1).clone(memory_format=torch.contiguous_format) for t in (q, k))
    if heads == 1 and d > e:  # ('gaussian' mode: d = C > e) the padding is the one copy
        v = F.pad(v.unsqueeze(1), (0, d - e))
    else:  # (F.pad copies even when it pads nothing, so it runs only where it pads)
        if heads * d > e:
            v = F.pad(v, (0, heads * d - e))
        v = v.reshape(b, m, heads, d).transpose(1, 2)
        v = v.clone(memory_format=torch.contiguous_format)
    if heads > 1:
        q, k = q.expand(b, heads, n, d), k.expand(b, heads, m, d)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, n, heads * d)[..., :e]


@MODELS.register_module()
class NonLocalAttention(nn.Module):
    r"""Non-local block (arXiv 1711.07971, Eq. 1-2, Sec. 3.2-3.3).

    .. math::
        y_i = \frac{1}{\mathcal{C}(x)} \sum_j f(x_i, x_j)\, g(x_j), \qquad
        z_i = W_z y_i + x_i

    with ``g``, ``theta``, ``phi`` 1x1 convs to ``C' = max(C // reduction, 1)`` channels and the
    pairwise function ``f`` / normaliser ``C(x)`` chosen by ``mode`` (Sec. 3.2):

    - ``'embedded_gaussian'``: :math:`f = e^{\theta(x_i)^T\phi(x_j)}`, :math:`C = \sum_j f`
      (a softmax over ``j``);
    - ``'gaussian'``: :math:`f = e^{x_i^T x_j}` (no ``theta``/``phi``), :math:`C = \sum_j f`;
    - ``'dot_product'``: :math:`f = \theta(x_i)^T\phi(x_j)`, :math:`C = N`;
    - ``'concatenation'``: :math:`f = \mathrm{ReLU}(w_f^T[\theta(x_i), \phi(x_j)])`,
      :math:`C = N`. Computed separably as ``relu(w_θ·θ_i + w_φ·φ_j)``, never building
      the ``2C' x N x N`` concatenation.

    ``N`` is the number of key positions (after sub-sampling). ``W_z`` (``conv_out``) is a 1x1
    conv optionally followed by a norm layer (``norm_cfg``, mmcv ``build_norm_layer``); the
    norm's weight, or the conv when there is no norm, is initialised to zero (Sec. 3.3), so a
    fresh block is the identity. ``g``/``theta``/``phi`` are initialised N(0, 0.01) like mmcv.

    Args:
        in_channels: channels ``C`` of the input.
        mode: the pairwise function, see above.
        reduction: ``C' = max(C // reduction, 1)``.
        sub_sample: 2x2 max pooling after ``phi`` and ``g`` (Sec. 3.3; in ``'gaussian'`` mode
            on the raw keys ``x``). Pooling uses ``ceil_mode=True`` so odd and 1-pixel maps keep
            every pixel (mmcv floors; identical on even sizes).
        scale: divide the softmax logits by ``sqrt(d)``, ``d`` the width of the dot product:
            ``C'`` (``theta``/``phi``) in ``'embedded_gaussian'`` mode, ``C`` (the raw input) in
            ``'gaussian'`` mode. The paper scales in neither mode, hence the default ``False``.
            Only for the softmax modes; ``True`` with another mode is a ``ValueError``. mmcv's
            ``use_scale`` does this in ``'embedded_gaussian'`` mode only (see below).
        efficient: use :func:`softmax_attention`'s SDPA path, which never stores the
            ``HW x HW`` weights (a 128x256 map has 32768^2 of them). ``None`` (default): on
            for the softmax modes. ``True`` with ``'dot_product'``/``'concatenation'`` is a
            ``ValueError``.
        norm_cfg: optional norm after ``W_z``, e.g. ``dict(type='BN')``.
        device, dtype: factory kwargs for every parameter.

    State-dict keys follow mmcv's ``NonLocal2d`` (``g.conv``, ``theta.conv``, ``phi.conv``,
    ``conv_out.conv``/``conv_out.bn``, ``concat_project.conv``; with ``sub_sample`` the pooled
    branches are ``nn.Sequential(conv, pool)``, so ``g.0.conv``), so mmcv checkpoints load after
    renaming the plugin prefix (``nonlocal_block`` there, ``nonlocal`` here). Traceable,
    compilable and exportable: the path is fixed at construction.

    **mmcv equivalence.** ``NonLocal2d(C, mode=m, use_scale=u, reduction=r, sub_sample=s,
    norm_cfg=n)`` with its state dict loaded here gives the same output as
    ``NonLocalAttention(C, mode=m, scale=S, reduction=r, sub_sample=s, norm_cfg=n)`` with

    - ``m='embedded_gaussian'``: ``S = u``. mmcv's default ``use_scale=True`` divides by
      ``sqrt(C')``; the default here is the paper's ``False``, so pass ``scale=True``.
    - ``m='gaussian'``: ``S = False`` whatever ``u``. mmcv ignores ``use_scale`` in this mode
      and never scales; ``scale=True`` here divides the logits ``x_i^T x_j`` by ``sqrt(C)``,
      which no mmcv setting reproduces.
    - ``m='dot_product'`` / ``'concatenation'``: ``S = False``; mmcv ignores ``use_scale``
      (here ``scale=True`` is a ``ValueError``).

    and these further differences: ``sub_sample`` pools with ``ceil_mode=True`` (mmcv floors;
    equal when ``H`` and ``W`` are even); ``C' = max(C // reduction, 1)`` (mmcv's
    ``C // reduction`` is 0 when ``C < reduction``); only the 2-d block exists (mmcv's
    ``conv_cfg`` for ``NonLocal1d``/``NonLocal3d`` has no counterpart), and the init is fixed
    (mmcv's ``init_weights(std=0.01, zeros_init=True)`` defaults).
    """

    _abbr_ = 'nonlocal'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, mode: str = 'embedded_gaussian', reduction: int = 2,
                 sub_sample: bool = False, scale: bool = False, efficient: bool | None = None,
                 norm_cfg: dict | None = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_positive('in_channels', in_channels, name)
        check_positive('reduction', reduction, name)
        check_choice('mode', mode, _MODES, name)
        check_choice('efficient', efficient, (None, True, False), name)
        check_norm_cfg('norm_cfg', norm_cfg, name)
        sub_sample = check_flag('sub_sample', sub_sample, name)
        scale = check_flag('scale', scale, name)
        if scale and mode not in _SOFTMAX_MODES:
            raise ValueError(f'{name}: scale=True only applies to the softmax modes '
                             f'{_SOFTMAX_MODES}, got mode={mode!r}')
        if efficient and mode not in _SOFTMAX_MODES:
            raise ValueError(f'{name}: efficient=True needs a softmax mode {_SOFTMAX_MODES}, '
                             f'got mode={mode!r}')
        self.in_channels = in_channels
        self.mode = mode
        self.reduction = reduction
        self.inter_channels = max(in_channels // reduction, 1)
        self.sub_sample = sub_sample
        self.scale = scale
        self.efficient = mode in _SOFTMAX_MODES if efficient is None else bool(efficient)

        def conv(cin: int, cout: int, **kw: Any) -> ConvModule:
            # mmcv's ConvModule, in the form TorchScript compiles (same keys)
            return ScriptableConvModule(cin, cout, kernel_size=1, act_cfg=None, **kw)

        c, ci = in_channels, self.inter_channels
        self.g = conv(c, ci)
        self.conv_out = conv(ci, c, norm_cfg=norm_cfg)
        if mode != 'gaussian':
            self.theta = conv(c, ci)
            self.phi = conv(c, ci)
        if mode == 'concatenation':
            # w_f of Sec. 3.2; its ReLU is applied in _pairwise.
            self.concat_project = conv(2 * ci, 1, bias=False)
        if self.sub_sample:
            pool = nn.MaxPool2d(kernel_size=2, ceil_mode=True)
            self.g = nn.Sequential(self.g, pool)
            self.phi = nn.Sequential(self.phi, pool) if mode != 'gaussian' else pool
        self._init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_weights(self) -> None:
        for branch in ('g', 'theta', 'phi'):
            module = getattr(self, branch, None)
            if isinstance(module, nn.Sequential):
                module = module[0]
            if isinstance(module, ConvModule):
                normal_init(module.conv, std=0.01)
        if self.conv_out.with_norm:
            constant_init(self.conv_out.norm, 0)
        else:
            constant_init(self.conv_out.conv, 0)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               tuple[int, int]]:
        """Queries ``(B, HW, d)``, keys ``(B, M, d)``, values ``(B, M, C')``, key grid size."""
        # hasattr (the mode's submodules), not self.mode: torch.jit.script resolves it when
        # compiling, so it never compiles another mode's missing submodules
        if hasattr(self, 'theta'):  # not 'gaussian'
            q, k = self.theta(x), self.phi(x)
        else:  # 'gaussian': the raw input, pooled by phi with sub_sample
            q, k = x, x
            if hasattr(self, 'phi'):
                k = self.phi(x)
        v = self.g(x)
        grid = (k.shape[2], k.shape[3])
        return (q.flatten(2).transpose(1, 2), k.flatten(2).transpose(1, 2),
                v.flatten(2).transpose(1, 2), grid)

    def _logit_scale(self, d: int) -> float:
        return 1.0 / math.sqrt(d) if self.scale else 1.0

    def _pairwise(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Normalised pairwise weights ``f(x_i, x_j) / C(x)``, shape ``(B, N, M)``."""
        if self.mode in ('embedded_gaussian', 'gaussian'):  # _SOFTMAX_MODES (TorchScript
            # cannot read a global tuple)
            logits = torch.matmul(q, k.transpose(1, 2)) * self._logit_scale(q.shape[-1])
            return torch.softmax(logits, dim=-1)
        if not hasattr(self, 'concat_project'):  # 'dot_product' (see _embed for hasattr)
            return torch.matmul(q, k.transpose(1, 2)) / k.shape[1]
        w = self.concat_project.conv.weight.flatten()
        w_theta, w_phi = w[:self.inter_channels], w[self.inter_channels:]
        f = F.relu(torch.matmul(q, w_theta).unsqueeze(2) + torch.matmul(k, w_phi).unsqueeze(1))
        return f / k.shape[1]

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        b, _, h, w = x.shape
        q, k, v, _ = self._embed(x)
        if self.efficient:
            y = softmax_attention(q, k, v, scale=self._logit_scale(q.shape[-1]), efficient=True)
        else:
            y = torch.matmul(self._pairwise(q, k).to(v.dtype), v)
        # a tensor of its own, not a (channels-last) view of y: torch.compile saves W_z's input
        # for the backward, and Inductor fails on a saved view once the sizes are dynamic (a
        # second input size; pytorch/pytorch#185510, torch 2.13.0)
        y = y.transpose(1, 2).reshape(b, self.inter_channels, h, w).contiguous()
        return x + self.conv_out(y)

    def attention_map(self, x: torch.Tensor, index: int | tuple[int, int]) -> torch.Tensor:
        """Weights ``f(x_i, x_j) / C(x)`` of query pixel ``i`` over all key pixels ``j``.

        ``index`` is a flat index into ``H*W`` or a ``(row, col)`` pair. Returns
        ``(B, Hk, Wk)``: the key grid, which is ``(H, W)``, or ``ceil(H/2), ceil(W/2)`` with
        ``sub_sample``. Only one row of weights is computed.
        """
        name = type(self).__name__
        check_input(x, self.in_channels, name)
        h, w = x.shape[2], x.shape[3]
        if isinstance(index, tuple):
            if len(index) != 2 or not (0 <= index[0] < h and 0 <= index[1] < w):
                raise ValueError(f'{name}: index must be a (row, col) inside ({h}, {w}), '
                                 f'got {index!r}')
            index = index[0] * w + index[1]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < h * w:
            raise ValueError(f'{name}: index must be an int in [0, {h * w}) or a (row, col) '
                             f'pair, got {index!r}')
        q, k, _, grid = self._embed(x)
        return self._pairwise(q[:, index:index + 1], k).reshape(x.shape[0], *grid)
