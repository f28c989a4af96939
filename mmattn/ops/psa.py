r"""Polarized Self-Attention (arXiv 2107.00782), paper form, as a functional op with the 1x1
convolutions folded away.

Notation: ``x_p`` is the C-vector of pixel p (P = H*W pixels), the parameters are those of
:class:`mmattn.layers.PolarizedSelfAttention` (``variant='paper'``) written as matrices:
``ch_wq`` (C,), ``ch_wv`` (C/2, C), ``ch_wz`` (C, C/2), ``sp_wq``/``sp_wv`` (C/2, C), with
their biases, and the LayerNorm affine ``ln_weight``/``ln_bias``.

Every 1x1 convolution of the paper's Eq. 1-5 acts on a quantity that is then averaged over the
pixels with weights summing to 1, or contracted with a single vector, so it moves onto a C-vector
(biases included)::

    channel:  pi = softmax_p(ch_wq . x_p)          (ch_wq's bias cancels in the softmax)
              s  = sum_p pi_p x_p                   (C)
              A  = sigmoid(LN(W_z (W_v s + b_v) + b_z))          = A^ch   (Eq. 1)
    spatial:  m  = mean_p x_p                       (C)
              q  = softmax(W_q m + b_q)             (C/2)
              u  = W_v'^T q,  c = q . b_v'          (C), ()
              S_p = sigmoid(u . x_p + c)                         = A^sp   (Eq. 3)
    parallel:   y = x (A (+) S)      y[c, p] = x[c, p] (A_c + S_p)
    sequential: the spatial branch sees A (.) x, whose mean is A (.) m and whose logit is
                (u (.) A) . x_p + c;  y[c, p] = x[c, p] A_c S_p

A forward therefore costs four reductions over x (softmax logits, softmax-weighted mean,
mean, spatial logits), each a batched matrix-vector product or a plain reduction, and one
elementwise pass, plus C-sized work; the backward (hand-written, :func:`_backward_impl`) one
product ``G (.) x`` with its two reductions, three matrix-vector passes over x, and
``dx = G (.) (A (+) S)`` plus a rank-4 correction written in place. The saved state is x plus
a few (N, P) and (N, C) vectors, against several (N, C/2, H, W) maps for the eager form.
Written as four passes over x (:func:`_fwd_reduce_torch` ... :func:`_bwd_apply_torch`) with
the C-sized work between them in two "glue" functions (:func:`_fwd_glue_torch`,
:func:`_bwd_glue_torch`), each has a CUDA kernel with the same contract
(``mmattn/ops/csrc/psa_kernels.cuh``, ``psa_glue.cuh``; ``kernel=True``): 2 reads and 1 write
of x forward, 5·|x| backward, and a handful of launches per step (see ``docs/kernels.md``).

Both the forward and the backward are ``torch.library`` custom ops (``mmattn::psa_paper_folded``
and ``mmattn::psa_paper_folded_backward``) with fake implementations, so ``torch.compile``
traces them without graph breaks; first-order gradients only (a double backward raises).
Under autocast the op runs in the dtype of ``x`` (it has no autocast rule); for float16/bfloat16
inputs the C-sized work is done in float32.

The official release's forms (``variant='official'``) have no op here: ``PSA_s`` applies a
softmax over the pixels of each of the C/2 value channels, which needs the full per-pixel
(C/2 x C) product; the module folds what folds in PyTorch operations
(:meth:`mmattn.layers.PolarizedSelfAttention._official_folded`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import PSA_KERNEL_OPS, select_backend

__all__ = ['polarized_self_attention', 'psa_paper_folded', 'psa_paper_params',
           'psa_paper_reference']

_MODES = ('parallel', 'sequential')
# op inputs after x, in order (the public function's keyword names)
PARAM_NAMES = ('ch_wq', 'ch_bq', 'ch_wv', 'ch_bv', 'ch_wz', 'ch_bz', 'ln_weight', 'ln_bias',
               'sp_wq', 'sp_bq', 'sp_wv', 'sp_bv')


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the C-sized work: float32 for half inputs, else the input's."""
    return torch.promote_types(x.dtype, torch.float32)


