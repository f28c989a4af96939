"""tools/benchmark.py: the host-overhead preset (every PSA form at [1, 8, 4, 4] against a 3x3
conv + BN + ReLU, one thread: the yardstick of issue 12's CPU goal), several shapes in one call,
the per-case profile (``--kernels``) and ``--cudnn-benchmark``."""
from __future__ import annotations

import os.path as osp
import re
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_host_preset_reports_each_form_against_the_conv_block() -> None:
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
                             '--preset', 'host', '--iters', '2', '--warmup', '0'],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert 'CPU, 1 threads' in out
    assert 'cudnn.benchmark off' in out  # the default
    assert re.search(r'\| conv3x3\+BN\+ReLU \| 1x8x4x4 \| training mode \| eager \|', out)
    summary = out[out.index('against a 3x3 conv + BN + ReLU'):]
    forms = re.findall(r'  PSA (\w+), (\w+), (eager|mmattn): (\d+\.\d)x', summary)
    assert {(v, m, impl) for v, m, impl, _ in forms} == {
        (v, m, impl) for v in ('paper', 'official') for m in ('parallel', 'sequential')
        for impl in ('eager', 'mmattn')}
    assert all(float(ratio) > 0 for *_, ratio in forms)
    assert 'compile' not in {row.split('|')[4].strip() for row in out.splitlines()
                             if row.startswith('| psa |')}


def test_kernels_option_profiles_each_shape() -> None:
    """``--shape`` takes several shapes and ``--kernels N`` prints, per case, the profiler's
    table of mmattn's N costliest operators (on the CPU: by host time)."""
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
                             '--op', 'psa', '--mode', 'parallel', '--no-compile',
                             '--shape', '1,8,4,4', '2,8,4,8', '--iters', '1', '--warmup', '0',
                             '--threads', '1', '--kernels', '4', '--cudnn-benchmark'],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert 'cudnn.benchmark on' in out
    titles = re.findall(r'psa (\S+) paper, parallel, mmattn forward \+ backward: top 4 by self '
                        r'host time over 3 runs', out)
    assert titles == ['1x8x4x4', '2x8x4x8']
    for table in out.split('mmattn forward + backward: top 4')[1:]:
        table = table[:table.index('Self CPU time total')]
        assert 'Name' in table and '# of Calls' in table
        ops = re.findall(r'^\s+(\S+::\S+)\s', table, re.M)
        assert 1 <= len(ops) <= 4, table
    rows = [row.split('|') for row in out.splitlines() if row.startswith('| psa |')]
    assert list(dict.fromkeys(r[2].strip() for r in rows)) == ['1x8x4x4', '2x8x4x8']
    header = next(row.split('|') for row in out.splitlines() if row.startswith('| op |'))
    host = header.index(' fwd+bwd host CPU ms ')   # > 0 on the CPU: the host does the work
    assert all(float(r[host]) > 0 for r in rows), rows
    for shape in ('1x8x4x4', '2x8x4x8'):
        assert {'eager', 'mmattn'} <= {r[4].strip() for r in rows if r[2].strip() == shape}


@pytest.mark.cuda
def test_cuda_graph_option_times_replays() -> None:
    """``--cuda-graph``: each implementation's forward and forward + backward captured once and
    timed as replays (the kernels without a call's host work), eager and mmattn both."""
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
                             '--op', 'psa', '--mode', 'parallel', '--no-compile', '--device',
                             'cuda', '--shape', '2,16,8,8', '--iters', '2', '--warmup', '1',
                             '--cuda-graph'],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'each call a CUDA graph replay' in result.stdout
    rows = [row.split('|') for row in result.stdout.splitlines() if row.startswith('| psa |')]
    assert {'eager', 'mmattn'} <= {r[4].strip() for r in rows}, result.stdout[-3000:]
    assert all(float(r[6]) > 0 for r in rows)


def test_cuda_graph_option_needs_cuda() -> None:
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
                             '--op', 'psa', '--device', 'cpu', '--cuda-graph'],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert '--cuda-graph needs a CUDA device' in result.stderr
