"""Backend selection for mmattn's functional ops.

Every op has a pure-PyTorch *reference* (the paper's equations, written the eager way) and may
have faster paths:

* ``'folded'``: an algebraically equivalent pure-PyTorch form with a hand-written backward
  (``mmattn.ops.psa``), registered as a ``torch.library`` custom op; runs on any device;
* ``'cuda'``: a compiled CUDA kernel. **None ships in this version**: the slot exists so that a
  kernel can be added behind the same switch; asking for it raises :class:`KernelUnavailableError`.

Which path runs is decided per call by :func:`select_backend`:

1. an explicit ``backend='reference' | 'folded' | 'cuda'`` argument wins (a path that cannot run
   raises an error saying why, never falls back silently);
2. with ``backend='auto'`` the environment variable ``MMATTN_BACKEND`` is read at call time
   (under ``torch.compile``: when the function is traced, so set it before compiling):
   ``MMATTN_BACKEND=reference`` forces the reference path everywhere (for debugging and for
   A/B comparisons), ``auto`` (or unset) lets the predicates choose;
3. ``auto`` takes the fastest path whose predicate accepts the call. The predicates
   (``can_use_<op>_<backend>(x, ...) -> (bool, reason)``) say why a path was declined: while
   ``torch.jit.trace`` or ``torch.onnx.export`` records a graph the reference runs (it uses
   standard operators only, so the graph stays portable); a module with hooks on the tensors
   a fused path never materialises keeps the reference.

:func:`kernel_status` reports the compiled kernels in one line (``python -m
mmattn.utils.collect_env`` prints it).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

__all__ = ['BACKENDS', 'ENV_VAR', 'KernelUnavailableError', 'can_use_psa_cuda',
           'can_use_psa_folded', 'cuda_extension', 'env_backend', 'kernel_status',
           'select_backend']

ENV_VAR = 'MMATTN_BACKEND'
ENV_CHOICES = ('auto', 'reference')
BACKENDS = ('auto', 'reference', 'folded', 'cuda')
#: the ops with a fast path, and their backends besides the reference, fastest first
OPS: dict[str, tuple[str, ...]] = {'psa_paper': ('cuda', 'folded')}
#: where a compiled extension would live; ``import mmattn`` never needs it
_EXTENSION = 'mmattn._C'
BUILD_HINT = ('mmattn {version} ships no compiled CUDA kernels (mmattn.ops.kernel_status() '
              "reports what is built); use backend='auto' or backend='folded', which run on "
              'any device. A release with kernels builds them when CUDA is found at install '
              'time (`pip install -v -e .` with nvcc on PATH).')


class KernelUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def cuda_extension() -> Optional[object]:
    """The compiled extension module, or None when it is not built (the case in this
    version). Never raises."""
    try:
        return importlib.import_module(_EXTENSION)
    except ImportError:
        return None


def env_backend() -> str:
    """The value of ``MMATTN_BACKEND`` (``'auto'`` when unset), checked."""
    value = os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto'
    if value not in ENV_CHOICES:
        raise ValueError(f'environment variable {ENV_VAR} must be one of {ENV_CHOICES}, '
                         f'got {value!r}')
    return value


def _recording_graph() -> Optional[str]:
    if torch.jit.is_tracing():
        return 'torch.jit.trace is recording'
    if torch.onnx.is_in_onnx_export():
        return 'torch.onnx.export is recording'
    return None


def can_use_psa_folded(x: torch.Tensor, *, hooks: bool = False) -> tuple[bool, str]:
    """Whether the folded PSA op (``mmattn::psa_paper_folded``) can serve ``x``.

    Declines (with the reason) for non-floating inputs, while a graph is recorded by
    ``torch.jit.trace``/``torch.onnx.export`` (the reference uses standard operators only),
    and when ``hooks`` is set (the caller has hooks on the gate modules, whose inputs the folded
    path never materialises).
    """
    if not x.is_floating_point():
        return False, f'input dtype {x.dtype} is not floating point'
    recording = _recording_graph()
    if recording:
        return False, f'{recording} (the reference graph uses standard operators only)'
    if hooks:
        return False, ('hooks are registered on channel_gate/spatial_gate, which the folded '
                       'path does not call')
    return True, 'ok'


def can_use_psa_cuda(x: torch.Tensor) -> tuple[bool, str]:
    """Whether a compiled CUDA PSA kernel can serve ``x``: never in this version."""
    if cuda_extension() is None:
        return False, 'no compiled CUDA kernel in this version'
    return False, 'the compiled extension has no PSA kernel'  # pragma: no cover


_PREDICATES = {('psa_paper', 'folded'): can_use_psa_folded,
               ('psa_paper', 'cuda'): can_use_psa_cuda}


def select_backend(op: str, x: torch.Tensor, backend: str = 'auto',
                   **predicate_kwargs) -> tuple[str, str]:
    """Choose the path for one call of ``op`` on ``x``; returns ``(backend, reason)``.

    ``backend='auto'`` honours ``MMATTN_BACKEND`` and then the predicates, in the order
    cuda, folded, reference; an explicit backend that cannot run raises
    :class:`KernelUnavailableError` naming the reason (for ``'cuda'``: how to get a kernel).
    ``predicate_kwargs`` go to the folded predicate (e.g. ``hooks=True``).
    """
    if op not in OPS:
        raise ValueError(f'select_backend: op must be one of {tuple(OPS)}, got {op!r}')
    if backend not in BACKENDS:
        raise ValueError(f'{op}: backend must be one of {BACKENDS}, got {backend!r}')
    if backend == 'reference':
        return 'reference', 'requested'
    if backend == 'auto':
        if env_backend() == 'reference':
            return 'reference', f'{ENV_VAR}=reference'
        reasons = []
        for name in OPS[op]:
            kwargs = predicate_kwargs if name == 'folded' else {}
            ok, reason = _PREDICATES[(op, name)](x, **kwargs)
            if ok:
                return name, 'auto'
            reasons.append(f'{name}: {reason}')
        return 'reference', '; '.join(reasons)
    kwargs = predicate_kwargs if backend == 'folded' else {}
    ok, reason = _PREDICATES[(op, backend)](x, **kwargs)
    if not ok:
        if backend == 'cuda':
            from mmattn.version import __version__
            raise KernelUnavailableError(f"{op}: backend='cuda' requested but {reason}. "
                                         + BUILD_HINT.format(version=__version__))
        raise KernelUnavailableError(f'{op}: backend={backend!r} requested but it declined: '
                                     f'{reason}')
    return backend, 'requested'


def kernel_status() -> str:
    """One line on mmattn's kernels: compiled extension, fused pure-PyTorch paths, env."""
    ext = cuda_extension()
    cuda = 'CUDA kernels: not built (none in this version)' if ext is None else \
        f'CUDA kernels: {_EXTENSION} loaded'  # pragma: no cover
    folded = ', '.join(op for op, names in OPS.items() if 'folded' in names)
    return (f'{cuda}; pure-PyTorch folded ops: {folded} (any device); '
            f'{ENV_VAR}={os.environ.get(ENV_VAR, "auto (unset)")}')
