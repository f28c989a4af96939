"""argparse ``type`` callables the tools share: a bad number or shape on the command line is a
usage error that names the option, what it takes and what it got (argparse prefixes the
option: ``argument --iters: must be an integer >= 1, got '0'``), not a traceback from
wherever the value is first used."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

__all__ = ['int_at_least', 'number_between', 'int_tuple', 'visible_device', 'run_tool']


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'must be an integer >= {minimum}, got {text!r}')
        return value
    return parse


def number_between(low: float, high: float) -> Callable[[str], float]:
    """A number in [``low``, ``high``]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float('nan')
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f'must be a number in [{low:g}, {high:g}], '
                                             f'got {text!r}')
        return value
    return parse


def int_tuple(length: int, names: str) -> Callable[[str], tuple[int, ...]]:
    """``length`` comma-separated positive integers; ``names`` says what they are in the
    message (e.g. ``'N,C,H,W'``)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(','))
        except ValueError:
            values = ()
        if len(values) != length or min(values) < 1:
            raise argparse.ArgumentTypeError(f'takes {names} ({length} positive integers), '
                                             f'got {text!r}')
        return values
    return parse


def visible_device(text: str) -> str:
    """``'cpu'`` or a CUDA device this process sees (``'cuda'``, ``'cuda:1'``), as given."""
    from .device import device_problem
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def run_tool(main: Callable[[], object], tool: str) -> None:
    """Run a tool's ``main()``. Bad input that mmattn's checks name (a ``ValueError`` - a
    wrong model name, an image too small, a file that is no checkpoint - or a
    ``FileNotFoundError``) ends it with one line, ``<tool>: <message>``, on stderr and exit
    status 2, as argparse's usage errors do, instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as exc:
        print(f'{tool}: {exc}', file=sys.stderr)
        sys.exit(2)
