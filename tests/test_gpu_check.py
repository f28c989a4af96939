"""The one-call GPU check (tools/gpu_check.sh) and its sanitizer program, as far as a machine
without a GPU can check them."""
from __future__ import annotations

import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_script_parses() -> None:
    result = subprocess.run(['bash', '-n', osp.join(ROOT, 'tools', 'gpu_check.sh')],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='the no-GPU message')
def test_sanitizer_program_refuses_without_a_gpu() -> None:
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'sanitize_kernels.py')],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        'sanitize_kernels: needs a CUDA GPU; none found'
