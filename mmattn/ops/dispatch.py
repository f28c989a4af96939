"""Backend selection for mmattn's functional ops.

Every op has a pure-PyTorch *reference* (the paper's equations, written the eager way) and may
have faster paths:

* ``'folded'`` (PSA): an algebraically equivalent pure-PyTorch form with a hand-written backward
  (``mmattn.ops.psa``), registered as a ``torch.library`` custom op; runs on any device;
* ``'cuda'``: compiled CUDA code (``mmattn/ops/csrc``, loaded by :mod:`mmattn.ops.extension`;
  PSA: the folded paper form's four passes over x as kernels, and the whole block as one
  compiled op per direction, :mod:`mmattn.ops.psa_block`; outlook attention: the fused
  aggregation);
* ``'cpu'``: compiled C++ kernels for CPU tensors (outlook attention: the fused aggregation;
  PSA: the whole block in one op per direction, :mod:`mmattn.ops.psa_block`).

Which path runs is decided per call by :func:`select_backend`:

1. an explicit ``backend=`` argument wins (a path that cannot run raises
   :class:`KernelUnavailableError` saying why, and for a compiled kernel how to build it; it
   never falls back silently);
2. with ``backend='auto'`` the environment variable ``MMATTN_BACKEND`` is read at call time
   (under ``torch.compile``: when the function is traced, so set it before compiling):
   ``MMATTN_BACKEND=reference`` forces the reference path everywhere (for debugging and for
   A/B comparisons), ``auto`` (or unset) lets the predicates choose;
3. ``auto`` takes the first path, in the op's order of :data:`OPS`, whose predicate accepts the
   call. The predicates (``can_use_<op>_<backend>(x, ...) -> (bool, reason)``) say why a path
   was declined: the device or dtype, a kernel that is not built, while ``torch.jit.trace``,
   ``torch.onnx.export`` or ``torch.fx`` symbolic tracing records a graph (the reference uses
   standard operators only, so the graph stays portable), or a module with hooks on the
   tensors a fused path never materialises. Under ``torch.jit.script`` the blocks compile
   their reference paths and never call :func:`select_backend`.

:func:`kernel_status` reports the compiled kernels in one line (``python -m
mmattn.utils.collect_env`` prints it).
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import extension

__all__ = ['BACKENDS', 'ENV_VAR', 'KernelUnavailableError', 'OPS', 'backends_for',
           'can_use_outlook_cpu',
           'can_use_outlook_cuda', 'can_use_psa_cpu', 'can_use_psa_cuda', 'can_use_psa_folded',
           'env_backend',
           'fx_tracing', 'kernel_status', 'select_backend']

ENV_VAR = 'MMATTN_BACKEND'
ENV_CHOICES = ('auto', 'reference')
#: the ops with a fast path, and their backends besides the reference, in auto's order
OPS: dict[str, tuple[str, ...]] = {'psa_paper': ('cuda', 'cpu', 'folded'),
                                   'psa_official': ('cuda', 'cpu', 'folded'),
                                   'outlook': ('cuda', 'cpu')}
#: every ``backend=`` value some op accepts
BACKENDS = ('auto', 'reference') + tuple(dict.fromkeys(b for names in OPS.values() for b in names))
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def backends_for(op: str) -> tuple[str, ...]:
    """The ``backend=`` values ``op`` accepts: ``'auto'``, ``'reference'`` and its fast paths."""
    return ('auto', 'reference') + OPS[op]


class KernelUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def env_backend() -> str:
    """The value of ``MMATTN_BACKEND`` (``'auto'`` when unset), checked."""
    value = os.environ.get(ENV_VAR, 'auto').strip().lower() or 'auto'
    if value not in ENV_CHOICES:
        raise ValueError(f'environment variable {ENV_VAR} must be one of {ENV_CHOICES}, '
                         f'got {value!r}')
    return value


def fx_tracing() -> bool:
    """Whether ``torch.fx`` symbolic tracing is running (tensors are then ``fx.Proxy``
    objects: no shape, device or dtype to decide on)."""
    from torch.fx import _symbolic_trace
    check = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', None)  # torch >= 2.5
    if check is None:
        return _symbolic_trace._is_fx_tracing_flag
    return check()


def _recording_graph() -> Optional[str]:
    if torch.jit.is_tracing():
        return 'torch.jit.trace is recording'
    if fx_tracing():
        return 'torch.fx symbolic tracing is recording'
    if torch.onnx.is_in_onnx_export():
        return 'torch.onnx.export is recording'
    return None


@torch.compiler.assume_constant_result
def _kernel_loaded(op: str, device_type: str) -> bool:
    return extension.has_kernel(op, device_type)


#: the compiled ops that the PSA kernel path calls, in the order of a training step (all from
#: one source file; mmattn.ops.psa calls them in this order)
PSA_KERNEL_OPS = ('psa_fwd_reduce', 'psa_fwd_glue', 'psa_fwd_apply', 'psa_bwd_reduce',
                  'psa_bwd_glue', 'psa_bwd_apply')


def _kernel_check(x: torch.Tensor, ops: str | tuple[str, ...],
                  device_type: str) -> Optional[str]:
    """Why the compiled ``ops`` cannot serve ``x`` on ``device_type``, or None."""
    ops = (ops,) if isinstance(ops, str) else ops
    recording = _recording_graph()  # first: under torch.fx, x is a Proxy
    if recording:
        return f'{recording} (the reference graph uses standard operators only)'
    if x.device.type != device_type:
        return f'input is on {x.device.type}, the kernel runs on {device_type} tensors'
    if x.dtype not in _KERNEL_DTYPES:
        return f'input dtype {x.dtype} is not one of the kernel dtypes {_KERNEL_DTYPES}'
    if not all(_kernel_loaded(op, device_type) for op in ops):
        return (f'the compiled {device_type.upper()} kernel is not loaded: '
                f'{extension.load_error() or "the extension has no " + device_type + " build"}')
    return None


def can_use_psa_folded(x: torch.Tensor, *, hooks: bool = False,
                       **_: object) -> tuple[bool, str]:
    """Whether the folded PSA op (``mmattn::psa_paper_folded``) can serve ``x``.

    Declines (with the reason) for non-floating inputs, while a graph is recorded by
    ``torch.jit.trace``/``torch.onnx.export``/``torch.fx`` (the reference uses standard
    operators only), and when ``hooks`` is set (the caller has hooks on the gate modules,
    whose inputs the folded path never materialises).
    """
    recording = _recording_graph()  # first: under torch.fx, x is a Proxy
    if recording:
        return False, f'{recording} (the reference graph uses standard operators only)'
    if not x.is_floating_point():
        return False, f'input dtype {x.dtype} is not floating point'
    if hooks:
        return False, ('hooks are registered on channel_gate/spatial_gate, which the fused '
                       'and folded paths do not call')
    return True, 'ok'


def _deterministic_only() -> bool:
    """Whether ``torch.use_deterministic_algorithms(True)`` is on (not warn-only)."""
    return (torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled())


def can_use_psa_cuda(x: torch.Tensor, *, hooks: bool = False, **_: object) -> tuple[bool, str]:
    """Whether the PSA CUDA kernels can serve ``x`` (the folded paper op's passes, and the whole
    block per call, ``psa_block_cuda_fwd``, that the module runs for every form): a CUDA tensor
    of a kernel dtype, the extension built with its CUDA sources, no graph being recorded, no
    hooks on the gates (neither calls them), and deterministic algorithms not demanded (the
    block's backward adds its weight gradients up with atomics, as PyTorch's own
    non-deterministic CUDA ops do). ``auto``'s heuristics add nothing here: the block
    measured faster than the folded paths at model level for every form (an H200,
    docs/benchmarks.md), and PSA_s's value products now run as GEMMs (tensor cores), as the
    reference's 1x1 convolutions do (not yet measured on a GPU)."""
    ok, reason = can_use_psa_folded(x, hooks=hooks)
    if not ok:
        return ok, reason
    reason = _kernel_check(x, PSA_KERNEL_OPS + PSA_BLOCK_CUDA_OPS, 'cuda')
    if reason:
        return False, reason
    if _deterministic_only():
        return False, ('torch.use_deterministic_algorithms(True) is on: the CUDA block adds its '
                       'weight gradients up with atomics, in no fixed order')
    return True, 'ok'


