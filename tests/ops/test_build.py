"""The install-time build of the kernels: ``setup.py`` compiles ``mmattn._C`` with its CUDA
sources under ``MMATTN_WITH_CUDA=1`` on a machine with nvcc and no GPU, and the result loads and
registers every op (its CPU kernels run here). Slow: a full nvcc build, a few minutes on two
cores."""
from __future__ import annotations

import glob
import os
import os.path as osp
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from mmattn.ops import build, extension

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
from ptx_noncoherent import findings  # noqa: E402
sys.path.pop(0)


def static_libstdcxx_compiler(directory) -> str:
    """A C++ compiler that links libstdc++ statically, as the lent GPU machines' ``$CXX`` does
    (``/opt/gcc/bin/g++``, 2026-11-27): the system ``g++`` with ``-static-libstdc++``."""
    path = osp.join(str(directory), 'g++-static-libstdcxx')
    with open(path, 'w') as f:
        f.write(f'#!/bin/sh\nexec {shutil.which("g++")} -static-libstdc++ "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def _static_libstdcxx() -> bool:
    """Linux, g++ and the static libstdc++ it would link with ``-static-libstdc++``."""
    if not sys.platform.startswith('linux') or shutil.which('g++') is None:
        return False
    found = subprocess.run(['g++', '-print-file-name=libstdc++.a'], capture_output=True,
                           text=True).stdout.strip()
    return osp.isabs(found) and osp.isfile(found)


STATIC_LIBSTDCXX = _static_libstdcxx()


@pytest.mark.slow
@pytest.mark.skipif(extension.cuda_toolkit() is None,
                    reason='needs a CUDA toolkit (nvcc and libcudart)')
def test_setup_py_builds_cuda_kernels_without_a_gpu(tmp_path) -> None:
    # built by a compiler that links libstdc++ statically where g++ can, as on the lent GPU
    # machines: the extension must still share torch's C++ runtime (extension.link_flags), or
    # its error messages lose their numbers (or crash the process)
    keep = tmp_path / 'nvcc'   # each CUDA source's PTX per architecture, kept by nvcc
    keep.mkdir()
    env = dict(os.environ, MMATTN_WITH_CUDA='1', TORCH_CUDA_ARCH_LIST='8.0;9.0',
               MAX_JOBS=str(os.cpu_count() or 2),
               NVCC_APPEND_FLAGS=f'--keep --keep-dir {keep}')
    if STATIC_LIBSTDCXX:
        env['CXX'] = static_libstdcxx_compiler(tmp_path)
    out = subprocess.run(
        [sys.executable, 'setup.py', 'build_ext', '--build-lib', str(tmp_path / 'lib'),
         '--build-temp', str(tmp_path / 'tmp')],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # no kernel spills registers or uses local memory on Ampere or Hopper (ptxas warns)
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if 'ptxas warning' in line]
    assert not warnings, '\n'.join(warnings)
    # no kernel reads through the non-coherent path memory it writes (its blocks' exchanges
    # across grid_sync and cluster_sync among them: tools/analysis/ptx_noncoherent.py)
    ptx = sorted(glob.glob(str(keep / '*.compute_*.ptx')))
    sources = extension.sources(with_cuda=True)
    assert len(ptx) == 2 * sum(src.endswith('.cu') for src in sources), ptx
    found = [f'{osp.basename(path)}: {f}' for path in ptx for f in findings(open(path).read())]
    assert not found, '\n'.join(found)
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
try:
    torch.ops.mmattn.outlook_unpool_add(torch.randn(2, 7, 9, 3), torch.randn(2, 3, 5, 3), 2)
except RuntimeError as e:
    assert '(2, 4, 5, 3)' in str(e) and '[2, 3, 5, 3]' in str(e), str(e)
else:
    raise AssertionError('outlook_unpool_add accepted a pooled map of the wrong shape')
print(extension.load_error() is None)
'''
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == 'True'


INTS_CPP = textwrap.dedent('''
    #include <ATen/ATen.h>
    #include <torch/library.h>
    at::Tensor shape_error(const at::Tensor& x) {
      TORCH_CHECK(false, "x has shape ", x.sizes(), " and ", x.dim(), " dimensions");
      return x;
    }
    TORCH_LIBRARY(mmattn_link_test, m) { m.def("shape_error(Tensor x) -> Tensor"); }
    TORCH_LIBRARY_IMPL(mmattn_link_test, CPU, m) { m.impl("shape_error", &shape_error); }
''')

# the JIT build (the flags after the objects), and a setuptools build given the flags in
# LDFLAGS (before the objects: tools/gpu_check.sh's build of mmcv's ops)
LINK_TEST_BUILDS = {
    'jit': '''
from torch.utils.cpp_extension import load
load('mmattn_link_test', [{source!r}], build_directory={directory!r},
     extra_ldflags=extension.link_flags(), is_python_module=False)
''',
    'setuptools_ldflags': '''
import glob, os, subprocess, sys
os.environ['LDFLAGS'] = ' '.join(extension.link_flags())
with open(os.path.join({directory!r}, 'setup.py'), 'w') as f:
    f.write("from setuptools import setup\\n"
            "from torch.utils.cpp_extension import BuildExtension, CppExtension\\n"
            "setup(name='link_test', cmdclass={{'build_ext': BuildExtension}}, ext_modules=["
            "CppExtension('link_test', [{source!r}])])\\n")
subprocess.run([sys.executable, 'setup.py', '-q', 'build_ext', '--build-lib', 'lib',
                '--build-temp', 'tmp'], cwd={directory!r}, check=True, capture_output=True)
torch.ops.load_library(glob.glob(os.path.join({directory!r}, 'lib', 'link_test*.so'))[0])
''',
}


@pytest.mark.skipif(not STATIC_LIBSTDCXX, reason='needs Linux, g++ and its libstdc++.a')
@pytest.mark.parametrize('how', sorted(LINK_TEST_BUILDS))
def test_extension_shares_torchs_cpp_runtime(tmp_path, how: str) -> None:
    """An op built with :func:`extension.link_flags` by a compiler that links libstdc++
    statically formats the numbers of its error messages (without the flags: Debian's g++ 12
    drops them, the GPU machines' g++ crashed the process)."""
    source = tmp_path / 'ints.cpp'
    source.write_text(INTS_CPP)
    code = '''
import torch
from mmattn.ops import extension
assert extension.link_flags(), 'no libstdc++ found in this process'
''' + LINK_TEST_BUILDS[how].format(source=str(source), directory=str(tmp_path)) + '''
try:
    torch.ops.mmattn_link_test.shape_error(torch.zeros(2, 3))
except RuntimeError as e:
    print(str(e).splitlines()[0])
'''
    env = dict(os.environ, CXX=static_libstdcxx_compiler(tmp_path))
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith('x has shape [2, 3] and 2 dimensions'), run.stdout


def test_sources_and_flags() -> None:
    cpu, cuda = extension.sources(False), extension.sources(True)
    assert {osp.basename(s) for s in cuda} - {osp.basename(s) for s in cpu} == \
        {'column_sums_cuda.cu', 'outlook_cuda.cu', 'psa_cuda.cu', 'psa_cuda_double.cu',
         'psa_cuda_half.cu', 'psa_cuda_bfloat16.cu'}
    assert {'module.cpp', 'cuda_ops.cpp'} <= {osp.basename(s) for s in cpu}
    assert '-DWITH_CUDA' in extension.compile_flags(True)['cxx']
    assert '-DWITH_CUDA' not in extension.compile_flags(False)['cxx']


def test_cuda_sources_leave_the_registration_to_a_cpp_file() -> None:
    """torch/library.h costs each CUDA source seconds of nvcc's front ends (docs/kernels.md,
    "Build time"): the ops' CUDA implementations are registered in cuda_ops.cpp, compiled by the
    host compiler alone (and empty without WITH_CUDA)."""
    for src in extension.sources(True):
        if src.endswith('.cu'):
            with open(src) as f:
                text = f.read()
            assert 'torch/library.h' not in text and 'TORCH_LIBRARY' not in text, src
    with open(osp.join(extension.CSRC, 'cuda_ops.cpp')) as f:
        text = f.read()
    assert text.index('#ifdef WITH_CUDA') < text.index('TORCH_LIBRARY_IMPL(mmattn, CUDA')


def test_want_cuda_follows_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MMATTN_WITH_CUDA', '0')
    assert extension.want_cuda() is False
    monkeypatch.setenv('MMATTN_WITH_CUDA', '1')
    assert extension.want_cuda() is (extension.cuda_toolkit() is not None)


def test_built_kernels_raise_errors_with_their_numbers(cpu_kernels: str) -> None:
    assert build.check_error_messages(with_cuda=False) is None


def test_build_command_reports_mangled_error_messages(monkeypatch: pytest.MonkeyPatch,
                                                      capsys) -> None:
    """The build command fails, naming the compiler, where the check's child process crashed
    or printed a message without its numbers (as the C++ runtime mix of the GPU machines did)."""
    monkeypatch.setattr(extension, 'build_jit', lambda **kwargs: 'JIT (CPU kernels only)')
    monkeypatch.setenv('CXX', '/opt/gcc/bin/g++')
    for rc, stdout in ((-11, ''), (0, 'outlook_unpool_add: pooled must be (B, ...) = (, , , )')):
        monkeypatch.setattr(extension.subprocess, 'run', lambda *a, _rc=rc, _out=stdout, **k:
                            subprocess.CompletedProcess(a, _rc, _out, 'Segmentation fault'))
        assert build.main(['--cpu-only']) == 1
        err = capsys.readouterr().err
        assert f'exit status {rc}' in err and 'CXX=/opt/gcc/bin/g++' in err, err
        assert "a C++ runtime of its own beside torch's" in err


def test_build_command_reports_failure(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fail(**kwargs):
        raise RuntimeError('Error building extension: nvcc not found')

    monkeypatch.setattr(extension, 'build_jit', fail)
    assert build.main(['--cpu-only']) == 1
    assert 'the build failed: Error building extension: nvcc not found' in capsys.readouterr().err


NONCOHERENT_CU = textwrap.dedent('''
    // reads through the read-only data cache what it writes: the hazard
    __global__ void shifts(float* p, int n) {
      const int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i + 1 < n) p[i + 1] = __ldg(p + i) * 2.f;
    }
    // the same through an atomic add, the pointer's loads beside another's
    __global__ void accumulates(const float* __restrict__ in, float* __restrict__ out, int n) {
      const int i = threadIdx.x;
      if (i < n) atomicAdd(out + i % 4, __ldg(out + i % 8) + in[i]);
    }
    // fine: the read-only pointers are never written (one a field of a by-value struct)
    struct Pair { const float* in; float* out; };
    __global__ void fields(Pair q, int n) {
      const int i = threadIdx.x;
      if (i < n) q.out[i] = __ldg(q.in + i);
    }
    __global__ void copies(const float* __restrict__ in, float* __restrict__ out, int n) {
      const int i = threadIdx.x;
      if (i < n) out[i] = in[i] + __ldg(in + i + 1);
    }
''')


@pytest.mark.skipif(extension.cuda_toolkit() is None,
                    reason='needs a CUDA toolkit (nvcc and libcudart)')
def test_ptx_check_finds_noncoherent_loads_of_written_memory(tmp_path) -> None:
    """tools/analysis/ptx_noncoherent.py, which the build test runs over mmattn's PTX, on
    kernels written to have the hazard and kernels without it, compiled by nvcc."""
    source = tmp_path / 'kernels.cu'
    source.write_text(NONCOHERENT_CU)
    nvcc = osp.join(extension.cuda_toolkit(), 'bin', 'nvcc')
    subprocess.run([nvcc, '-arch=sm_90', '-O3', '-ptx', str(source), '-o',
                    str(tmp_path / 'kernels.ptx')], check=True, timeout=300)
    found = findings((tmp_path / 'kernels.ptx').read_text())
    assert sorted((f.kernel, f.pointer, f.stores, f.nc_loads) for f in found) == [
        ('_Z11accumulatesPKfPfi', 'param_1', 1, 1), ('_Z6shiftsPfi', 'param_0', 1, 1)], found
