"""The dependency stack: pins read from the one constraints file, the installed stack
matches them, and a broken stack fails ``import mmattn`` with one clear message."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmattn.utils import stack

ROOT = Path(__file__).resolve().parents[1]


def test_pins_come_from_the_constraints_file() -> None:
    pins = stack.read_pins(ROOT / 'requirements' / 'constraints.txt')
    # the versions DEVELOPERS.md names for this stack
    assert pins['torch'] == '2.13.0'
    assert pins['torchvision'] == '0.28.0'
    assert pins['mmcv'] == '2.1.0'
    assert pins['mmsegmentation'] == '1.2.2'
    assert pins['mmpose'] == '1.3.2'
    assert pins['timm'] == '1.0.31'
    # three '=': an exact match that the local '2.13.0+cpu' file does not satisfy
    assert re.search(r'^torch===2\.13\.0\s*$', (ROOT / 'requirements' / 'constraints.txt').read_text(), re.M)


def test_unparsable_pin_is_reported_with_its_line(tmp_path: Path) -> None:
    bad = tmp_path / 'constraints.txt'
    bad.write_text('# comment\ntorch===2.13.0\nmmcv>=2.0\n')
    with pytest.raises(ValueError, match=r'constraints.txt:3: expected "name==version"'):
        stack.read_pins(bad)


def test_installed_stack_matches_the_pins() -> None:
    problems = stack.version_problems()
    assert not problems, '\n'.join(map(str, problems))


def test_packaged_constraints_are_found() -> None:
    assert stack.constraints_file().read_text() == (ROOT / 'requirements' / 'constraints.txt').read_text()


def _import_mmattn_with(prelude: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(prelude) + '\nimport mmattn\n'
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)


def test_cpu_torch_with_cuda_torchvision_is_explained(tmp_path: Path) -> None:
    # what the local '+cpu' torch does with the registry's torchvision: torchvision's
    # compiled operators cannot load
    fake = tmp_path / 'torchvision'
    fake.mkdir()
    (fake / '__init__.py').write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    result = _import_mmattn_with(f"""
        import sys, torch
        torch.__version__ = '2.13.0+cpu'
        sys.path.insert(0, {str(tmp_path)!r})
    """)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()
    message = result.stderr[result.stderr.index('ImportError: mmattn cannot start'):]
    assert 'torchvision' in message and '+cpu' in message
    assert 'python tools/setup_env.py' in message and 'torch===2.13.0' in message
    assert 'timm' not in '\n'.join(last[-3:])


def test_the_check_can_be_skipped_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    """For kernel work on a machine with another stack (mmcv without ops): an explicit opt-out,
    and the blocks that need no mmcv op still work."""
    monkeypatch.setenv('MMATTN_SKIP_STACK_CHECK', '1')
    code = textwrap.dedent("""
        import sys
        sys.modules['mmcv._ext'] = None
        import torch
        from mmattn.layers import PolarizedSelfAttention
        PolarizedSelfAttention(8)(torch.randn(1, 8, 4, 4))
        print('ok')
    """)
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith('ok')


def test_mmcv_without_ops_is_explained() -> None:
    result = _import_mmattn_with("""
        import sys
        sys.modules['mmcv._ext'] = None  # what an mmcv built without MMCV_WITH_OPS=1 lacks
    """)
    assert result.returncode != 0
    message = result.stderr[result.stderr.index('ImportError: mmattn cannot start'):]
    assert 'has no usable compiled ops' in message and 'MMCV_WITH_OPS=1' in message
    assert 'python tools/setup_env.py' in message


def test_collect_env_reports_the_stack() -> None:
    result = subprocess.run([sys.executable, '-m', 'mmattn.utils.collect_env'],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    assert 'mmcv ops: loaded' in result.stdout
    assert 'torch: 2.13.0 (pinned 2.13.0, ok)' in result.stdout
    assert 'mmattn kernels:' in result.stdout
    assert 'device:' in result.stdout


def test_version_is_exposed() -> None:
    import mmattn
    from mmattn.version import __version__
    assert mmattn.__version__ == __version__
    assert all(isinstance(p, int) for p in mmattn.version_info)