def _ncp(t: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, P); a view for contiguous and channels_last layouts."""
    return t.flatten(2)


def _sum_p(xf: Tensor, vec: Tensor) -> Tensor:
    """``sum_p xf[n, c, p] vec[n, p]`` -> (N, C), as a (1 x P)(P x C) product per image (the
    (C x P)(P x 1) form is several times slower on CPU)."""
    return torch.bmm(vec.to(xf.dtype).unsqueeze(1), xf.transpose(1, 2)).squeeze(1)


def _sum_c(xf: Tensor, vec: Tensor) -> Tensor:
    """``sum_c vec[n, c] xf[n, c, p]`` -> (N, P)."""
    return torch.bmm(vec.to(xf.dtype).unsqueeze(1), xf).squeeze(1)


def _outer_into(out: Tensor, a: Tensor, s: Tensor, sequential: bool) -> Tensor:
    """Write ``A_c S_p`` (sequential) or ``A_c + S_p`` (parallel) into ``out`` (N, C, H, W)."""
    n, c, h, w = out.shape
    op = torch.mul if sequential else torch.add
    return op(a.to(out.dtype).view(n, c, 1, 1), s.to(out.dtype).view(n, 1, h, w), out=out)


def _add_low_rank_(out: Tensor, left: Tensor, right: Tensor) -> None:
    """``out[n, c, p] += sum_k left[n, c, k] right[n, k, p]`` in place on an (N, C, H, W)
    tensor, in whichever of its two layouts is dense."""
    of = _ncp(out)
    if of.stride(1) == 1 and of.size(1) > 1:       # channels_last: (N, P, C) is dense
        ot = of.transpose(1, 2)
        ot.baddbmm_(right.transpose(1, 2), left.transpose(1, 2))
    else:
        of.baddbmm_(left, right)


def _small_chain(s: Tensor, m: Tensor, w: dict, eps: float, sequential: bool) -> dict:
    """The C-sized part of the forward (acc dtype): channel mask A, spatial vectors q, u, c."""
    v = torch.addmm(w['ch_bv'], s, w['ch_wv'].t())            # N, C/2
    z = torch.addmm(w['ch_bz'], v, w['ch_wz'].t())            # N, C
    mu = z.mean(-1, keepdim=True)
    var = (z - mu).square().mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    zhat = (z - mu) * rstd
    a = torch.sigmoid(torch.addcmul(w['ln_bias'], zhat, w['ln_weight']))
    mz = a * m if sequential else m
    q = torch.softmax(torch.addmm(w['sp_bq'], mz, w['sp_wq'].t()), -1)    # N, C/2
    u = q @ w['sp_wv']                                        # N, C
    c = q @ w['sp_bv']                                        # N
    ueff = u * a if sequential else u
    return dict(v=v, zhat=zhat, rstd=rstd, a=a, mz=mz, q=q, u=u, c=c, ueff=ueff)


def _cast_all(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``[t.to(dtype) for t in tensors]`` in two launches (one concatenation, one cast) instead
    of one per tensor; nothing when they already have the dtype."""
    if all(t.dtype == dtype for t in tensors):
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    return [part.view(t.shape) for part, t in
            zip(flat.split([t.numel() for t in tensors]), tensors)]


def _weights(params: tuple[Tensor, ...], acc: torch.dtype) -> dict:
    return dict(zip(PARAM_NAMES, _cast_all(list(params), acc)))


#: the parameters of the C-sized chain, in the order the glue ops take them
CHAIN_NAMES = ('ch_wv', 'ch_bv', 'ch_wz', 'ch_bz', 'ln_weight', 'ln_bias', 'sp_wq', 'sp_bq',
               'sp_wv', 'sp_bv')


