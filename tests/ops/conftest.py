"""Fixtures for the compiled kernels.

``cpu_kernels`` JIT-compiles the extension's C++ CPU kernels (cached by torch under
``TORCH_EXTENSIONS_DIR``: the first run of the suite on a machine compiles them, about a
minute) and makes mmattn report them loaded for the tests of one module; afterwards the
dispatch sees the state it had before, so the rest of the suite runs the paths a fresh install
runs. ``cuda_kernels`` does the same with the CUDA kernels, on a machine with a GPU.
"""
from __future__ import annotations

from typing import Iterator

import pytest
import torch

from mmattn.ops import extension


def _loaded(with_cuda: bool) -> Iterator[str]:
    saved = dict(extension._state)
    built = extension.build_jit(with_cuda=with_cuda)
    try:
        yield built
    finally:
        extension.reset_state(**saved)


@pytest.fixture(scope='module')
def cpu_kernels() -> Iterator[str]:
    yield from _loaded(with_cuda=False)


@pytest.fixture(scope='module')
def cuda_kernels() -> Iterator[str]:
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    yield from _loaded(with_cuda=True)
