"""tools/benchmark.py's host-overhead preset: every PSA form at [1, 8, 4, 4] against a 3x3
conv + BN + ReLU, one thread (the yardstick of issue 12's CPU goal)."""
from __future__ import annotations

import os.path as osp
import re
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_host_preset_reports_each_form_against_the_conv_block() -> None:
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'),
                             '--preset', 'host', '--iters', '2', '--warmup', '0'],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert 'CPU, 1 threads' in out
    assert re.search(r'\| conv3x3\+BN\+ReLU \| 1x8x4x4 \| training mode \| eager \|', out)
    summary = out[out.index('against a 3x3 conv + BN + ReLU'):]
    forms = re.findall(r'  PSA (\w+), (\w+), (eager|mmattn): (\d+\.\d)x', summary)
    assert {(v, m, impl) for v, m, impl, _ in forms} == {
        (v, m, impl) for v in ('paper', 'official') for m in ('parallel', 'sequential')
        for impl in ('eager', 'mmattn')}
    assert all(float(ratio) > 0 for *_, ratio in forms)
    assert 'compile' not in {row.split('|')[4].strip() for row in out.splitlines()
                             if row.startswith('| psa |')}
