"""Argument and input checks shared by every block: clear ValueErrors that name the
argument, the expected and the actual value.

The input checks (:func:`check_input`, :func:`check_nhwc`) run in every mode: they compile
under ``torch.jit.script`` (shapes then print as lists) and each block module declares them
with ``torch.fx.wrap``, so ``torch.fx.symbolic_trace`` records them as calls that check the
real tensors when the graph runs, instead of failing on the symbolic shapes.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
import typing
from collections.abc import Iterator
from typing import Any, Callable, TypeVar

import torch
from mmengine.registry import MODELS as MMENGINE_MODELS  # where mmcv's build_norm_layer looks
from torch import nn

_F = TypeVar('_F', bound=Callable[..., Any])


def shape_str(x: torch.Tensor) -> str:
    """``x``'s shape for an error message: ``(1, 3, 5, 5)`` (a list under TorchScript; plain
    numbers under ``torch.jit.trace`` too, whose sizes are tensors: ``tensor(1)``)."""
    if torch.jit.is_scripting():
        return str(x.shape)
    return str(tuple(int(size) for size in x.shape))


def _check_values(x: torch.Tensor, height: int, width: int, block: str) -> None:
    """The dtype and spatial-size checks both layouts share: a floating-point tensor (the
    blocks' weights, softmaxes and means are real-valued) with at least one pixel."""
    if not x.is_floating_point():
        raise TypeError(f'{block}: expected a floating-point input (float16, bfloat16, '
                        f'float32 or float64), got dtype {x.dtype}; convert it first, e.g. '
                        f'x.float() (images: normalise them as the model\'s data '
                        f'preprocessor does)')
    if height < 1 or width < 1:
        raise ValueError(f'{block}: expected an input with H >= 1 and W >= 1, got H={height}, '
                         f'W={width} (shape {shape_str(x)}): there are no pixels to attend '
                         f'over; check the resize/crop before this block')


def check_input(x: torch.Tensor, in_channels: int | None, block: str) -> None:
    """Check that ``x`` is a floating-point NCHW tensor with ``in_channels`` channels (any
    number where ``None``) and ``H, W >= 1``."""
    if not torch.jit.is_scripting():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{block}: expected a torch.Tensor input, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{block}: expected a 4-D NCHW input, got a {x.dim()}-D tensor '
                         f'of shape {shape_str(x)}')
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(f'{block}: the input has {x.shape[1]} channels (shape '
                         f'{shape_str(x)}), but in_channels={in_channels}')
    _check_values(x, x.shape[2], x.shape[3], block)


def check_nhwc(x: torch.Tensor, in_channels: int, block: str) -> None:
    """Check that ``x`` is a floating-point channels-last (B, H, W, C) tensor with
    ``in_channels`` channels and ``H, W >= 1``."""
    if x.dim() != 4 or x.shape[-1] != in_channels:
        raise ValueError(f'{block}: forward_nhwc expects (B, H, W, {in_channels}), got shape '
                         f'{shape_str(x)}')
    _check_values(x, x.shape[1], x.shape[2], block)


