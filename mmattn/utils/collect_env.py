"""Report the environment: mmengine's standard report, then mmattn's stack against its
pins, whether mmcv's compiled ops load, and the state of mmattn's kernels.

    python -m mmattn.utils.collect_env
"""
from __future__ import annotations

import importlib
from collections import OrderedDict

from mmattn.utils import stack


def _mmcv_ops() -> str:
    try:
        importlib.import_module('mmcv._ext')
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f'NOT loadable ({type(exc).__name__}: {exc})'
    from mmcv.ops import get_compiler_version, get_compiling_cuda_version
    return f'loaded (compiler {get_compiler_version()}, CUDA {get_compiling_cuda_version()})'


def _mmattn_kernels() -> str:
    try:
        ops = importlib.import_module('mmattn.ops')
    except ModuleNotFoundError:
        return 'none in this version (pure-PyTorch paths only)'
    return ops.kernel_status()


def collect_env() -> OrderedDict:
    """Everything :mod:`mmengine.utils.dl_utils.collect_env` reports, plus mmattn's own."""
    from mmengine.utils.dl_utils import collect_env as mmengine_env

    import mmattn
    env = OrderedDict(mmengine_env())
    env['mmattn'] = f'{mmattn.__version__} ({mmattn.__file__})'
    try:
        pins = stack.read_pins()
    except FileNotFoundError as exc:
        pins = {}
        env['pins'] = str(exc)
    for name, want in pins.items():
        have = stack.installed_version(name)
        mark = 'ok' if have == want else 'DIFFERS'
        env[f'  {name}'] = f'{have or "not installed"} (pinned {want}, {mark})'
    env['mmcv ops'] = _mmcv_ops()
    env['mmattn kernels'] = _mmattn_kernels()
    import torch
    env['device'] = (f'cuda: {torch.cuda.get_device_name(0)}' if torch.cuda.is_available()
                     else f'cpu ({torch.get_num_threads()} threads)')
    return env


def main() -> None:
    for key, value in collect_env().items():
        print(f'{key}: {value}')


if __name__ == '__main__':
    main()