#: the compiled ops of the whole-block PSA path (mmattn.ops.psa_block), per device
PSA_BLOCK_OPS = ('psa_block_fwd', 'psa_block_bwd')
PSA_BLOCK_CUDA_OPS = ('psa_block_cuda_fwd', 'psa_block_cuda_bwd')
#: with ``heuristics``, the fused CPU block is taken up to this many elements per image (C*H*W).
#: Measured (docs/benchmarks.md, 2 cores): faster than the folded paths for every form at every
#: measured size up to [2, 48, 16, 32] / [2, 384, 2, 4] (2-4x there); on large maps, where both
#: are bound by their products, either may win by a few tens of percent.
PSA_CPU_MAX_WORK = 1 << 16


def can_use_psa_cpu(x: torch.Tensor, *, hooks: bool = False, heuristics: bool = False,
                    **_: object) -> tuple[bool, str]:
    """Whether the fused C++ PSA block (one op per direction, autograd in C++) can serve
    ``x``: a CPU tensor of a kernel dtype, the extension loaded, no graph being recorded, no
    hooks on the gates (it calls no submodule). With ``heuristics`` (what ``auto`` asks) it
    also declines maps of more than :data:`PSA_CPU_MAX_WORK` elements per image."""
    ok, reason = can_use_psa_folded(x, hooks=hooks)
    if not ok:
        return ok, reason
    reason = _kernel_check(x, PSA_BLOCK_OPS, 'cpu')
    if reason:
        return False, reason
    if heuristics:
        _, c, h, w = x.shape
        if c * h * w > PSA_CPU_MAX_WORK:
            return False, (f'the map has {c * h * w} elements per image, more than '
                           f'{PSA_CPU_MAX_WORK}: the folded path is as fast there')
    return True, 'ok'


