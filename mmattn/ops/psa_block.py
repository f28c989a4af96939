"""A whole Polarized Self-Attention block (arXiv 2107.00782) as one compiled CPU op per
direction: ``mmattn::psa_block_fwd`` / ``mmattn::psa_block_bwd`` (``csrc/psa_cpu.cpp``).

Each of the four forms :class:`mmattn.layers.PolarizedSelfAttention` computes - the paper's Eq. 5
(``variant='paper'``, parallel or sequential) and the authors' release (``variant='official'``:
``PSA_p``, ``PSA_s``) - runs its forward in one call and its backward, parameter gradients
included, in one more: what a small map costs is then its arithmetic, not the 40-120 operator
calls of the PyTorch paths (see ``docs/benchmarks.md``, host overhead). Only x and the weights are
kept for the backward, which recomputes the C-sized quantities (and, for ``PSA_s``, the
(C/2, H, W) softmaxed value map, one image at a time inside the call).

The op computes in float32 (float64 for float64 inputs) whatever the input dtype and returns the
input's dtype and memory format. Its loops are plain C++ over (C, H*W) per image, parallel over
the images (``PSA_s``'s (C/2 x C) products on BLAS); where the arithmetic dominates, on large
maps, the PyTorch paths are as fast, so ``auto`` takes it for maps of up to
:data:`mmattn.ops.dispatch.PSA_CPU_MAX_WORK` elements per image
(:func:`mmattn.ops.dispatch.can_use_psa_cpu`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ['FORMS', 'psa_block', 'psa_block_weights']

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
    """The block's output for ``x`` (N, C, H, W) on the compiled CPU op, differentiable in x
    and the weights (:func:`psa_block_weights` gives the arguments)."""
    return torch.ops.mmattn.psa_block_fwd(x, weights, form, eps)


def _fake_fwd(x, weights, form, eps):
    return torch.empty_like(x)


def _fake_bwd(grad, x, weights, form, eps):
    return torch.empty_like(x), [torch.empty_like(w) for w in weights]


for _name in ('psa_block', 'psa_release'):
    torch.library.register_fake(f'mmattn::{_name}_fwd')(_fake_fwd)
    torch.library.register_fake(f'mmattn::{_name}_bwd')(_fake_bwd)

# The autograd of psa_block_fwd is registered in C++ (psa_cpu.cpp), with the kernels: a call runs
# no Python beyond psa_block itself. First-order gradients only.