def check_positive(name: str, value: Any, block: str, *, minimum: int = 1) -> int:
    """Check that ``value`` is an int >= ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{block}: {name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_flag(name: str, value: Any, block: str) -> bool:
    """Check that ``value`` is ``True`` or ``False`` (``1``/``0`` compare equal) and return it
    as a bool: a string such as ``'no'`` would otherwise switch the feature on."""
    check_choice(name, value, (True, False), block)
    return bool(value)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number: an int or float, NumPy's too (``True``/``False``
    are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_probability(name: str, value: Any, block: str) -> float:
    """Check that ``value`` is a number in [0, 1] (a dropout rate) and return it."""
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f'{block}: {name} must be a probability, a number in [0, 1], '
                         f'got {value!r}')
    return value


def check_choice(name: str, value: Any, choices: tuple, block: str) -> None:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{block}: {name} must be one of {choices}, got {value!r}')


# mmcv's norm layers that fail on an NCHW map ('LN', 'BN1d', 'BN3d', 'IN1d', 'IN3d'); a
# subclass (timm's LayerNorm2d, which normalises the channels) is not refused
_NOT_2D_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm3d, nn.InstanceNorm1d,
                 nn.InstanceNorm3d)


def check_norm_cfg(name: str, cfg: Any, block: str) -> None:
    """Check that ``cfg`` is ``None`` or a config mmcv's ``build_norm_layer`` builds: a dict
    whose ``type`` is a norm class or a name it finds in its registry (``'BN'``, ``'SyncBN'``,
    ``'GN'``, ...), with ``num_groups`` for a GroupNorm, and a norm of (N, C, H, W) maps
    (not mmcv's ``'LN'``, ``'BN1d'``, ``'BN3d'``, ``'IN1d'``, ``'IN3d'``). mmcv's own errors
    for these are a bare ``AssertionError``, ``KeyError: 'Cannot find None in registry ...'``
    or, for the other ranks, a shape error in the forward."""
    if cfg is None:
        return
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise ValueError(f"{block}: {name} must be None or an mmcv norm config, a dict with a "
                         f"'type' key such as dict(type='BN') or dict(type='GN', "
                         f'num_groups=32), got {cfg!r}')
    layer_type = cfg['type']
    if inspect.isclass(layer_type):
        layer = layer_type
    else:
        with MMENGINE_MODELS.switch_scope_and_registry(None) as registry:
            layer = registry.get(layer_type) if isinstance(layer_type, str) else None
            scope = registry.scope
        if layer is None:
            raise ValueError(f"{block}: {name}['type'] must be a norm class or a norm layer "
                             f"name registered in mmengine's MODELS (scope {scope!r}), e.g. "
                             f"'BN', 'SyncBN', 'GN', 'LN', 'IN', got {layer_type!r}")
    if layer in _NOT_2D_NORMS:
        raise ValueError(f'{block}: {name} builds a {layer.__name__}, which does not normalise '
                         f'the channels of an (N, C, H, W) map; use a norm of 2-D maps, e.g. '
                         f"'BN', 'SyncBN', 'GN' or 'IN', got {cfg!r}")
    if layer is nn.GroupNorm and 'num_groups' not in cfg:
        raise ValueError(f'{block}: {name} builds a GroupNorm, which needs num_groups, e.g. '
                         f"dict(type='GN', num_groups=32), got {cfg!r}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int, block: str) -> None:
    """Check that ``divisor`` divides ``value``."""
    if value % divisor != 0:
        raise ValueError(f'{block}: {name}={value} is not divisible by {divisor_name}={divisor}')


@contextlib.contextmanager
def errors_named_as(block: str, *parts: type) -> Iterator[None]:
    """Name ``block``, the composite a user configured, in the argument errors its sub-blocks
    ``parts`` raise while it builds them: ``CBAM(16, rd_ratio=0)`` says ``CBAM: rd_ratio ...``,
    not ``CBAMChannelGate: rd_ratio ...`` (a block the user never named)."""
    try:
        yield
    except (TypeError, ValueError) as err:
        for part in parts:
            prefix = f'{part.__name__}: '
            if str(err).startswith(prefix):
                renamed = type(err)(block + ': ' + str(err)[len(prefix):])
                raise renamed.with_traceback(err.__traceback__) from None
        raise


def check_scriptable_backend(backend: str, block: str) -> None:
    """``torch.jit.script`` compiles a block's reference path: refuse a block built to run a
    compiled or folded op instead (for ``__prepare_scriptable__``)."""
    if backend not in ('auto', 'reference'):
        raise RuntimeError(f'{block}: backend={backend!r} cannot be compiled by '
                           'torch.jit.script (it scripts the reference path); build the block '
                           "with backend='auto' or 'reference' to script it")


def factory_kwargs(device: Any = None, dtype: Any = None) -> dict:
    """``device``/``dtype`` as nn.Module constructors take them (timm passes them)."""
    return {'device': device, 'dtype': dtype}


def concrete_annotations(fn: _F) -> _F:
    """Replace the string annotations of ``fn`` (``from __future__ import annotations``) with
    the objects they name. ``torch.fx`` copies the annotations of the traced module's
    ``forward`` into the code it generates, where ``torch.jit.script`` (of the traced graph)
    cannot resolve a string; the blocks' ``forward`` methods are decorated with this."""
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn
