"""The device a tool or an API call runs on, checked before any work: a misspelt name
(``'gpu'``) or a GPU this machine does not have is an error that names the value and what is
accepted, not torch's list of twenty device types or a CUDA driver error from deep inside a
model's construction."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['device_problem', 'check_device']

_ACCEPTED = "'cpu', 'cuda' or 'cuda:N'"


def device_problem(device: object) -> Optional[str]:
    """What is wrong with ``device`` here (a sentence naming it), or ``None`` if it is
    ``'cpu'`` or a CUDA device this process can see."""
    try:
        parsed = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return f'expected {_ACCEPTED}, got {device!r}'
    if parsed.type not in ('cpu', 'cuda'):
        return f'expected {_ACCEPTED}, got {device!r}'
    if parsed.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f'{device!r} needs a CUDA GPU; none is visible to this process'
        if parsed.index is not None and parsed.index >= count:
            return (f'{device!r} names GPU {parsed.index}, but this process sees {count} '
                    f"(cuda:0 to cuda:{count - 1})")
    return None


def check_device(device: object, name: str = 'device') -> torch.device:
    """``torch.device(device)``, or ValueError ``'<name>: <problem>'`` (see
    :func:`device_problem`)."""
    problem = device_problem(device)
    if problem is not None:
        raise ValueError(f'{name}: {problem}')
    return torch.device(device)  # type: ignore[arg-type]
