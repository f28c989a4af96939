"""Build mmattn's kernels for the torch this Python runs, without importing the mmattn package.

``bash tools/gpu_check.sh --prepare`` runs it in a virtual environment that holds the lent GPU
machines' torch (not this machine's): the JIT build (``TORCH_CUDA_ARCH_LIST`` and
``MMATTN_WITH_CUDA`` as for any build), exported with its build description to OUT_DIR for
``MMATTN_KERNELS_LIB`` there, so that a lease does not spend minutes compiling. Then a child
process checks the exported library under that torch: it loads (every symbol it needs from
torch is there) and an op's argument error raises with its numbers.

mmattn/ops/extension.py is run by its path: it needs torch alone, where the mmattn package
imports torchvision, mmcv and timm, built for this machine's own torch.

    python tools/prebuild_kernels.py OUT_DIR [--cpu-only]
"""
from __future__ import annotations

import argparse
import importlib.util
import os.path as osp
import sys
from types import ModuleType
from typing import Optional, Sequence

EXTENSION = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'mmattn', 'ops',
                     'extension.py')

# the child's loading: the library as a lent machine loads it (extension.load_library)
_LOAD = """
import sys
sys.path.insert(0, {tools!r})
from prebuild_kernels import extension_module
extension_module().load_library({library!r})
"""


def extension_module() -> ModuleType:
    """mmattn/ops/extension.py, imported by its path (defines the ``mmattn::`` op schemas)."""
    spec = importlib.util.spec_from_file_location('mmattn_ops_extension', EXTENSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python tools/prebuild_kernels.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('out_dir', help='where mmattn_kernels.so and .json are written')
    parser.add_argument('--cpu-only', action='store_true', help='the C++ CPU kernels only')
    args = parser.parse_args(argv)
    extension = extension_module()
    with_cuda = not args.cpu_only
    try:
        extension.build_jit(with_cuda=with_cuda)
    except Exception as exc:  # the compiler's message is in exc
        print(f'prebuild_kernels: the build failed: {exc}', file=sys.stderr)
        return 1
    library = extension.export_library(args.out_dir, with_cuda=with_cuda)
    outcome = extension.probe_error_numbers(
        _LOAD.format(tools=osp.dirname(osp.abspath(__file__)), library=library))
    if outcome is not None:
        print(f'prebuild_kernels: {library} was written, but under this torch it failed its '
              f'check ({outcome})', file=sys.stderr)
        return 1
    import torch
    print(f'prebuild_kernels: {library} for torch {torch.__version__} (commit '
          f'{torch.version.git_version[:12]}), checked: it loads and keeps its errors\' numbers')
    return 0


if __name__ == '__main__':
    sys.exit(main())
