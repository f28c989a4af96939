"""Compile mmattn's kernels just in time, ahead of their first use: ``python -m mmattn.ops.build``.

The build is cached by :func:`torch.utils.cpp_extension.load` (under ``TORCH_EXTENSIONS_DIR``);
set ``MMATTN_JIT=1`` when running so that mmattn loads it. ``--cuda``/``--cpu-only`` override
the choice of :mod:`mmattn.ops.extension` (CUDA sources when nvcc is found and torch sees a GPU
or ``MMATTN_WITH_CUDA=1``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mmattn.ops import extension


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m mmattn.ops.build', description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--cuda', action='store_true', help='include the CUDA kernels')
    group.add_argument('--cpu-only', action='store_true', help='the C++ CPU kernels only')
    parser.add_argument('-v', '--verbose', action='store_true', help="show the compiler's output")
    args = parser.parse_args(argv)
    with_cuda = True if args.cuda else False if args.cpu_only else None
    try:
        built = extension.build_jit(verbose=args.verbose, with_cuda=with_cuda)
    except Exception as exc:  # the compiler's message is in exc
        print(f'mmattn.ops.build: the build failed: {exc}', file=sys.stderr)
        return 1
    print(f'mmattn.ops.build: built {built}; run with {extension.JIT_ENV}=1 to use it')
    return 0


if __name__ == '__main__':
    sys.exit(main())
