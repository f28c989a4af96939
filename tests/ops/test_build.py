"""The install-time build of the kernels: ``setup.py`` compiles ``mmattn._C`` with its CUDA
sources under ``MMATTN_WITH_CUDA=1`` on a machine with nvcc and no GPU, and the result loads and
registers every op (its CPU kernels run here). Slow: a full nvcc build, a few minutes on two
cores."""
from __future__ import annotations

import glob
import os
import os.path as osp
import subprocess
import sys

import pytest

from mmattn.ops import build, extension

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.skipif(extension.cuda_toolkit() is None,
                    reason='needs a CUDA toolkit (nvcc and libcudart)')
def test_setup_py_builds_cuda_kernels_without_a_gpu(tmp_path) -> None:
    env = dict(os.environ, MMATTN_WITH_CUDA='1', TORCH_CUDA_ARCH_LIST='8.0;9.0',
               MAX_JOBS=str(os.cpu_count() or 2))
    out = subprocess.run(
        [sys.executable, 'setup.py', 'build_ext', '--build-lib', str(tmp_path / 'lib'),
         '--build-temp', str(tmp_path / 'tmp')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # no kernel spills registers or uses local memory on Ampere or Hopper (ptxas warns)
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if 'ptxas warning' in line]
    assert not warnings, '\n'.join(warnings)
    (library,) = glob.glob(str(tmp_path / 'lib' / 'mmattn' / '_C*.so'))
    code = f'''
import torch, mmattn
from mmattn.ops import extension, outlook_attention, outlook_attention_reference
torch.ops.load_library({library!r})
extension.reset_state('setup.py build')
ops = sorted(extension.SCHEMAS)
cpu_only = ('psa_block_fwd', 'psa_block_bwd')   # the fused CPU PSA block
composite = ('linear', 'layer_norm')   # ATen's ops and mmattn's, every device
assert all(extension.has_kernel(op, 'cuda') for op in ops
           if op not in cpu_only + composite), ops
assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f'mmattn::{{op}}',
                                                          'CompositeExplicitAutograd')
           for op in composite)
assert all(extension.has_kernel(op, 'cpu') for op in ops
           if op.startswith('outlook') or op in cpu_only)
assert not extension.has_kernel('psa_block_cuda_fwd', 'cpu')
v = torch.randn(2, 6, 5, 8, dtype=torch.float64)
a = torch.randn(2, 3, 3, 2, 9, 9, dtype=torch.float64).softmax(-1)
kw = dict(kernel_size=3, padding=1, stride=2)
torch.testing.assert_close(outlook_attention(v, a, backend='cpu', **kw),
                           outlook_attention_reference(v, a, **kw), rtol=1e-12, atol=1e-12)
print(extension.load_error() is None)
'''
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == 'True'


def test_sources_and_flags() -> None:
    cpu, cuda = extension.sources(False), extension.sources(True)
    assert {osp.basename(s) for s in cuda} - {osp.basename(s) for s in cpu} == \
        {'column_sums_cuda.cu', 'outlook_cuda.cu', 'psa_cuda.cu'}
    assert 'module.cpp' in {osp.basename(s) for s in cpu}
    assert '-DWITH_CUDA' in extension.compile_flags(True)['cxx']
    assert '-DWITH_CUDA' not in extension.compile_flags(False)['cxx']


def test_want_cuda_follows_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MMATTN_WITH_CUDA', '0')
    assert extension.want_cuda() is False
    monkeypatch.setenv('MMATTN_WITH_CUDA', '1')
    assert extension.want_cuda() is (extension.cuda_toolkit() is not None)


def test_build_command_reports_failure(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fail(**kwargs):
        raise RuntimeError('Error building extension: nvcc not found')

    monkeypatch.setattr(extension, 'build_jit', fail)
    assert build.main(['--cpu-only']) == 1
    assert 'the build failed: Error building extension: nvcc not found' in capsys.readouterr().err
