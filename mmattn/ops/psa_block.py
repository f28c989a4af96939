"""A whole Polarized Self-Attention block (arXiv 2107.00782) as one compiled op per direction:
on the CPU ``mmattn::psa_block_fwd`` / ``psa_block_bwd`` (``csrc/psa_cpu.cpp``), on CUDA
``mmattn::psa_block_cuda_fwd`` / ``psa_block_cuda_bwd`` (``csrc/psa_cuda.cu``), each with its
autograd registered in C++ (``csrc/psa_autograd.cpp``).

Each of the four forms :class:`mmattn.layers.PolarizedSelfAttention` computes - the paper's Eq. 5
(``variant='paper'``, parallel or sequential) and the authors' release (``variant='official'``:
``PSA_p``, ``PSA_s``) - runs its forward in one call and its backward, parameter gradients
included, in one more: what a block costs is then its arithmetic, not the 40-120 operator
calls of the PyTorch paths with Python between them (see ``docs/benchmarks.md``, host
overhead).

CPU: only x and the weights are kept for the backward, which recomputes the C-sized quantities
(and, for ``PSA_s``, the (C/2, H, W) softmaxed value map, one image at a time inside the call).
The op computes in float32 (float64 for float64 inputs) whatever the input dtype and returns the
input's dtype and memory format. Its loops are plain C++ over (C, H*W) per image, parallel over
the images (``PSA_s``'s (C/2 x C) products on BLAS); where the arithmetic dominates, on large
maps, the PyTorch paths are as fast, so ``auto`` takes it for maps of up to
:data:`mmattn.ops.dispatch.PSA_CPU_MAX_WORK` elements per image
(:func:`mmattn.ops.dispatch.can_use_psa_cpu`).

CUDA: every form runs on the pass kernels (3 launches forward; 3 backward, for the paper forms
and PSA_p the weight matrices' gradients included, on blocks of their own in the apply pass's
launch: 6 per training step; PSA_s, where tensor cores take its value products, 3 forward and 4
backward: 7, its value map computed in the kernels' own tiles and M = dVl x^T in the backward's
cooperative launch, else 4 and 4 with its value products as batched GEMMs: 12, N more where M
is cut over the pixels;
``csrc/psa_block_cuda.cuh``, ``csrc/psa_value_tiles.cuh``); the forward also returns the few
(N, P), (N, C) and (N, C/2) tensors its backward takes (:func:`state_shapes`), kept with x:
never anything of x's size (``PSA_s``'s (N, C/2, H, W) value map is never stored, or on the GEMM
path a transient GEMM output that the backward recomputes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ['FORMS', 'psa_block', 'psa_block_weights', 'state_shapes']

#: (variant, mode) -> the op's ``form`` argument
FORMS = {('paper', 'parallel'): 0, ('paper', 'sequential'): 1,
         ('official', 'parallel'): 2, ('official', 'sequential'): 3}


def _params(module: nn.Module, *names: tuple[str, ...]) -> list[Tensor]:
    """The tensors ``module.<sub>.<name>`` for split ``('sub', 'name')`` paths, read from the
    modules' ``_modules``/``_parameters`` dicts: what ``torch.func.functional_call`` swaps, at a
    fraction of the cost of ``nn.Module.__getattr__`` (this runs on every call of the block)."""
    out = []
    for *subs, leaf in names:
        owner = module
        for sub in subs:
            owner = owner._modules[sub]
        out.append(owner._parameters[leaf])
    return out


_PAPER = ('ch_wq.weight', 'ch_wq.bias', 'ch_wv.weight', 'ch_wv.bias', 'ch_wz.weight',
          'ch_wz.bias', 'ln.weight', 'ln.bias', 'sp_wq.weight', 'sp_wq.bias', 'sp_wv.weight',
          'sp_wv.bias')
_RELEASE_P = ('conv_q_right.weight', 'conv_v_right.weight', 'conv_up.weight',
              'conv_q_left.weight', 'conv_v_left.weight')
_RELEASE_S = ('conv_q_right.weight', 'conv_v_right.weight', 'conv_up.0.weight', 'conv_up.0.bias',
              'conv_up.1.weight', 'conv_up.1.bias', 'conv_up.3.weight', 'conv_up.3.bias',
              'conv_q_left.weight', 'conv_v_left.weight')
_PAPER, _RELEASE_P, _RELEASE_S = (tuple(tuple(n.split('.')) for n in names)
                                  for names in (_PAPER, _RELEASE_P, _RELEASE_S))


def psa_block_weights(module: nn.Module) -> tuple[list[Tensor], int, float]:
    """The op's weights (``module``'s parameters themselves, in the op's order: the op reads
    each as the matrix or vector of its element count, and returns each gradient in the
    parameter's shape), its ``form`` and the LayerNorm epsilon, for a
    :class:`mmattn.layers.PolarizedSelfAttention`."""
    form = FORMS[(module.variant, module.mode)]
    if form < 2:
        return _params(module, *_PAPER), form, module._modules['ln'].eps
    if form == 2:                                   # PSA_p: bias-free conv_up
        return _params(module, *_RELEASE_P), form, 0.0
    eps = module._modules['conv_up']._modules['1'].eps   # PSA_s: the bottleneck's LayerNorm
    return _params(module, *_RELEASE_S), form, eps


def psa_block(x: Tensor, weights: list[Tensor], form: int, eps: float) -> Tensor:
    """The block's output for ``x`` (N, C, H, W) on the compiled op of x's device
    (``psa_block_fwd`` on the CPU, ``psa_block_cuda_fwd`` on CUDA), differentiable in x and the
    weights (:func:`psa_block_weights` gives the arguments)."""
    if x.device.type == 'cuda':
        return torch.ops.mmattn.psa_block_cuda_fwd(x, weights, form, eps)[0]
    return torch.ops.mmattn.psa_block_fwd(x, weights, form, eps)


def state_shapes(form: int, n: int, c: int, h: int, w: int,
                 bottleneck: int = 0) -> list[tuple[int, ...]]:
    """The shapes of what ``psa_block_cuda_fwd`` returns besides y, for x (n, c, h, w) and
    (``PSA_s``) its ``bottleneck`` channels (``csrc/psa_block_cuda.cuh``; all in float32,
    float64 for float64 x)."""
    p, half = h * w, c // 2
    # every form: first the channel logits l, last the state of their softmax over the pixels
    # (max, sum of exponentials), from which the backward forms pi = softmax_p(l)
    if form < 2:   # l, S, stats [s, m, A, u_eff], c, A, u_eff, l's state
        return [(n, p), (n, p), (n, 4, c), (n,), (n, c), (n, c), (2, n)]
    if form == 2:  # l, t, the spatial softmax's state, stats [s, m, A, u], small [v, q], l's
        return [(n, p), (n, p), (2, n), (4, n, c), (2, n, half), (2, n)]
    # l, S, stats [s, m, A, A m], small [v, q], the bottleneck's [zhat, h2, relu(h2)], its
    # LayerNorm's 1/std, the value softmax's state, l's
    return [(n, p), (n, p), (4, n, c), (2, n, half), (3, n, bottleneck), (n,), (2, n, half),
            (2, n)]


def _fake_fwd(x, weights, form, eps):
    return torch.empty_like(x)


def _fake_bwd(grad, x, weights, form, eps):
    return torch.empty_like(x), [torch.empty_like(w) for w in weights]


def _fake_cuda_fwd(x, weights, form, eps):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    bottleneck = weights[3].numel() if form == 3 else 0
    state = [x.new_empty(shape, dtype=acc)
             for shape in state_shapes(form, *x.shape, bottleneck=bottleneck)]
    return torch.empty_like(x), state


def _fake_cuda_bwd(grad, x, state, weights, form, eps):
    return _fake_bwd(grad, x, weights, form, eps)


torch.library.register_fake('mmattn::psa_block_fwd')(_fake_fwd)
torch.library.register_fake('mmattn::psa_block_bwd')(_fake_bwd)
torch.library.register_fake('mmattn::psa_block_cuda_fwd')(_fake_cuda_fwd)
torch.library.register_fake('mmattn::psa_block_cuda_bwd')(_fake_cuda_bwd)

# The autograd of psa_block_fwd and psa_block_cuda_fwd is registered in C++ (psa_autograd.cpp),
# with the kernels: a call runs no Python beyond psa_block itself. First-order gradients only.
