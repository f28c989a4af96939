"""Compile mmattn's kernels just in time, ahead of their first use: ``python -m mmattn.ops.build``.

The build is cached by :func:`torch.utils.cpp_extension.load` (under ``TORCH_EXTENSIONS_DIR``);
set ``MMATTN_JIT=1`` when running so that mmattn loads it. ``--cuda``/``--cpu-only`` override
the choice of :mod:`mmattn.ops.extension` (CUDA sources when nvcc is found and torch sees a GPU
or ``MMATTN_WITH_CUDA=1``). After building, a child process checks that an op's argument error
raises with its numbers in the message (:func:`check_error_messages`). ``--output DIR`` then writes
the library and its build description to ``DIR`` (``mmattn_kernels.so``, ``mmattn_kernels.json``)
for ``MMATTN_KERNELS_LIB=DIR/mmattn_kernels.so`` on machines with the same torch and GPUs;
where ``MMATTN_KERNELS_LIB`` is set, the command checks that library (loads it, or says why not)
instead of compiling.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mmattn.ops import extension

def check_error_messages(with_cuda: Optional[bool] = None) -> Optional[str]:
    """None if the built kernels raise an argument error whose message holds its numbers, else
    what went wrong (:func:`extension.probe_error_numbers`, the cached build loaded in the child
    process). A compiler that links libstdc++ statically, without
    :func:`extension.link_flags`, gives the extension a C++ runtime of its own beside torch's:
    then such an error crashed the process (the lent GPU machines) or lost its numbers."""
    outcome = extension.probe_error_numbers(
        f'from mmattn.ops import extension\nextension.build_jit(with_cuda={with_cuda})\n')
    if outcome is None:
        return None
    return (f'an argument error of the built kernels came out wrong ({outcome}): '
            f"as when the extension carries a C++ runtime of its own beside torch's (a compiler "
            f"that links libstdc++ statically; CXX={os.environ.get('CXX', 'c++')} now)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m mmattn.ops.build', description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument('--cuda', action='store_true', help='include the CUDA kernels')
    group.add_argument('--cpu-only', action='store_true', help='the C++ CPU kernels only')
    parser.add_argument('-v', '--verbose', action='store_true', help="show the compiler's output")
    parser.add_argument('--output', metavar='DIR',
                        help=f'also write the built library and its build description to DIR, '
                             f'for {extension.LIBRARY_ENV}=DIR/{extension.LIBRARY_NAME}.so')
    args = parser.parse_args(argv)
    with_cuda = True if args.cuda else False if args.cpu_only else extension.want_cuda()
    library = os.environ.get(extension.LIBRARY_ENV, '').strip()
    if args.output and library:
        print(f'mmattn.ops.build: --output writes a library compiled here, but '
              f'{extension.LIBRARY_ENV}={library} is set (a build loads it instead of '
              f'compiling): unset it', file=sys.stderr)
        return 2
    try:
        built = extension.build_jit(verbose=args.verbose, with_cuda=with_cuda)
    except Exception as exc:  # the compiler's message is in exc
        print(f'mmattn.ops.build: the build failed: {exc}', file=sys.stderr)
        return 1
    problem = check_error_messages(with_cuda)
    if problem is not None:
        print(f'mmattn.ops.build: built {built}, but {problem}', file=sys.stderr)
        return 1
    if args.output:
        written = extension.export_library(args.output, with_cuda=with_cuda)
        print(f'mmattn.ops.build: built {built}, written to {written} with its build '
              f'description; run with {extension.LIBRARY_ENV}={written} to use it')
    elif built.startswith('JIT'):
        print(f'mmattn.ops.build: built {built}; run with {extension.JIT_ENV}=1 to use it')
    else:
        print(f'mmattn.ops.build: loaded {built}; its argument errors keep their numbers')
    return 0


if __name__ == '__main__':
    sys.exit(main())
