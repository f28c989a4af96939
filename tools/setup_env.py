"""Install mmattn's pinned stack and mmattn itself into the running Python.

    python tools/setup_env.py            # install what is missing or wrong, then verify
    python tools/setup_env.py --check    # only report; exit 1 if anything is off

Idempotent: every step first checks what is installed and is skipped when it is
already right, so a second run takes seconds. The versions come from
``requirements/constraints.txt`` alone. mmcv 2.1.0 has no wheel for this torch, so
it is built from the sdist with its ops (``MMCV_WITH_OPS=1``, no build isolation,
and ``FORCE_CUDA=1`` when torch sees a GPU); pip's wheel cache keeps the result.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / 'requirements' / 'constraints.txt'


def _load_by_path(name: str, path: Path):
    """Import the file ``path`` as module ``name`` without importing its package
    (``import mmattn`` needs torch, which may not be installed yet)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


stack = _load_by_path('_mmattn_stack', ROOT / 'mmattn' / 'utils' / 'stack.py')
PINS = stack.read_pins(CONSTRAINTS)

# mmpose 1.3.2 lists chumpy, whose sdist cannot be built by current pip (its setup.py
# imports pip internals) and which mmpose imports only for SMPL body models. mmpose
# is installed without dependencies and these, its other runtime requirements, beside it.
MMPOSE_DEPS = ['json-tricks', 'matplotlib', 'munkres', 'numpy', 'opencv-python', 'pillow',
               'scipy', 'torchvision', 'xtcocotools']


def log(msg: str) -> None:
    print(f'[setup_env] {msg}', flush=True)


def pip_install(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, '-m', 'pip', 'install', '--disable-pip-version-check',
           '-c', str(CONSTRAINTS), *args]
    log(' '.join(cmd[1:]))
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def runs(code: str, cwd: str | None = None) -> bool:
    """Whether ``code`` runs without error in a fresh interpreter (fresh: what this
    process imported before an install would be stale), in ``cwd`` if given."""
    return subprocess.run([sys.executable, '-c', code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=cwd).returncode == 0


def wrong(*names: str) -> list[str]:
    """Those of ``names`` whose installed version differs from the pin."""
    return [n for n in names if stack.installed_version(n) != PINS[stack.canonical_name(n)]]


def torch_sees_gpu() -> bool:
    return runs('import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)')


def mmcv_ok() -> bool:
    if wrong('mmcv') or not runs('import mmcv._ext'):
        return False
    if torch_sees_gpu():
        return runs('import sys; from mmcv.ops import get_compiling_cuda_version as v; '
                    'sys.exit(v() == "not available")')
    return True


def _mim_files() -> tuple[str, ...]:
    # setup.py calls setup() only under __main__
    return _load_by_path('_mmattn_setup', ROOT / 'setup.py').MIM_FILES


def editable_ok() -> bool:
    """mmattn is installed from this checkout, with every mmattn/.mim entry in place."""
    if not all((ROOT / 'mmattn' / '.mim' / name).exists() for name in _mim_files()):
        return False
    code = ('import importlib.util, sys, pathlib; s = importlib.util.find_spec("mmattn"); '
            f'sys.exit(s is None or pathlib.Path(s.origin).resolve().parents[1] != pathlib.Path({str(ROOT)!r}))')
    # run outside the checkout: from inside it, ``import mmattn`` finds the working tree
    # even when the installed (editable) copy points at another, moved or deleted checkout
    return stack.installed_version('mmattn') is not None and runs(code, cwd=tempfile.gettempdir())


def steps():
    """(name, is it already right?, how to install it) in dependency order."""
    rest = ['mmengine', 'timm', 'mmsegmentation', 'mmdet', 'mmpretrain', 'ftfy', 'regex',
            'numpy', 'opencv-python', 'pytest', 'onnx', 'onnxscript', 'onnxruntime']
    return [
        ('build tools', lambda: not wrong('setuptools', 'wheel', 'ninja'),
         lambda: pip_install('setuptools', 'wheel', 'ninja')),
        ('torch + torchvision',
         lambda: not wrong('torch', 'torchvision') and runs('import torch, torchvision'),
         lambda: pip_install('torch', 'torchvision')),
        ('mmcv with ops', mmcv_ok, install_mmcv),
        ('OpenMMLab, timm and test tools', lambda: not wrong(*rest),
         lambda: pip_install(*rest)),
        ('mmpose (without chumpy) + xtcocotools built for numpy 2',
         lambda: not wrong('mmpose', 'xtcocotools') and runs('import xtcocotools._mask, mmpose'),
         install_mmpose),
        ('mmattn (editable)', editable_ok,
         lambda: pip_install('--no-deps', '--no-build-isolation', '-e', str(ROOT))),
    ]


def install_mmcv() -> None:
    env = {'MMCV_WITH_OPS': '1', 'MAX_JOBS': str(os.cpu_count() or 2)}
    extra = []
    if torch_sees_gpu():
        env['FORCE_CUDA'] = '1'
    if stack.installed_version('mmcv') is not None or stack.installed_version('mmcv-lite'):
        # a wrong build is installed (no ops, other torch, no CUDA): do not reuse a
        # cached wheel of it
        extra = ['--force-reinstall', '--no-cache-dir', '--no-deps']
        if stack.installed_version('mmcv-lite'):
            subprocess.run([sys.executable, '-m', 'pip', 'uninstall', '-y', 'mmcv-lite'], check=True)
    pip_install('--no-build-isolation', '--no-binary', 'mmcv', *extra, 'mmcv', env=env)


def install_mmpose() -> None:
    pip_install('--no-binary', 'xtcocotools', *MMPOSE_DEPS)
    if not runs('import xtcocotools._mask'):
        # an xtcocotools wheel built against numpy 1 is installed: rebuild it
        pip_install('--no-binary', 'xtcocotools', '--force-reinstall', '--no-deps',
                    '--no-cache-dir', 'xtcocotools')
    pip_install('--no-deps', 'mmpose')


VERIFY = 'import mmattn, mmcv.ops, mmseg, mmpose, mmpretrain, timm'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only report, install nothing')
    args = parser.parse_args()
    start = time.perf_counter()
    bad = 0
    for name, ok, install in steps():
        if ok():
            log(f'ok       {name}')
            continue
        if args.check:
            log(f'MISSING  {name}')
            bad += 1
            continue
        log(f'install  {name}')
        t = time.perf_counter()
        install()
        if not ok():
            log(f'FAILED   {name}: installed, but the check still fails')
            return 1
        log(f'done     {name} ({time.perf_counter() - t:.0f} s)')
    if bad:
        log(f'{bad} step(s) missing; run: python tools/setup_env.py')
        return 1
    check = subprocess.run([sys.executable, '-W', 'error::UserWarning', '-c', VERIFY],
                           capture_output=True, text=True)
    if check.returncode != 0:
        log(f'FAILED   `{VERIFY}`:\n{check.stderr}')
        return 1
    problems = stack.version_problems(PINS)
    for p in problems:
        log(f'warning: {p.what}')
    log(f'stack ready in {time.perf_counter() - start:.0f} s ({sys.executable})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
