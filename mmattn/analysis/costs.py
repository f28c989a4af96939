"""What the attention blocks cost: parameters, multiply-accumulates (MACs) and activation memory.

Counting convention (fvcore / mmengine / timm): **one multiply-accumulate is one "flop"**.
Every number this module returns is a MAC count; ``2 x MACs`` is the number of floating point
operations. timm's published ``GMACs`` (e.g. 6.94 for ``volo_d1`` at 224x224) are the same unit.

The counter is mmengine's :class:`~mmengine.analysis.FlopAnalyzer` (jit tracing, so the matrix
products *inside* attention are seen - mmcv's hook-based ``get_model_complexity_info`` only
counts ``nn.Module`` layers and misses them), with these handles added or replaced
(:data:`EXTRA_FLOP_HANDLES`):

* ``aten::scaled_dot_product_attention`` - missing in mmengine 0.10 (timm's ``Attention``, the
  efficient paths of :class:`~mmattn.layers.NonLocalAttention` and
  :class:`~mmattn.layers.PositionAttention` call it): ``L*S*(E + Ev)`` MACs per batch-head
  (``q k^T`` and ``A v``), the same count as the explicit two matmuls;
* ``aten::matmul`` - mmengine counts ``prod(a.shape) * b.shape[-1]``, which is short by the
  broadcast factor when ``b`` has batch dimensions ``a`` lacks; replaced by
  ``prod(broadcast batch) * M * K * N``;
* ``aten::einsum`` - mmengine allocates ``np.zeros`` of every operand to ask
  ``np.einsum_path``; for two operands the exact MAC count is the product of the sizes of all
  distinct indices, computed directly (more operands fall back to mmengine's handle).

Element-wise ops (softmax, sigmoid, the gating products, additions) are not counted, as in
fvcore; norms count ``5 x numel`` (mmengine's estimate).
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import einsum_flop_jit, get_shape
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    'EXTRA_FLOP_HANDLES', 'BlockCost', 'ModelCost', 'attention_block_types',
    'iter_attention_blocks', 'count_flops', 'model_costs', 'measure_block', 'block_variants',
    'format_count', 'format_bytes', 'saved_bytes',
]

# ----------------------------------------------------------------------------- jit handles
def _prod(values: Sequence[int]) -> int:
    return math.prod(int(v) for v in values)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::scaled_dot_product_attention(q, k, v, ...)``: ``q`` (..., L, E), ``k``
    (..., S, E), ``v`` (..., S, Ev): ``prod(batch) * L * S * (E + Ev)``."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2]))
    length, source = q[-2], k[-2]
    return _prod(batch) * length * source * (q[-1] + v[-1])


def matmul_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """MACs of ``aten::matmul`` / ``aten::mm`` / ``aten::bmm`` with broadcasting:
    ``prod(broadcast batch) * M * K * N`` (1-D operands as in ``torch.matmul``)."""
    a, b = (list(get_shape(t)) for t in inputs[:2])
    if len(a) == 1:
        a = [1, a[0]]
    if len(b) == 1:
        b = [b[0], 1]
    if a[-1] != b[-2]:
        raise ValueError(f'matmul_flop_jit: inner dimensions differ, got shapes {a} and {b}')
    batch = torch.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
    return _prod(batch) * a[-2] * a[-1] * b[-1]


def fast_einsum_flop_jit(inputs: list[Any], outputs: list[Any]) -> int | float:
    """MACs of a two-operand ``aten::einsum``: the product of the sizes of all distinct
    indices (one multiply per combination, summed or not); other cases go to mmengine."""
    equation = inputs[0].toIValue().replace(' ', '')
    operands = list(inputs[1].node().inputs())
    lhs = equation.split('->')[0].split(',')
    if len(operands) != 2 or '.' in equation or len(lhs) != 2:
        return einsum_flop_jit(inputs, outputs)
    sizes: dict[str, int] = {}
    for letters, value in zip(lhs, operands):
        for letter, size in zip(letters, get_shape(value)):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return _prod(sizes.values())


#: handles added to / replacing mmengine's defaults (see the module docstring)
EXTRA_FLOP_HANDLES: dict[str, Callable[[list[Any], list[Any]], Any]] = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    'aten::matmul': matmul_flop_jit,
    'aten::bmm': matmul_flop_jit,
    'aten::mm': matmul_flop_jit,
    'aten::einsum': fast_einsum_flop_jit,
}


# ----------------------------------------------------------------------------- block scopes
def attention_block_types() -> tuple[type[nn.Module], ...]:
    """Every registered mmattn attention block class."""
    from mmattn.layers import attention_blocks
    return tuple(attention_blocks().values())


def iter_attention_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every mmattn attention block in ``model`` that is not inside
    another one (DualAttention's ``pam``/``cam`` are reported as the DualAttention)."""
    types = attention_block_types()
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + '.') for p in inside):
            continue
        if isinstance(module, types):
            inside.append(name)
            yield name, module


# ----------------------------------------------------------------------------- model costs
@dataclass
class BlockCost:
    """Parameters and MACs of one attention block instance inside a model."""

    name: str
    type: str
    params: int
    macs: int