#: the forms whose folded path measured slower than the reference on a GPU (an H100,
#: 2026-11-25, docs/benchmarks.md): forward + backward at [16, 256, 128, 128] bf16 0.89x and
#: 0.77x the reference for the paper's parallel and sequential forms, 0.84-0.91x for PSA_s (fp32,
#: bf16), and an HRNet-OCR training step with 104 PSA_s took 489 ms folded against 376 ms on the
#: reference (its 1x1 convolutions run on TF32 tensor cores through cuDNN, the folded products as
#: fp32 GEMMs); PSA_p's folded path was 1.05-1.11x faster, so it keeps it
FOLDED_SLOWER_ON_CUDA = ('paper', 'PSA_s')


def _folded_too_slow(x: torch.Tensor, form: str, heuristics: bool) -> Optional[str]:
    """Why ``auto`` (``heuristics``) passes over the folded path of ``form`` for ``x``, or
    None: on CUDA tensors, for :data:`FOLDED_SLOWER_ON_CUDA`. ``backend='folded'`` still takes
    it (it keeps far less for the backward than the reference)."""
    if heuristics and x.device.type == 'cuda' and form in FOLDED_SLOWER_ON_CUDA:
        return (f'on CUDA the folded {form} form measured slower than the reference (an H100, '
                f'docs/benchmarks.md); backend=\'folded\' takes it for its smaller memory')
    return None


def _folded_unless_slower(x: torch.Tensor, form: str, hooks: bool,
                          heuristics: bool) -> tuple[bool, str]:
    """can_use_psa_folded, unless ``auto`` knows the reference to be faster for ``form``."""
    ok, reason = can_use_psa_folded(x, hooks=hooks)
    slow = ok and _folded_too_slow(x, form, heuristics)
    return (False, slow) if slow else (ok, reason)


def _paper_folded(x: torch.Tensor, *, hooks: bool = False, heuristics: bool = False,
                  **_: object) -> tuple[bool, str]:
    """The paper form's folded op (it never calls the gates: their hooks stop it)."""
    return _folded_unless_slower(x, 'paper', hooks, heuristics)


def _official_folded(x: torch.Tensor, *, heuristics: bool = False, form: str = '',
                     **_: object) -> tuple[bool, str]:
    """The release's folded path of ``form`` (``'PSA_p'``/``'PSA_s'``; it calls the gate
    modules: their hooks do not stop it)."""
    return _folded_unless_slower(x, form, False, heuristics)


