"""Argument and input checks shared by every block: clear ValueErrors that name the
argument, the expected and the actual value."""
from __future__ import annotations

from typing import Any

import torch


def check_input(x: torch.Tensor, in_channels: int, block: str) -> None:
    """Check that ``x`` is an NCHW tensor with ``in_channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{block}: expected a torch.Tensor input, got {type(x).__name__}')
    if x.dim() != 4:
        raise ValueError(f'{block}: expected a 4-D NCHW input, got a {x.dim()}-D tensor '
                         f'of shape {tuple(x.shape)}')
    if x.shape[1] != in_channels:
        raise ValueError(f'{block}: the input has {x.shape[1]} channels (shape '
                         f'{tuple(x.shape)}), but in_channels={in_channels}')


def check_positive(name: str, value: Any, block: str, *, minimum: int = 1) -> int:
    """Check that ``value`` is an int >= ``minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{block}: {name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_choice(name: str, value: Any, choices: tuple, block: str) -> None:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{block}: {name} must be one of {choices}, got {value!r}')


def check_divisible(name: str, value: int, divisor_name: str, divisor: int, block: str) -> None:
    """Check that ``divisor`` divides ``value``."""
    if value % divisor != 0:
        raise ValueError(f'{block}: {name}={value} is not divisible by {divisor_name}={divisor}')


def factory_kwargs(device: Any = None, dtype: Any = None) -> dict:
    """``device``/``dtype`` as nn.Module constructors take them (timm passes them)."""
    return {'device': device, 'dtype': dtype}