@dataclass
class ModelCost:
    """Parameters and MACs of a model and of every attention block in it."""

    params: int
    macs: int
    blocks: list[BlockCost] = field(default_factory=list)
    unsupported_ops: dict[str, int] = field(default_factory=dict)

    def by_type(self) -> dict[str, tuple[int, int, int]]:
        """``{block type: (count, params, MACs)}`` summed over the instances."""
        out: dict[str, list[int]] = {}
        for b in self.blocks:
            row = out.setdefault(b.type, [0, 0, 0])
            row[0] += 1
            row[1] += b.params
            row[2] += b.macs
        return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def count_flops(model: nn.Module, inputs: torch.Tensor | tuple) -> FlopAnalyzer:
    """A quiet :class:`FlopAnalyzer` of ``model(*inputs)`` with :data:`EXTRA_FLOP_HANDLES`."""
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**EXTRA_FLOP_HANDLES)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    return analyzer


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_costs(model: nn.Module, inputs: torch.Tensor | tuple,
                root: nn.Module | None = None) -> ModelCost:
    """Parameters and MACs of ``model(*inputs)`` in total and per attention block.

    ``root`` is the module whose attention blocks are listed (default ``model``); pass the
    wrapped network when ``model`` is a thin wrapper (see :mod:`mmattn.analysis.build`).
    """
    root = model if root is None else root
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            analyzer = count_flops(model, inputs)
            by_module = analyzer.by_module()
            unsupported = dict(analyzer.unsupported_ops())
    finally:
        model.train(was_training)
    prefix = {m: n for n, m in model.named_modules()}
    blocks = []
    for _, module in iter_attention_blocks(root):
        full = prefix[module]
        blocks.append(BlockCost(full, type(module).__name__, _num_params(module),
                                int(by_module.get(full, 0))))
    return ModelCost(_num_params(model), int(by_module['']), blocks, unsupported)


# ----------------------------------------------------------------------------- block costs
class _LiveMemory(TorchDispatchMode):
    """Tracks the bytes of the tensors created by the ops run under it (storages counted once,
    views not counted again) and their peak while alive: the activation memory of a forward,
    independent of the allocator (what an op allocates internally and frees is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage ptr -> live tensors using it

    def _release(self, ptr: int, nbytes: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == 'meta':
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr == 0:
                continue
            if ptr not in self._refs:
                self._refs[ptr] = 0
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            self._refs[ptr] += 1
            weakref.finalize(t, self._release, ptr, nbytes)
        return out


def saved_bytes(fn: Callable[..., Any], *inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward in ``fn(*inputs)``, without the
    inputs and (for a module) its parameters, each storage counted once."""
    for index, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'saved_bytes: inputs must be tensors, got {type(t).__name__} at '
                            f'position {index}')
    skip = {t.untyped_storage().data_ptr() for t in inputs}
    if isinstance(fn, nn.Module):
        skip.update(p.untyped_storage().data_ptr() for p in fn.parameters())
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def measure_block(module: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Parameters, MACs and activation memory of one block on input ``x``.

    Returns ``params``; ``macs`` (fvcore convention, :func:`count_flops`); ``peak_bytes``: the
    peak of the tensors alive during an inference forward (:class:`_LiveMemory`, including the
    output, excluding the input); ``saved_bytes``: what a training forward keeps for backward
    (excluding the input and the parameters); and ``cuda_peak_bytes`` on a CUDA device (the
    allocator's peak above the input, inference), else absent.
    """
    result = {'params': _num_params(module)}
    was_training = module.training
    module.eval()
    with torch.no_grad():
        result['macs'] = int(count_flops(module, (x,)).total())
        tracker = _LiveMemory()
        with tracker:
            out = module(x)
        del out
        result['peak_bytes'] = tracker.peak
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            out = module(x)
            torch.cuda.synchronize(x.device)
            result['cuda_peak_bytes'] = torch.cuda.max_memory_allocated(x.device) - base
            del out
    module.train()
    result['saved_bytes'] = saved_bytes(module, x.detach().requires_grad_(True))
    module.train(was_training)
    return result


def block_variants(cls: type[nn.Module]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, kwargs)`` of the configurations of ``cls`` shown side by side: the default,
    and the eager reference where the block has a switch for it (``efficient=False``, or
    ``backend='reference'``)."""
    params = inspect.signature(cls).parameters
    variants: list[tuple[str, dict[str, Any]]] = [('default', {})]
    if 'efficient' in params:
        variants.append(('eager reference (efficient=False)', {'efficient': False}))
    if 'backend' in params:
        variants.append(("eager reference (backend='reference')", {'backend': 'reference'}))
    return variants


def format_count(value: float) -> str:
    """``1234567`` -> ``'1.23 M'`` (k, M, G, T)."""
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3g} {unit}'
    return f'{value:.0f}'


def format_bytes(value: float) -> str:
    """``1048576`` -> ``'1.00 MiB'``."""
    for unit, scale in (('GiB', 2 ** 30), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
        if abs(value) >= scale:
            return f'{value / scale:.3g} {unit}'
    return f'{value:.0f} B'