# ------------------------------------------------------------------ the four passes over x
# Each pass has a pure-PyTorch form here and a CUDA kernel (``mmattn/ops/csrc/psa_cuda.cu``,
# ops ``mmattn::psa_*`` of :mod:`mmattn.ops.extension`) with the same contract, as has the
# C-sized glue between them; :func:`_forward_impl` / :func:`_backward_impl` are shared. The
# reductions over the pixels return one partial per split (the kernels split the pixels over
# several thread blocks per image; the PyTorch forms use a single split).
def _fwd_reduce_torch(x: Tensor, wq: Tensor, splits: int) -> tuple[Tensor, ...]:
    """logits l (N, P); per split the max M, the sum Z of exp(l - M), ``sum_p exp(l_p - M) x_p``
    and ``sum_p x_p``: (N, S), (N, S), (N, S, C), (N, S, C), accumulation dtype."""
    n, c = x.shape[:2]
    xf = _ncp(x)
    logits = _sum_c(xf, wq.expand(n, c)).to(wq.dtype)
    pmax = logits.amax(-1, keepdim=True)
    e = torch.exp(logits - pmax)
    return (logits, pmax, e.sum(-1, keepdim=True), _sum_p(xf, e).to(wq.dtype).unsqueeze(1),
            xf.sum(-1, dtype=wq.dtype).unsqueeze(1))


def _fwd_apply_torch(x: Tensor, a: Tensor, u: Tensor, bias: Tensor,
                     sequential: bool) -> tuple[Tensor, Tensor]:
    """S_p = sigmoid(u . x_p + bias), y = x (A (+) S) or x A S; returns (y, S)."""
    s_mask = torch.sigmoid(_sum_c(_ncp(x), u).to(u.dtype) + bias.unsqueeze(-1))
    y = _outer_into(torch.empty_like(x), a, s_mask, sequential)
    return y.mul_(x), s_mask


