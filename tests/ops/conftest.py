"""Fixtures for the compiled kernels.

``cpu_kernels`` JIT-compiles the extension's C++ CPU kernels (cached by torch under
``TORCH_EXTENSIONS_DIR``: the first run of the suite on a machine compiles them, about a
minute) and makes mmattn report them loaded for the tests of one module; afterwards the
dispatch sees the state it had before, so the rest of the suite runs the paths a fresh install
runs. ``cuda_kernels`` does the same with the CUDA kernels, on a machine with a GPU. While
the CPU kernels (or the CUDA kernels' CPU emulation) are loaded, new CPU memory holds junk
(``junk_in_new_memory``).
"""
from __future__ import annotations

import ctypes
import glob
import os.path as osp
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
def junk_in_new_memory() -> Iterator[None]:
    """New CPU memory (``at::empty``, ``torch.empty``) filled with junk for a module (NaN in
    float32, 1.7e308 in float64), as the GPU's caching allocator hands out what earlier
    tensors left: a kernel, or its host code, that reads a buffer before writing it gets junk
    here too, where the CPU's fresh pages (every large allocation's) would read as zeros. c10's
    own switch, ``FLAGS_caffe2_cpu_allocator_do_junk_fill``."""
    (library,) = glob.glob(osp.join(osp.dirname(torch.__file__), 'lib', 'libc10.*'))
    flag = ctypes.c_bool.in_dll(ctypes.CDLL(library), 'FLAGS_caffe2_cpu_allocator_do_junk_fill')
    saved = flag.value
    flag.value = True
    try:
        yield
    finally:
        flag.value = saved


@pytest.fixture(scope='module')
def cpu_kernels(junk_in_new_memory: None) -> Iterator[str]:
    yield from _loaded(with_cuda=False)


@pytest.fixture(scope='module')
def cuda_kernels() -> Iterator[str]:
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    yield from _loaded(with_cuda=True)
