"""Polarized Self-Attention (PSA), Liu et al., "Polarized Self-Attention: Towards
High-quality Pixel-wise Regression", arXiv 2107.00782.

Two branches gate a feature map ``X`` (``C x H x W``), each keeping full resolution along one
axis and collapsing the other, with a softmax on the collapsed axis and a sigmoid at the end:

* channel-only (Eq. 1-2 of the paper)::

      A^ch(X) = F_SG[ LN( W_z( sigma_1(W_v(X)) x F_SM(sigma_2(W_q(X))) ) ) ]   in R^{C x 1 x 1}
      Z^ch    = A^ch(X) (.)ch X

  ``W_v``: 1x1 conv C -> C/2, ``W_q``: 1x1 conv C -> 1, ``F_SM``: softmax over the ``H*W``
  pixels, ``x``: matrix product (a C/2 vector), ``W_z``: 1x1 conv C/2 -> C, ``LN``: LayerNorm
  over the C channels, ``F_SG``: sigmoid.
* spatial-only (Eq. 3-4)::

      A^sp(X) = F_SG[ sigma_3( F_SM(sigma_1(F_GP(W_q(X)))) x sigma_2(W_v(X)) ) ]   in R^{1 x H x W}
      Z^sp    = A^sp(X) (.)sp X

  ``W_q``, ``W_v``: 1x1 convs C -> C/2, ``F_GP``: global average pooling, ``F_SM``: softmax
  over the C/2 channels of the pooled query.
* composition (Eq. 5)::

      parallel:   PSA_p(X) = Z^ch + Z^sp = A^ch(X) (.)ch X + A^sp(X) (.)sp X
      sequential: PSA_s(X) = Z^sp(Z^ch)  = A^sp(A^ch(X) (.)ch X) (.)sp (A^ch(X) (.)ch X)

Two variants share this file:

``variant='paper'`` computes the equations above. Its parameters carry the names of the most
widely used public implementation (``ParallelPolarizedSelfAttention`` /
``SequentialPolarizedSelfAttention`` in xmu-xiaoma666/External-Attention-pytorch,
``attention/PolarizedSelfAttention.py``): ``ch_wv``, ``ch_wq``, ``ch_wz`` (1x1 convs with bias),
``ln`` (``LayerNorm(C)``), ``sp_wv``, ``sp_wq``, so its checkpoints load strictly. Only the keys
are shared: some revisions of that file omit the spatial softmax, and its sequential class
returns ``Z^sp(Z^ch) + Z^ch`` instead of Eq. 5; here the paper decides. The bias of ``ch_wq``
is kept for those checkpoints although it cannot change the output (it shifts every pixel's
logit equally and the softmax over pixels removes it), so its gradient is zero: exactly 0 on the
folded paths, rounding noise on the reference.

``variant='official'`` computes what the authors' release computes (DeLightCMU/PSA,
``semantic-segmentation/network/PSA.py``, classes ``PSA_p`` and ``PSA_s``; the released
HRNet-OCR+PSA weights use ``PSA_s(planes, planes)`` as ``deattn`` in every HRNet ``BasicBlock``).
Keys ``conv_q_right``, ``conv_v_right``, ``conv_up`` (channel branch, named ``spatial_pool`` in
the release because it pools over space) and ``conv_q_left``, ``conv_v_left`` (spatial branch,
the release's ``channel_pool``); no conv has a bias except inside the sequential ``conv_up``.
It differs from the paper as follows:

* channel branch, parallel (``PSA_p``): no LayerNorm, ``A^ch = sigmoid(W_z(V x softmax(Q)))``
  with a bias-free ``W_z`` (``conv_up``);
* channel branch, sequential (``PSA_s``): ``W_z`` becomes a bottleneck
  ``conv_up = Sequential(Conv(C/2 -> C/2/ratio, bias), LayerNorm([C/2/ratio, 1, 1]), ReLU,
  Conv(C/2/ratio -> C, bias))`` with ``ratio = 4`` (hard-coded in the release; ``ratio=`` here);
  the LayerNorm normalises the C/2/ratio bottleneck channels, not the C output channels;
* spatial branch, parallel (``PSA_p``): no softmax over channels on the pooled query; instead
  the product ``GP(W_q X) x W_v X`` (one value per pixel) goes through a softmax over the
  ``H*W`` pixels *and then* the sigmoid. The softmax output lies in (0, 1] and sums to 1, so
  the mask lies in (0.5, 0.731] and tends to 0.5 everywhere as ``H*W`` grows;
* spatial branch, sequential (``PSA_s``): no softmax on the pooled query; the value
  ``W_v X`` is softmax-normalised over the ``H*W`` pixels of each of its C/2 channels before
  the product;
* the four bias-free convs ``conv_q_*``/``conv_v_*`` are initialised with
  ``kaiming_normal_(mode='fan_in', nonlinearity='relu')`` (``conv_up`` keeps PyTorch's default).
  Note that the release's HRNet ``init_weights`` later overwrites every conv weight of the
  backbone (PSA included) with ``normal(std=0.001)``.

The release's ``kernel_size``/``stride`` arguments are not reproduced (``kernel_size`` is
unused there, ``stride != 1`` cannot broadcast against the input), nor is a separate
``planes``: the gate multiplies the input, so ``planes == inplanes`` is the only working case.

The attention masks are exposed for visualisation: ``channel_mask(x)`` / ``spatial_mask(x)``
compute ``A^ch`` / ``A^sp`` of ``x``, and the parameter-free ``channel_gate`` / ``spatial_gate``
submodules (the final sigmoids) see exactly the masks used in ``forward`` - attach a forward
hook to them (in sequential mode the spatial gate sees ``A^sp(Z^ch)``).

Backends (``PolarizedSelfAttention(backend=...)``): besides the eager equations above (the
*reference*, ``backend='reference'``), ``forward`` can run

* ``'folded'`` (any device): the 1x1 convolutions moved onto C-vectors wherever they act on a
  pixel-averaged quantity. The paper form folds completely (:mod:`mmattn.ops.psa`: the op
  ``mmattn::psa_paper_folded`` with a hand-written backward, a fraction of the activation
  memory); the release's forms fold what folds in PyTorch operations
  (:meth:`PolarizedSelfAttention._official_folded`: ``PSA_s`` keeps its softmaxed
  (N, C/2, H, W) value map);
* ``'cuda'`` (CUDA tensors): the whole block as one compiled op per direction with its autograd
  in C++ (:mod:`mmattn.ops.psa_block`): every form on CUDA kernels (the paper's folded passes;
  ``PSA_s``'s value map a transient GEMM output, never kept), keeping a few (N, H*W) and (N, C)
  tensors besides x;
* ``'cpu'`` (every form, CPU tensors): the whole block as one compiled C++ op per direction,
  its autograd registered in C++ (:mod:`mmattn.ops.psa_block`): nothing but x kept for the
  backward, and a small map costs its arithmetic instead of 40-120 operator calls.

The compiled ones need the extension (see :mod:`mmattn.ops.extension`). ``backend='auto'``
(default) takes, in this order, the CUDA kernels, the fused CPU block (for maps of up to
:data:`mmattn.ops.dispatch.PSA_CPU_MAX_WORK` elements per image; beyond, the folded paths are
as fast), the folded path, where each can run; it keeps the reference when
``MMATTN_BACKEND=reference`` is set, while ``torch.jit.trace``/``torch.onnx.export``/
``torch.fx`` record a graph (the traced/exported graph is the reference, standard operators
only; ``torch.jit.script`` compiles the reference too), and, for the paper form, when forward
(pre-)hooks are registered on ``channel_gate``/``spatial_gate``: the fused and the paper's
folded paths never call those submodules, so with hooks ``auto`` takes a path that does (the
release's folded path calls them) and the hooks fire; ``backend='folded'``/``'cuda'``/``'cpu'``
with hooks on a gate they do not call raise.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmattn.ops.dispatch import backends_for, select_backend
from mmattn.ops.psa import psa_paper_folded, psa_paper_params
from mmattn.ops.psa_block import psa_block, psa_block_weights
from mmattn.registry import MODELS

from .checks import (check_choice, check_input, check_positive, check_scriptable_backend,
                     concrete_annotations, factory_kwargs)

__all__ = ['PolarizedChannelAttention', 'PolarizedSpatialAttention', 'PolarizedSelfAttention']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')

_MODES = ('parallel', 'sequential')
_VARIANTS = ('paper', 'official')
_DEFAULT_RATIO = 4  # the release's PSA_s: ``ratio = 4``


def _check_options(block: str, in_channels: int, mode: str, variant: str,
                   ratio: int | None) -> int | None:
    """Validate the shared options; return the bottleneck ratio, or None where there is none."""
    check_positive('in_channels', in_channels, block, minimum=2)
    if in_channels % 2 != 0:
        raise ValueError(f'{block}: in_channels must be even (the branches use in_channels // 2 '
                         f'internal channels), got in_channels={in_channels}')
    check_choice('mode', mode, _MODES, block)
    check_choice('variant', variant, _VARIANTS, block)
    uses_ratio = variant == 'official' and mode == 'sequential'
    if not uses_ratio:
        if ratio is not None:
            raise ValueError(f"{block}: ratio is only used by variant='official', "
                             f"mode='sequential' (the release's PSA_s bottleneck), got "
                             f'ratio={ratio!r} with variant={variant!r}, mode={mode!r}')
        return None
    ratio = _DEFAULT_RATIO if ratio is None else check_positive('ratio', ratio, block)
    if in_channels // 2 < ratio:
        raise ValueError(f'{block}: the bottleneck has (in_channels // 2) // ratio channels, which '
                         f'must be >= 1; got in_channels={in_channels}, ratio={ratio}')
    return ratio


def _softmax_hw(t: torch.Tensor) -> torch.Tensor:
    """Softmax over the pixels (the last two dims) of an ``N x K x H x W`` tensor."""
    return t.flatten(2).softmax(-1).view_as(t)


def _kaiming_fan_in(*convs: nn.Conv2d) -> None:
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, a=0, mode='fan_in', nonlinearity='relu')


class _GateProduct(torch.autograd.Function):
    """``x * a * s`` for x (N, C, H, W), a (N, C, 1, 1), s (N, 1, H, W), keeping x and the two
    gates for the backward instead of the x-sized product ``a * s`` autograd would keep."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a, s)
        return x * a * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, a, s = ctx.saved_tensors
        gx = grad * x
        return grad * a * s, (gx * s).sum((2, 3), keepdim=True), \
            (gx * a).sum(1, keepdim=True)


