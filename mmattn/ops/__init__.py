"""Functional ops behind the attention blocks, with backend dispatch.

``import mmattn`` never needs a compiled kernel: each op has a pure-PyTorch reference and,
where the maths allows it, a faster pure-PyTorch form; compiled CUDA kernels plug in behind
the same :func:`select_backend` switch (none ships in this version, see :func:`kernel_status`).
"""
from .dispatch import (BACKENDS, ENV_VAR, KernelUnavailableError, can_use_psa_cuda,
                       can_use_psa_folded, kernel_status, select_backend)
from .psa import (polarized_self_attention, psa_paper_folded, psa_paper_params,
                  psa_paper_reference)

__all__ = ['BACKENDS', 'ENV_VAR', 'KernelUnavailableError', 'can_use_psa_cuda',
           'can_use_psa_folded', 'kernel_status', 'polarized_self_attention',
           'psa_paper_folded', 'psa_paper_params', 'psa_paper_reference', 'select_backend']