def can_use_outlook_cuda(v: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused CUDA outlook kernels (the aggregation, and the block's pooling,
    softmax and unpool-add) can serve values ``v``."""
    reason = _kernel_check(v, ('outlook_fwd', 'outlook_pool', 'outlook_softmax',
                               'outlook_unpool_add'), 'cuda')
    return (False, reason) if reason else (True, 'ok')


def can_use_outlook_cpu(v: torch.Tensor) -> tuple[bool, str]:
    """Whether the fused C++ outlook kernel can serve values ``v`` (a CPU tensor)."""
    reason = _kernel_check(v, ('outlook_fwd', 'outlook_softmax', 'outlook_unpool_add'), 'cpu')
    return (False, reason) if reason else (True, 'ok')


_PREDICATES: dict[tuple[str, str], Callable[..., tuple[bool, str]]] = {
    ('psa_paper', 'folded'): _paper_folded,
    ('psa_official', 'folded'): _official_folded,
    ('psa_paper', 'cuda'): can_use_psa_cuda,
    ('psa_paper', 'cpu'): can_use_psa_cpu,
    ('psa_official', 'cpu'): can_use_psa_cpu,
    ('psa_official', 'cuda'): can_use_psa_cuda,
    ('outlook', 'cuda'): can_use_outlook_cuda,
    ('outlook', 'cpu'): can_use_outlook_cpu,
}


#: auto's decisions by (op, device, dtype, shape, predicate arguments, extension state); see
#: select_backend. Bounded: cleared when it reaches _DECISIONS_MAX entries.
_DECISIONS: dict[tuple, tuple[str, str]] = {}
_DECISIONS_MAX = 4096


def _decide_auto(op: str, x: torch.Tensor, predicate_kwargs: dict) -> tuple[str, str]:
    reasons = []
    for name in OPS[op]:
        ok, reason = _PREDICATES[(op, name)](x, **predicate_kwargs)
        if ok:
            return name, 'auto'
        reasons.append(f'{name}: {reason}')
    return 'reference', '; '.join(reasons)


def select_backend(op: str, x: torch.Tensor, backend: str = 'auto',
                   **predicate_kwargs) -> tuple[str, str]:
    """Choose the path for one call of ``op`` on ``x``; returns ``(backend, reason)``.

    ``backend='auto'`` honours ``MMATTN_BACKEND`` and then the predicates in the order of
    :data:`OPS`, falling back to the reference; an explicit backend that cannot run raises
    :class:`KernelUnavailableError` naming the reason (for a compiled kernel: how to build it).
    ``predicate_kwargs`` go to the predicates (e.g. PSA's ``hooks=True``).

    The decision (``auto``'s, or whether an explicit backend's predicate accepts) is cached
    per op, backend, device, dtype, shape, predicate arguments, extension state and whether
    deterministic algorithms are demanded (what the predicates look at besides the per-call
    state): a call reads ``MMATTN_BACKEND`` (``auto``) and checks for graph recording, then
    looks the decision up. Under ``torch.compile`` and while a graph is recorded it is derived
    afresh.
    """
    if op not in OPS:
        raise ValueError(f'select_backend: op must be one of {tuple(OPS)}, got {op!r}')
    allowed = backends_for(op)
    if backend not in allowed:
        raise ValueError(f'{op}: backend must be one of {allowed}, got {backend!r}')
    if backend == 'reference':
        return 'reference', 'requested'
    if backend == 'auto' and env_backend() == 'reference':
        return 'reference', f'{ENV_VAR}=reference'
    if backend == 'auto':
        decide = lambda: _decide_auto(op, x, predicate_kwargs)  # noqa: E731
    else:  # an explicit choice is not declined by auto's heuristics (size, measured speed)
        kwargs = {k: v for k, v in predicate_kwargs.items() if k != 'heuristics'}
        decide = lambda: _PREDICATES[(op, backend)](x, **kwargs)  # noqa: E731
    if _recording_graph() or torch.compiler.is_compiling():
        decision = decide()
    else:
        extension.load_extension()
        key = (op, backend, x.device, x.dtype, tuple(x.shape),
               tuple(sorted(predicate_kwargs.items())), extension.loaded_from(),
               extension.load_error(), _deterministic_only())
        decision = _DECISIONS.get(key)
        if decision is None:
            decision = decide()
            if len(_DECISIONS) >= _DECISIONS_MAX:
                _DECISIONS.clear()
            _DECISIONS[key] = decision
    if backend == 'auto':
        return decision
    ok, reason = decision
    if not ok:
        # how to build the kernels, where the reason (a load error) does not say it already
        hint = f'; {extension.BUILD_HINT}' if backend in ('cuda', 'cpu') and \
            'not loaded' in reason and extension.BUILD_HINT not in reason else ''
        raise KernelUnavailableError(f'{op}: backend={backend!r} requested but it declined: '
                                     f'{reason}{hint}')
    return backend, 'requested'


def kernel_status() -> str:
    """One line on mmattn's kernels: where the compiled ones come from and for which devices,
    the pure-PyTorch folded ops, and the environment switch."""
    source = extension.load_extension()
    if source is None:
        compiled = f'compiled kernels: not loaded ({extension.load_error()})'
    else:
        ops = sorted(extension.SCHEMAS)
        devices = [d for d in ('cpu', 'cuda')
                   if any(extension.has_kernel(o, d) for o in ops)]
        per = {d: [o for o in ops if extension.has_kernel(o, d)] for d in devices}
        compiled = f'compiled kernels: {source}: ' + '; '.join(
            f'{d.upper()} {", ".join(per[d])}' for d in devices)
    folded = ', '.join(op for op, names in OPS.items() if 'folded' in names)
    return (f'{compiled}; pure-PyTorch folded ops: {folded} (any device); '
            f'{ENV_VAR}={os.environ.get(ENV_VAR, "auto (unset)")}')
