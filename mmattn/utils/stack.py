"""The pinned dependency stack: read the pins, check what is installed, explain problems.

This module imports only the standard library at module level, so that
``tools/setup_env.py`` can load it (by file path) before torch or OpenMMLab are
installed, and ``import mmattn`` can run it before anything heavy is imported.

The pins live in one place, ``requirements/constraints.txt`` (shipped inside the
package as ``mmattn/.mim/requirements/constraints.txt``).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

_PKG_DIR = Path(__file__).resolve().parents[1]
_CANDIDATES = (
    _PKG_DIR / '.mim' / 'requirements' / 'constraints.txt',
    _PKG_DIR.parent / 'requirements' / 'constraints.txt',
)
_PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9_.\-]*)\s*(===|==)\s*([^\s;#]+)')

SETUP_HINT = 'python tools/setup_env.py'


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``mmcv_full`` -> ``mmcv-full``)."""
    return re.sub(r'[-_.]+', '-', name).lower()


def constraints_file() -> Path:
    """Path of the constraints file that holds the pins."""
    for path in _CANDIDATES:
        if path.is_file():
            return path
    raise FileNotFoundError(
        'mmattn cannot find its constraints file; looked in: '
        + ', '.join(str(p) for p in _CANDIDATES))


def read_pins(path: Path | str | None = None) -> dict[str, str]:
    """Return ``{canonical name: exact version}`` for every pin in the constraints file."""
    path = Path(path) if path is not None else constraints_file()
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split('#', 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f'{path}:{lineno}: expected "name==version" or '
                             f'"name===version", got {raw!r}')
        pins[canonical_name(match.group(1))] = match.group(3)
    return pins


def installed_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Problem:
    """Something wrong with the installed stack, with the command that fixes it."""

    what: str
    fix: str = SETUP_HINT

    def __str__(self) -> str:
        return f'{self.what}\n  fix: {self.fix}'


def version_problems(pins: dict[str, str] | None = None) -> list[Problem]:
    """Distributions that are missing or differ from their pin."""
    pins = read_pins() if pins is None else pins
    found = []
    for name, want in pins.items():
        have = installed_version(name)
        if have is None:
            found.append(Problem(f'{name} is not installed (pinned: {want})'))
        elif have != want:
            found.append(Problem(f'{name} {have} is installed, the pinned version is {want}'))
    return found


def torch_problems() -> list[Problem]:
    """torch and torchvision must import together (the local ``+cpu`` torch cannot load
    the registry's torchvision, whose ``_C.so`` links ``libtorch_cuda``)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any failure is reported, not re-raised
        return [Problem(f'torch cannot be imported ({type(exc).__name__}: {exc})')]
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        tv = installed_version('torchvision')
        what = (f'torchvision {tv} cannot be loaded with torch {torch.__version__} '
                f'({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ""})')
        if '+cpu' in torch.__version__:
            what += ('. This torch is a "+cpu" build; the registry\'s torchvision needs '
                     "the registry's CUDA build of torch (it runs without a GPU too)")
        return [Problem(what, fix=f'{SETUP_HINT}   (installs torch===2.13.0, three "=", '
                                  'which selects the CUDA build)')]
    return []


def mmcv_problems() -> list[Problem]:
    """mmcv must be installed with its compiled ops (``mmcv._ext``), and with CUDA ops
    when torch sees a GPU."""
    if installed_version('mmcv') is None:
        lite = installed_version('mmcv-lite')
        what = 'mmcv is not installed' + (' (mmcv-lite is, which has no ops)' if lite else '')
        return [Problem(what)]
    try:
        importlib.import_module('mmcv._ext')
    except Exception as exc:  # noqa: BLE001
        return [Problem(
            f'mmcv {installed_version("mmcv")} has no usable compiled ops '
            f'(import mmcv._ext failed: {type(exc).__name__}: {exc}); it was built without '
            'MMCV_WITH_OPS=1, with build isolation, or against another torch',
            fix=f'{SETUP_HINT}   (rebuilds mmcv from source with MMCV_WITH_OPS=1 '
                '--no-build-isolation)')]
    import torch
    if torch.cuda.is_available():
        from mmcv.ops import get_compiling_cuda_version
        if get_compiling_cuda_version() == 'not available':
            return [Problem('a GPU is available but mmcv was compiled without CUDA ops',
                            fix=f'{SETUP_HINT}   (rebuilds mmcv with FORCE_CUDA=1)')]
    return []


SKIP_ENV = 'MMATTN_SKIP_STACK_CHECK'


def require_stack() -> None:
    """Raise one ImportError that names each broken dependency and its fix.

    Only breakage is fatal here (torch/torchvision that cannot load together,
    mmcv without ops); versions that merely differ from the pins are reported by
    ``python -m mmattn.utils.collect_env`` and ``python tools/setup_env.py --check``.
    ``MMATTN_SKIP_STACK_CHECK=1`` skips the check, for work that needs only the blocks and
    kernels on a machine with another stack (a GPU machine with its own torch and a pure-Python
    mmcv: what breaks then is mmcv's ops, criss-cross attention, and the mm tools).
    """
    if os.environ.get(SKIP_ENV, '').strip() == '1':
        return
    problems = torch_problems()
    if not problems:
        problems = mmcv_problems()
    if problems:
        raise ImportError('mmattn cannot start, its dependency stack is broken:\n'
                          + '\n'.join(f'- {p}' for p in problems))