def _bwd_reduce_torch(grad: Tensor, x: Tensor, a: Tensor, s_mask: Tensor, splits: int,
                      sequential: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """With g = G (.) x: d_t (N, P) = (sum_c g (a or 1)) S (1 - S), per split
    ``sum_p g (S or 1)`` and ``sum_p x d_t`` (N, S, C), and per split ``sum_p d_t`` (N, S)."""
    gx = _ncp(grad * x)
    if sequential:
        d_a, d_s = _sum_p(gx, s_mask), _sum_c(gx, a)
    else:
        d_a, d_s = gx.sum(-1, dtype=a.dtype), gx.sum(1, dtype=a.dtype)
    del gx
    d_t = d_s.to(a.dtype) * s_mask * (1 - s_mask)
    return (d_t, d_a.to(a.dtype).unsqueeze(1), _sum_p(_ncp(x), d_t).to(a.dtype).unsqueeze(1),
            d_t.sum(-1, keepdim=True))


def _bwd_apply_torch(grad: Tensor, x: Tensor, a: Tensor, s_mask: Tensor, logits: Tensor,
                     lnorm: Tensor, d_t: Tensor, u: Tensor, dm: Tensor, dsv: Tensor, wq: Tensor,
                     beta: Tensor, splits: int, sequential: bool) -> tuple[Tensor, Tensor]:
    """pi = softmax_p(l) from the logits and their softmax's state lnorm (2, N) = [max, sum of
    exponentials]; d_l = pi (dsv . x_p - beta); dx = G (.) (A (+) S or A S) + u d_t + dm +
    dsv pi + wq d_l; returns (dx, per split ``sum_p x d_l`` (N, S, C))."""
    pi = torch.exp(logits - lnorm[0].unsqueeze(-1)) / lnorm[1].unsqueeze(-1)
    xf = _ncp(x)
    d_l = pi * (_sum_c(xf, dsv).to(pi.dtype) - beta.unsqueeze(-1))
    g_wq = _sum_p(xf, d_l).to(pi.dtype).unsqueeze(1)
    dx = _outer_into(torch.empty_like(x), a, s_mask, sequential).mul_(grad)
    left = torch.stack([u, dm, dsv, wq.expand_as(dsv)], -1)                      # N, C, 4
    right = torch.stack([d_t, torch.ones_like(d_t), pi, d_l], 1)                  # N, 4, P
    _add_low_rank_(dx, left.to(x.dtype), right.to(x.dtype))
    return dx, g_wq


# The C-sized work between the passes ("glue"): merging the splits and the chain of Eq. 1-5 on
# C-vectors, forward and backward. One CUDA kernel each (a team of blocks per image) replaces
# the 30-90 small PyTorch operations written here, whose launches would otherwise cost more
# than the passes over x at large shapes. Weights: CHAIN_NAMES, accumulation dtype.
def _fwd_glue_torch(pmax: Tensor, psum: Tensor, ps: Tensor, pm: Tensor, pixels: int,
                    weights: list[Tensor], eps: float,
                    sequential: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the splits' online-softmax states and sums (over ``pixels`` pixels), run the chain.
    Returns lnorm (2, N), the merged state of pi = softmax_p(l) (the maxima, the sums of
    exponentials: pi itself is formed by the backward apply pass), stats (N, 4, C) =
    [s, m, A, u_eff] and the spatial logit's bias c (N)."""
    w = dict(zip(CHAIN_NAMES, weights))
    top = pmax.amax(-1, keepdim=True)                                    # N, 1
    scale = torch.exp(pmax - top)                                        # N, S
    total = (psum * scale).sum(-1, keepdim=True)                         # N, 1
    s = torch.bmm(scale.unsqueeze(1), ps).squeeze(1) / total             # N, C
    m = pm.sum(1) / pixels
    sm = _small_chain(s, m, w, eps, sequential)
    return (torch.stack([top.squeeze(1), total.squeeze(1)]),
            torch.stack([s, m, sm['a'], sm['ueff']], 1), sm['c'])


def _bwd_glue_torch(part_dt: Tensor, part_da: Tensor, part_dueff: Tensor, stats: Tensor,
                    pixels: int, weights: list[Tensor], eps: float,
                    sequential: bool) -> tuple[Tensor, ...]:
    """The chain's backward for each image (the derivation follows the forward line by line,
    in reverse), from the splits' partial sums of d_t (N, S), dA and d u_eff (N, S, C) over
    ``pixels`` pixels. Returns what the last pass needs, dm = dL/dm / P and dsv = dL/ds (N, C) and
    beta = dsv . s (N), and the parameter gradients' factors: the four weight gradients are
    ``L[k]^T R[k]`` summed over the images (L (4, N, C/2), R (4, N, C): sp_wv, sp_wq, ch_wz
    transposed, ch_wv), the six vector gradients the image sums of ``vecs`` (N, 3 C/2 + 3 C:
    sp_bv, sp_bq, ch_bv, ln_weight, ln_bias, ch_bz)."""
    w = dict(zip(CHAIN_NAMES, weights))
    s, m = stats[:, 0], stats[:, 1]
    sm = _small_chain(s, m, w, eps, sequential)
    a, q, u = sm['a'], sm['q'], sm['u']
    d_a, d_ueff = part_da.sum(1), part_dueff.sum(1)                     # N, C
    d_c = part_dt.sum(-1)                                               # N
    if sequential:
        d_u = d_ueff * a
        d_a = d_a + d_ueff * u
    else:
        d_u = d_ueff
    # u = W_v'^T q, c = q . b_v', q = softmax(W_q' mz + b_q')
    d_q = d_u @ w['sp_wv'].t() + d_c.unsqueeze(-1) * w['sp_bv']
    d_g = q * (d_q - (q * d_q).sum(-1, keepdim=True))
    d_mz = d_g @ w['sp_wq']                                             # N, C
    if sequential:
        d_a = d_a + d_mz * m
        d_m = d_mz * a
    else:
        d_m = d_mz
    # A = sigmoid(LN(z)), z = W_z v + b_z, v = W_v s + b_v
    d_ln = d_a * a * (1 - a)
    zhat = sm['zhat']
    d_zhat = d_ln * w['ln_weight']
    d_z = sm['rstd'] * (d_zhat - d_zhat.mean(-1, keepdim=True)
                        - zhat * (d_zhat * zhat).mean(-1, keepdim=True))
    d_v = d_z @ w['ch_wz']
    d_sv = d_v @ w['ch_wv']                                             # N, C (d s)
    beta = (d_sv * s).sum(-1)
    left = torch.stack([q, d_g, sm['v'], d_v])
    right = torch.stack([d_u, sm['mz'], d_z, s])
    vecs = torch.cat([q * d_c.unsqueeze(-1), d_g, d_v, d_ln * zhat, d_ln, d_z], -1)
    return d_m / pixels, d_sv, beta, left, right, vecs


_TORCH_PASSES = (_fwd_reduce_torch, _fwd_glue_torch, _fwd_apply_torch, _bwd_reduce_torch,
                 _bwd_glue_torch, _bwd_apply_torch)


def _passes(kernel: bool) -> tuple:
    """(fwd_reduce, fwd_glue, fwd_apply, bwd_reduce, bwd_glue, bwd_apply): the PyTorch forms or
    the compiled kernels (:data:`mmattn.ops.dispatch.PSA_KERNEL_OPS`, in this order)."""
    if not kernel:
        return _TORCH_PASSES
    return tuple(getattr(torch.ops.mmattn, name) for name in PSA_KERNEL_OPS)


def _dense(x: Tensor) -> Tensor:
    """x contiguous in its own memory format (NCHW or channels_last), as the kernels need."""
    return x.contiguous(memory_format=torch.channels_last) \
        if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _forward_impl(x: Tensor, params: tuple[Tensor, ...], eps: float, sequential: bool,
                  kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, logits, lnorm, S, stats): the channel logits l (N, P) and the state of
    their softmax over the pixels (2, N) = [max, sum of exponentials], stats (N, 4, C) =
    [s (softmax-weighted mean), m, A, u_eff]."""
    fwd_reduce, fwd_glue, fwd_apply, _, _, _ = _passes(kernel)
    w = _weights(params, _acc_dtype(x))
    x = _dense(x)
    logits, pmax, psum, ps, pm = fwd_reduce(x, w['ch_wq'].reshape(-1), 0)
    lnorm, stats, c = fwd_glue(pmax, psum, ps, pm, logits.shape[1],
                               [w[k] for k in CHAIN_NAMES], eps, sequential)
    y, s_mask = fwd_apply(x, stats[:, 2], stats[:, 3], c, sequential)
    return y, logits, lnorm, s_mask, stats


def _backward_impl(grad: Tensor, x: Tensor, logits: Tensor, lnorm: Tensor, s_mask: Tensor,
                   stats: Tensor, params: tuple[Tensor, ...], eps: float, sequential: bool,
                   kernel: bool) -> tuple[Tensor, ...]:
    """Gradients w.r.t. x and the 12 parameters, the latter flattened into one vector (in
    PARAM_NAMES order; the backward op may not return views of one buffer). ``ch_bq``'s
    gradient is ``sum_p dl_p = ds . s - ds . s = 0`` exactly (the softmax removes the bias);
    it is returned as 0."""
    _, _, _, bwd_reduce, bwd_glue, bwd_apply = _passes(kernel)
    acc = _acc_dtype(x)
    w = _weights(params, acc)
    a, ueff = stats[:, 2], stats[:, 3]
    x = _dense(x)
    grad = grad.contiguous(memory_format=torch.channels_last) \
        if not x.is_contiguous() else grad.contiguous()
    # y[c,p] = x (A_c + S_p)  or  x A_c S_p;  S_p = sigmoid(ueff . x_p + c)
    d_t, part_da, part_dueff, part_dt = bwd_reduce(grad, x, a, s_mask, 0, sequential)
    dm, d_sv, beta, left, right, vecs = bwd_glue(part_dt, part_da, part_dueff, stats,
                                                 logits.shape[1], [w[k] for k in CHAIN_NAMES],
                                                 eps, sequential)
    # s = sum_p pi_p x_p, pi = softmax(l), l_p = ch_wq . x_p (+ ch_bq):
    # dl_p = pi_p (ds . x_p - ds . s);  dx = G (.) (A (+) S or A S) + rank-4 terms
    dx, part_gwq = bwd_apply(grad, x, a, s_mask, logits, lnorm, d_t, ueff, dm, d_sv,
                             w['ch_wq'].reshape(-1), beta, 0, sequential)
    mats = torch.bmm(left.transpose(1, 2), right)                       # 4, C/2, C
    half = left.shape[-1]
    g_sp_bv, g_sp_bq, g_ch_bv, g_ln_w, g_ln_b, g_ch_bz = vecs.sum(0).split(
        [half] * 3 + [right.shape[-1]] * 3)
    grads = {'ch_wq': part_gwq.sum((0, 1)), 'ch_bq': torch.zeros(1, dtype=acc, device=x.device),
             'ch_wv': mats[3], 'ch_bv': g_ch_bv, 'ch_wz': mats[2].t(), 'ch_bz': g_ch_bz,
             'ln_weight': g_ln_w, 'ln_bias': g_ln_b, 'sp_wq': mats[1], 'sp_bq': g_sp_bq,
             'sp_wv': mats[0], 'sp_bv': g_sp_bv}
    flat = torch.cat([grads[k].reshape(-1) for k in PARAM_NAMES])
    return dx, flat.to(_grads_dtype(params, acc))


def _grads_dtype(params: tuple[Tensor, ...] | list[Tensor], acc: torch.dtype) -> torch.dtype:
    """The dtype the parameter gradients leave the backward op in: the parameters' own when
    they share one, else the accumulation dtype (each is cast on its way out)."""
    dtypes = {prm.dtype for prm in params}
    return dtypes.pop() if len(dtypes) == 1 else acc


# ----------------------------------------------------------------------- torch.library ops
@torch.library.custom_op('mmattn::psa_paper_folded', mutates_args=())
def _psa_folded_op(x: Tensor, ch_wq: Tensor, ch_bq: Tensor, ch_wv: Tensor, ch_bv: Tensor,
                   ch_wz: Tensor, ch_bz: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                   sp_wq: Tensor, sp_bq: Tensor, sp_wv: Tensor, sp_bv: Tensor, eps: float,
                   sequential: bool,
                   kernel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = (ch_wq, ch_bq, ch_wv, ch_bv, ch_wz, ch_bz, ln_weight, ln_bias,
              sp_wq, sp_bq, sp_wv, sp_bv)
    return _forward_impl(x, params, eps, sequential, kernel)


@_psa_folded_op.register_fake
def _(x, ch_wq, ch_bq, ch_wv, ch_bv, ch_wz, ch_bz, ln_weight, ln_bias, sp_wq, sp_bq, sp_wv,
      sp_bv, eps, sequential, kernel):
    n, c, h, w = x.shape
    acc = _acc_dtype(x)
    return (torch.empty_like(x), x.new_empty((n, h * w), dtype=acc),
            x.new_empty((2, n), dtype=acc), x.new_empty((n, h * w), dtype=acc),
            x.new_empty((n, 4, c), dtype=acc))


@torch.library.custom_op('mmattn::psa_paper_folded_backward', mutates_args=())
def _psa_folded_backward_op(grad: Tensor, x: Tensor, logits: Tensor, lnorm: Tensor,
                            s_mask: Tensor, stats: Tensor, params: list[Tensor], eps: float,
                            sequential: bool, kernel: bool) -> list[Tensor]:
    """[dx, the 12 parameter gradients flattened into one vector]."""
    return list(_backward_impl(grad, x, logits, lnorm, s_mask, stats, tuple(params), eps,
                               sequential, kernel))


@_psa_folded_backward_op.register_fake
def _(grad, x, logits, lnorm, s_mask, stats, params, eps, sequential, kernel):
    return [torch.empty_like(x), x.new_empty(sum(prm.numel() for prm in params),
                                             dtype=_grads_dtype(params, _acc_dtype(x)))]


def _setup_context(ctx, inputs, output) -> None:
    x, *params = inputs[:13]
    ctx.eps, ctx.sequential, ctx.kernel = inputs[13], inputs[14], inputs[15]
    _, logits, lnorm, s_mask, stats = output
    ctx.save_for_backward(x, logits, lnorm, s_mask, stats, *params)


def _backward(ctx, grad_y, grad_logits, grad_lnorm, grad_s, grad_stats):
    x, logits, lnorm, s_mask, stats, *params = ctx.saved_tensors
    dx, flat = _psa_folded_backward_op(grad_y, x, logits, lnorm, s_mask, stats, params,
                                       ctx.eps, ctx.sequential, ctx.kernel)
    grads = [part.view(prm.shape).to(prm.dtype) for part, prm in
             zip(flat.split([prm.numel() for prm in params]), params)]
    return (dx, *grads, None, None, None)


_psa_folded_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------- public functions
def psa_paper_folded(x: Tensor, *params: Tensor, eps: float = 1e-5, sequential: bool = False,
                     kernel: bool = False) -> Tensor:
    """The folded op on positional parameters (order ``PARAM_NAMES``); returns ``y`` only.
    ``kernel=True`` runs its passes over x with the compiled CUDA kernels (x on a GPU, the
    extension loaded: :func:`mmattn.ops.dispatch.can_use_psa_cuda`), else in PyTorch."""
    return _psa_folded_op(x, *params, eps, sequential, kernel)[0]


def psa_paper_reference(x: Tensor, *params: Tensor, eps: float = 1e-5,
                        sequential: bool = False) -> Tensor:
    """The paper's Eq. 1-5 the eager way (1x1 convolutions on the full maps), from the same
    matrices as the folded op; what :class:`mmattn.layers.PolarizedSelfAttention` computes
    with ``backend='reference'``."""
    w = dict(zip(PARAM_NAMES, params))

    def conv(t: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, weight.reshape(*weight.shape, 1, 1), bias)

    def channel(t: Tensor) -> Tensor:
        v = conv(t, w['ch_wv'], w['ch_bv']).flatten(2)                       # N, C/2, P
        att = conv(t, w['ch_wq'].unsqueeze(0), w['ch_bq']).flatten(2).softmax(-1)
        z = torch.nn.functional.linear(torch.bmm(v, att.transpose(1, 2)).squeeze(-1),
                                       w['ch_wz'], w['ch_bz'])
        z = torch.nn.functional.layer_norm(z, z.shape[-1:], w['ln_weight'], w['ln_bias'], eps)
        return torch.sigmoid(z)[:, :, None, None]

    def spatial(t: Tensor) -> Tensor:
        q = conv(t, w['sp_wq'], w['sp_bq']).mean((2, 3)).softmax(-1)
        v = conv(t, w['sp_wv'], w['sp_bv'])
        return torch.sigmoid(torch.einsum('nc,nchw->nhw', q, v)).unsqueeze(1)

    z_ch = channel(x) * x
    if sequential:
        return spatial(z_ch) * z_ch
    return z_ch + spatial(x) * x


def check_psa_arguments(x: Tensor, params: tuple[Tensor, ...]) -> None:
    """``x`` a floating-point (N, C, H, W) tensor with C even and H, W >= 1, and each of the
    paper-form parameters (order ``PARAM_NAMES``) a tensor of the shape
    :func:`polarized_self_attention` documents; else ValueError / TypeError naming it, the
    shape expected and the shape got."""
    op = 'polarized_self_attention'
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f'dtype {x.dtype}' if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f'{op}: x must be a floating-point torch.Tensor, got {got}')
    if x.dim() != 4 or x.shape[1] % 2 or x.shape[1] < 2 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f'{op}: x must be 4-D (N, C, H, W) with C even and H, W >= 1, got '
                         f'shape {tuple(x.shape)}')
    c, half = x.shape[1], x.shape[1] // 2
    shapes = {'ch_wq': (c,), 'ch_bq': (1,), 'ch_wv': (half, c), 'ch_bv': (half,),
              'ch_wz': (c, half), 'ch_bz': (c,), 'ln_weight': (c,), 'ln_bias': (c,),
              'sp_wq': (half, c), 'sp_bq': (half,), 'sp_wv': (half, c), 'sp_bv': (half,)}
    for name, value in zip(PARAM_NAMES, params):
        if not isinstance(value, Tensor):
            raise TypeError(f'{op}: {name} must be a torch.Tensor, got {type(value).__name__}')
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f'{op}: {name} must have shape {shapes[name]} for x of shape '
                             f'{tuple(x.shape)} (C={c}), got {tuple(value.shape)}')


def polarized_self_attention(x: Tensor, *, ch_wq: Tensor, ch_bq: Tensor, ch_wv: Tensor,
                             ch_bv: Tensor, ch_wz: Tensor, ch_bz: Tensor, ln_weight: Tensor,
                             ln_bias: Tensor, sp_wq: Tensor, sp_bq: Tensor, sp_wv: Tensor,
                             sp_bv: Tensor, mode: str = 'parallel', eps: float = 1e-5,
                             backend: str = 'auto') -> Tensor:
    """Polarized Self-Attention, paper form (Eq. 5 of arXiv 2107.00782)::

        parallel:   y = A^ch(x) (.)ch x + A^sp(x) (.)sp x
        sequential: y = A^sp(z) (.)sp z,   z = A^ch(x) (.)ch x

    with ``A^ch``, ``A^sp`` of Eq. 1 and 3 (see the module docstring for the folded form).

    Args:
        x: (N, C, H, W), any float dtype, contiguous or channels_last.
        ch_wq, ch_bq: (C,), (1,): the channel-branch query (``ch_wq`` conv, 1 output channel).
        ch_wv, ch_bv: (C/2, C), (C/2,).  ch_wz, ch_bz: (C, C/2), (C,).
        ln_weight, ln_bias: (C,): the LayerNorm over C.  sp_wq, sp_bq, sp_wv, sp_bv: (C/2, C),
            (C/2,) each: the spatial branch.
        mode: ``'parallel'`` or ``'sequential'``.
        eps: LayerNorm epsilon.
        backend: ``'auto'`` (see :mod:`mmattn.ops.dispatch`), ``'reference'``, ``'folded'``
            or ``'cuda'`` (the compiled kernels; raises, saying how to build them, when they
            cannot run this call).
    """
    if mode not in _MODES:
        raise ValueError(f'polarized_self_attention: mode must be one of {_MODES}, '
                         f'got {mode!r}')
    params = (ch_wq, ch_bq, ch_wv, ch_bv, ch_wz, ch_bz, ln_weight, ln_bias,
              sp_wq, sp_bq, sp_wv, sp_bv)
    check_psa_arguments(x, params)
    chosen, _ = select_backend('psa_paper', x, backend)
    if chosen == 'reference':
        return psa_paper_reference(x, *params, eps=eps, sequential=mode == 'sequential')
    return psa_paper_folded(x, *params, eps=eps, sequential=mode == 'sequential',
                            kernel=chosen == 'cuda')


def psa_paper_params(module: torch.nn.Module) -> tuple[Tensor, ...]:
    """The op's parameters (order ``PARAM_NAMES``) as views of a ``variant='paper'``
    PolarizedSelfAttention's convolutions."""
    return (module.ch_wq.weight.view(-1), module.ch_wq.bias,
            module.ch_wv.weight.flatten(1), module.ch_wv.bias,
            module.ch_wz.weight.flatten(1), module.ch_wz.bias,
            module.ln.weight, module.ln.bias,
            module.sp_wq.weight.flatten(1), module.sp_wq.bias,
            module.sp_wv.weight.flatten(1), module.sp_wv.bias)