class _ChannelBranch(nn.Module):
    """The channel-only branch ``A^ch`` (parameters registered on the host module, so that the
    host's state-dict keys stay flat)."""

    def _build_channel_branch(self, in_channels: int, variant: str, ratio: int | None,
                              fk: dict) -> None:
        mid = in_channels // 2
        if variant == 'paper':
            self.ch_wv = nn.Conv2d(in_channels, mid, 1, **fk)
            self.ch_wq = nn.Conv2d(in_channels, 1, 1, **fk)
            self.ch_wz = nn.Conv2d(mid, in_channels, 1, **fk)
            self.ln = nn.LayerNorm(in_channels, **fk)
        else:
            self.conv_q_right = nn.Conv2d(in_channels, 1, 1, bias=False, **fk)
            self.conv_v_right = nn.Conv2d(in_channels, mid, 1, bias=False, **fk)
            if ratio is None:  # PSA_p
                self.conv_up = nn.Conv2d(mid, in_channels, 1, bias=False, **fk)
            else:  # PSA_s
                self.conv_up = nn.Sequential(
                    nn.Conv2d(mid, mid // ratio, 1, **fk),
                    nn.LayerNorm([mid // ratio, 1, 1], **fk),
                    nn.ReLU(),
                    nn.Conv2d(mid // ratio, in_channels, 1, **fk))
            _kaiming_fan_in(self.conv_q_right, self.conv_v_right)
        self.channel_gate = nn.Sigmoid()

    def channel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``A^ch(x)``, shape ``N x C x 1 x 1``."""
        # hasattr (the variant's keys) rather than self.variant: torch.jit.script resolves it
        # when compiling, so it never compiles the other variant's missing submodules
        if hasattr(self, 'ch_wv'):                            # variant='paper'
            v, q = self.ch_wv(x), self.ch_wq(x)
        else:
            v, q = self.conv_v_right(x), self.conv_q_right(x)
        v = v.flatten(2)                                      # N x C/2 x HW
        q = q.flatten(2).softmax(-1)                          # N x 1 x HW, softmax over pixels
        vq = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)  # N x C/2 x 1 x 1
        if hasattr(self, 'ch_wz'):
            # LayerNorm over the C channels
            z = self.ln(self.ch_wz(vq).flatten(1))[:, :, None, None]
        else:
            z = self.conv_up(vq)                              # N x C x 1 x 1
        return self.channel_gate(z)


class _SpatialBranch(nn.Module):
    """The spatial-only branch ``A^sp`` (parameters registered on the host module)."""

    def _build_spatial_branch(self, in_channels: int, variant: str, fk: dict) -> None:
        mid = in_channels // 2
        if variant == 'paper':
            self.sp_wv = nn.Conv2d(in_channels, mid, 1, **fk)
            self.sp_wq = nn.Conv2d(in_channels, mid, 1, **fk)
        else:
            self.conv_q_left = nn.Conv2d(in_channels, mid, 1, bias=False, **fk)
            self.conv_v_left = nn.Conv2d(in_channels, mid, 1, bias=False, **fk)
            _kaiming_fan_in(self.conv_q_left, self.conv_v_left)
        self.spatial_gate = nn.Sigmoid()

    def spatial_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``A^sp(x)``, shape ``N x 1 x H x W``."""
        if hasattr(self, 'sp_wq'):                          # variant='paper' (see channel_mask)
            q = self.sp_wq(x).mean((2, 3)).softmax(-1)      # N x C/2, softmax over channels
            v = self.sp_wv(x)
        else:
            q = self.conv_q_left(x).mean((2, 3))            # N x C/2, no softmax
            v = self.conv_v_left(x)
            if self.mode == 'sequential':                   # PSA_s: softmax over pixels of V
                v = _softmax_hw(v)
        a = torch.einsum('nc,nchw->nhw', q, v).unsqueeze(1)  # N x 1 x H x W
        if self.variant == 'official' and self.mode == 'parallel':
            a = _softmax_hw(a)                              # PSA_p: softmax over pixels of QV
        return self.spatial_gate(a)


@MODELS.register_module()
class PolarizedChannelAttention(_ChannelBranch):
    """The channel-only branch of Polarized Self-Attention on its own: ``Z^ch = A^ch(X) (.) X``.

    Paper (Eq. 1)::

        A^ch(X) = sigmoid(LN(W_z(sigma_1(W_v X) x softmax_HW(sigma_2(W_q X)))))

    Args:
        in_channels: C, must be even (W_v has C/2 output channels).
        variant: ``'paper'`` (keys ``ch_wv, ch_wq, ch_wz, ln``) or ``'official'`` (the
            authors' release, keys ``conv_q_right, conv_v_right, conv_up``; see the module
            docstring for the differences).
        mode: only matters for ``variant='official'``: which release class the branch is taken
            from, ``'parallel'`` (``PSA_p``: bias-free ``conv_up``, no LayerNorm) or
            ``'sequential'`` (``PSA_s``: bottleneck ``conv_up`` with LayerNorm and ReLU).
        ratio: bottleneck ratio of the ``PSA_s`` ``conv_up`` (default 4); only allowed with
            ``variant='official', mode='sequential'``.
    """

    _abbr_ = 'psa_ch'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, variant: str = 'paper', mode: str = 'parallel',
                 ratio: int | None = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.block_name = type(self).__name__
        ratio = _check_options(self.block_name, in_channels, mode, variant, ratio)
        self.in_channels, self.variant, self.mode, self.ratio = in_channels, variant, mode, ratio
        self._build_channel_branch(in_channels, variant, ratio, factory_kwargs(device, dtype))

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        return self.channel_mask(x) * x

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, variant={self.variant!r}, mode={self.mode!r}'


@MODELS.register_module()
class PolarizedSpatialAttention(_SpatialBranch):
    """The spatial-only branch of Polarized Self-Attention on its own: ``Z^sp = A^sp(X) (.) X``.

    Paper (Eq. 3)::

        A^sp(X) = sigmoid(sigma_3(softmax_C(sigma_1(GP(W_q X))) x sigma_2(W_v X)))

    Args:
        in_channels: C, must be even (W_q and W_v have C/2 output channels).
        variant: ``'paper'`` (keys ``sp_wv, sp_wq``) or ``'official'`` (keys ``conv_q_left,
            conv_v_left``; see the module docstring for the differences).
        mode: only matters for ``variant='official'``: ``'parallel'`` (``PSA_p``: softmax over
            the pixels of the product) or ``'sequential'`` (``PSA_s``: softmax over the pixels
            of each value channel).
    """

    _abbr_ = 'psa_sp'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, variant: str = 'paper', mode: str = 'parallel',
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.block_name = type(self).__name__
        _check_options(self.block_name, in_channels, mode, variant, None)
        self.in_channels, self.variant, self.mode = in_channels, variant, mode
        self._build_spatial_branch(in_channels, variant, factory_kwargs(device, dtype))

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        return self.spatial_mask(x) * x

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, variant={self.variant!r}, mode={self.mode!r}'


@MODELS.register_module()
class PolarizedSelfAttention(_ChannelBranch, _SpatialBranch):
    """Polarized Self-Attention (Liu et al., arXiv 2107.00782), Eq. 5::

        parallel:   PSA_p(X) = A^ch(X) (.)ch X + A^sp(X) (.)sp X
        sequential: PSA_s(X) = A^sp(Z^ch) (.)sp Z^ch,   Z^ch = A^ch(X) (.)ch X

    with ``A^ch`` and ``A^sp`` as in :class:`PolarizedChannelAttention` and
    :class:`PolarizedSpatialAttention`. Both branches' parameters sit at the top level, so the
    state-dict keys are those of the public implementations: ``ch_wv, ch_wq, ch_wz, ln, sp_wv,
    sp_wq`` (``variant='paper'``, External-Attention-pytorch) or ``conv_q_right, conv_v_right,
    conv_up, conv_q_left, conv_v_left`` (``variant='official'``, the authors' ``PSA_p`` /
    ``PSA_s``; the released HRNet-OCR+PSA weights are ``mode='sequential'``).

    Args:
        in_channels: C, must be even (the branches use C/2 internal channels).
        mode: ``'parallel'`` or ``'sequential'``.
        variant: ``'paper'`` (the paper's equations) or ``'official'`` (the authors' release;
            the module docstring lists how it differs from the paper).
        ratio: bottleneck ratio of the release's ``PSA_s`` ``conv_up`` (default 4); only
            allowed with ``variant='official', mode='sequential'``.
        backend: ``'auto'`` (default), ``'reference'``, ``'folded'``, ``'cpu'`` (the fused
            C++ block) or ``'cuda'`` (the compiled CUDA path; forward raises, saying how to
            build it, where it cannot run). See the module docstring.

    ``channel_mask(x)`` / ``spatial_mask(x)`` return ``A^ch(x)`` / ``A^sp(x)``; forward hooks on
    ``channel_gate`` / ``spatial_gate`` capture the masks actually used by ``forward`` (they
    make ``backend='auto'`` run the reference, whose gates they are).
    """

    _abbr_ = 'psa'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, mode: str = 'parallel', variant: str = 'paper',
                 ratio: int | None = None, backend: str = 'auto', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        ratio = _check_options(name, in_channels, mode, variant, ratio)
        check_choice('backend', backend, backends_for(f'psa_{variant}'), name)
        self.in_channels, self.variant, self.mode, self.ratio = in_channels, variant, mode, ratio
        self.backend = backend
        fk = factory_kwargs(device, dtype)
        self._build_channel_branch(in_channels, variant, ratio, fk)
        self._build_spatial_branch(in_channels, variant, fk)

    def _gates_hooked(self) -> bool:
        return any(gate._forward_hooks or gate._forward_pre_hooks
                   for gate in (self.channel_gate, self.spatial_gate))

    def selected_backend(self, x: torch.Tensor) -> tuple[str, str]:
        """The path ``forward(x)`` takes and why: ``('cuda' | 'cpu' | 'folded' | 'reference',
        reason)``."""
        # the release's folded path calls the gates (their hooks fire), the fused and the
        # paper's folded paths do not; auto's heuristics: the fused CPU block for small maps
        # only, the folded path on CUDA only where it measured faster than the reference
        form = 'paper' if self.variant == 'paper' else \
            ('PSA_p' if self.mode == 'parallel' else 'PSA_s')
        return select_backend(f'psa_{self.variant}', x, self.backend,
                              hooks=self._gates_hooked(), heuristics=True, form=form)

    def _official_folded(self, x: torch.Tensor) -> torch.Tensor:
        """The release's ``PSA_p``/``PSA_s`` with every 1x1 convolution that acts on a
        pixel-averaged quantity moved onto a C-vector (``backend='folded'``):

        * channel branch: ``W_v X softmax_p(W_q X) = W_v s`` with ``s = sum_p pi_p x_p``, so
          ``conv_up`` and the gate act on an (N, C/2, 1, 1) tensor;
        * spatial branch, ``PSA_p``: ``GP(W_q X) . W_v x_p = (W_v^T W_q m) . x_p``, one logit
          per pixel (then the softmax over pixels and the sigmoid);
        * spatial branch, ``PSA_s``: the value map ``W_v (A (.) X)`` must exist (its softmax
          over pixels is per value channel), but as one batched product with the per-image
          weight ``W_v diag(A)``: ``Z^ch = A (.) X`` is never formed, nor the query map.

        Standard operators with autograd; the gates are called, so their hooks fire. What it
        keeps for the backward is x plus the (N, C/2, H, W) softmaxed value map of ``PSA_s``
        (none for ``PSA_p``), against several such maps and x-sized maps for the reference.
        """
        n, c, h, w = x.shape
        xf = x.flatten(2)                                                    # N, C, P
        wq = self.conv_q_right.weight.view(1, 1, c).expand(n, 1, c)
        pi = torch.bmm(wq.to(x.dtype), xf).softmax(-1)                       # N, 1, P
        s = torch.bmm(pi, xf.transpose(1, 2))                                # N, 1, C
        v = s.squeeze(1) @ self.conv_v_right.weight.view(c // 2, c).t().to(x.dtype)
        a = self.channel_gate(self.conv_up(v[:, :, None, None]))             # N, C, 1, 1
        w_q = self.conv_q_left.weight.view(c // 2, c).to(x.dtype)
        w_v = self.conv_v_left.weight.view(c // 2, c).to(x.dtype)
        if self.mode == 'parallel':
            u = (xf.mean(-1) @ w_q.t()) @ w_v                                # N, C
            logits = torch.bmm(u.unsqueeze(1), xf).softmax(-1)               # N, 1, P
            return x * a + x * self.spatial_gate(logits.view(n, 1, h, w))
        a_vec = a.view(n, 1, c)
        q = (xf.mean(-1) * a_vec.squeeze(1)) @ w_q.t()                       # N, C/2
        values = torch.bmm(w_v.unsqueeze(0) * a_vec, xf).softmax(-1)         # N, C/2, P
        logits = torch.bmm(q.unsqueeze(1), values)                           # N, 1, P
        return _GateProduct.apply(x, a, self.spatial_gate(logits.view(n, 1, h, w)))

    def __prepare_scriptable__(self) -> PolarizedSelfAttention:
        """``torch.jit.script`` compiles the reference path: refuse another backend."""
        check_scriptable_backend(self.backend, self.block_name)
        return self

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        if not torch.jit.is_scripting():  # TorchScript compiles the reference path only
            chosen = self.selected_backend(x)[0]
            if chosen in ('cpu', 'cuda'):
                return psa_block(x, *psa_block_weights(self))
            if chosen != 'reference' and self.variant == 'official':
                return self._official_folded(x)
            if chosen != 'reference':
                return psa_paper_folded(x, *psa_paper_params(self), eps=self.ln.eps,
                                        sequential=self.mode == 'sequential')
        z_ch = self.channel_mask(x) * x
        if self.mode == 'parallel':
            return z_ch + self.spatial_mask(x) * x
        return self.spatial_mask(z_ch) * z_ch

    def extra_repr(self) -> str:
        extra = f', ratio={self.ratio}' if self.ratio is not None else ''
        if self.backend != 'auto':
            extra += f', backend={self.backend!r}'
        return (f'in_channels={self.in_channels}, mode={self.mode!r}, '
                f'variant={self.variant!r}{extra}')
