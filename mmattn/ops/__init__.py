"""Functional ops behind the attention blocks, with backend dispatch.

``import mmattn`` never needs a compiled kernel: each op has a pure-PyTorch reference and,
where the maths allows it, a faster pure-PyTorch form; the compiled kernels (CUDA, and C++ for
CPU; :mod:`mmattn.ops.extension`) plug in behind the same :func:`select_backend` switch, and
:func:`kernel_status` says which are loaded.
"""
from .dispatch import (BACKENDS, ENV_VAR, OPS, KernelUnavailableError, backends_for,
                       can_use_outlook_cpu, can_use_outlook_cuda, can_use_psa_cuda,
                       can_use_psa_folded, kernel_status, select_backend)
from .outlook import outlook_attention, outlook_attention_reference
from .param_grads import column_sum_kernels
from .psa import (polarized_self_attention, psa_paper_folded, psa_paper_params,
                  psa_paper_reference)

__all__ = ['BACKENDS', 'ENV_VAR', 'OPS', 'KernelUnavailableError', 'backends_for',
           'can_use_outlook_cpu', 'can_use_outlook_cuda', 'can_use_psa_cuda',
           'can_use_psa_folded', 'column_sum_kernels', 'kernel_status', 'outlook_attention',
           'outlook_attention_reference', 'polarized_self_attention', 'psa_paper_folded',
           'psa_paper_params', 'psa_paper_reference', 'select_backend']
