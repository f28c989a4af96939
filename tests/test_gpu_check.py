"""The one-call GPU check (tools/gpu_check.sh) and its sanitizer program, as far as a machine
without a GPU can check them (and the emulation's AddressSanitizer run, which parses)."""
from __future__ import annotations

import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.parametrize('script', ['gpu_check.sh', 'analysis/emulated_asan.sh'])
def test_script_parses(script: str) -> None:
    result = subprocess.run(['bash', '-n', osp.join(ROOT, 'tools', script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason='the no-GPU message')
def test_sanitizer_program_refuses_without_a_gpu() -> None:
    result = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'sanitize_kernels.py')],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        'sanitize_kernels: needs a CUDA GPU; none found'


FAKE_PYTHON = r'''#!/bin/bash
# stands in for the GPU machine's python3: logs each call with what the script exported
echo "python3 $* | MMCV_WITH_OPS=${MMCV_WITH_OPS:-} PYTHONPATH=${PYTHONPATH:-}" \
  "MMATTN_PSA_MAX_SPLITS=${MMATTN_PSA_MAX_SPLITS:-}" \
  "MMATTN_PSA_GLUE_BLOCKS=${MMATTN_PSA_GLUE_BLOCKS:-}" \
  "MMATTN_KERNELS_LIB=${MMATTN_KERNELS_LIB:-}" >> "$CALLS"
case "$*" in
  *"mmattn.ops.build --cuda"*)  # a prebuilt library refused where PREBUILT_REFUSED is set
    [ -n "${MMATTN_KERNELS_LIB:-}" ] && [ -n "${PREBUILT_REFUSED:-}" ] && exit 1;;
  *"pip wheel"*) mkdir -p "$WHEEL_DIR"; touch "$WHEEL_DIR/mmcv-2.1.0-cp312-cp312-linux_x86_64.whl";;
  *pytest*) exit 3;;
  *cuda-graph*) ;;
  *benchmark_model*) [ -n "${MMATTN_PSA_MAX_SPLITS:-}${MMATTN_PSA_GLUE_BLOCKS:-}" ] || sleep 20;;
esac
exit 0
'''


def test_script_stages_on_a_fake_gpu_machine(tmp_path) -> None:
    """The order the GPU machine needs (mmcv before anything imports mmattn, mmcv's ops before
    mmseg's model benchmark, this tree on PYTHONPATH for tools/*.py), a failed stage not
    stopping the next, a stage cut at the deadline counted as failed, SPLIT_SWEEP's and
    GLUE_SWEEP's model benchmarks, one per value, after the first, and GRAPH_ARGS's (the
    CUDA-graph mode) before the eager one (set to '', none); python3, nvidia-smi and
    compute-sanitizer are stand-ins that log their calls."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3').write_text(FAKE_PYTHON)
    (bin_dir / 'nvidia-smi').write_text('#!/bin/bash\necho "Fake GPU, 1 MiB"\n')
    (bin_dir / 'compute-sanitizer').write_text(   # racecheck: a warning-severity hazard, rc 0
        '#!/bin/bash\necho "compute-sanitizer $*" >> "$CALLS"\n'
        'case "$*" in *racecheck*) echo "========= Error: Race reported between Read access'
        ' at nvjet_sm90_tst_32x64_64x16_4x1_v_bz_splitK_NTN+0xb30 [48 hazards]"\n'
        '  [ -z "$MMATTN_RACE" ] || echo "========= Warning: Race reported between Read access'
        ' at void fwd_reduce_kernel<float, float, 4>()+0x40 [16 hazards]";; esac\n')
    (bin_dir / 'ncu').write_text('#!/bin/bash\necho "ncu $*" >> "$CALLS"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    calls = tmp_path / 'calls'
    script = osp.join(ROOT, 'tools', 'gpu_check.sh')
    script_text = open(script).read()
    assert '/tmp/mmcv_ops' in script_text   # where the fake pip wheel must put mmcv's wheel
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', CALLS=str(calls),
               MMATTN_RACE='1',
               WHEEL_DIR='/tmp/mmcv_ops', OUT=str(tmp_path / 'out'), DEADLINE='60',
               PREBUILT=str(tmp_path / 'none' / 'mmattn_kernels.so'),
               LIMIT_model_benchmark='2', MIN_STAGE_S='1', SPLIT_SWEEP='64 16',
               GLUE_SWEEP='1 8',
               GRAPH_ARGS='--cuda-graph --dtypes float32',
               NCU_ARGS='--ops paper-parallel --shapes 16,256,128,128')
    result = subprocess.run(['bash', script], capture_output=True, text=True, env=env,
                            timeout=120)
    log = calls.read_text().splitlines()
    order = [next(i for i, line in enumerate(log) if key in line)
             for key in ('mmcv-2.1.0.tar.gz', 'mmattn.ops.build', 'pytest',
                         'uninstall -q -y mmcv-lite', 'mmcv_ops/mmcv-2.1.0',
                         '--cuda-graph --dtypes float32', 'benchmark_model.py --iters',
                         'MAX_SPLITS=64', 'MAX_SPLITS=16', 'GLUE_BLOCKS=1',
                         'GLUE_BLOCKS=8', '--tool memcheck',
                         'benchmark.py --preset', 'ncu -k', '--preset host-gpu',
                         '--tool racecheck')]
    assert order == sorted(order), log
    assert 'MMCV_WITH_OPS=0' in log[order[0]]          # mmcv without its ops, first
    assert all(f'PYTHONPATH={ROOT}' in line for line in log[order[1]:]
               if line.startswith('python3')), log
    assert all(line.endswith('tools/sanitize_kernels.py') for line in log
               if line.startswith('compute-sanitizer')), log   # SANITIZE_ARGS empty: all
    # the pytest stage failed, the model benchmark outran its limit and racecheck reported a
    # hazard (at warning severity, its exit status 0): 3 failed stages
    assert result.returncode == 3, result.stdout + result.stderr
    assert '== cuda_tests: rc 3' in result.stdout
    assert '== model_benchmark: rc 124' in result.stdout
    assert '== racecheck: rc 0' in result.stdout
    assert "== racecheck: hazards reported in mmattn's kernels" in result.stdout
    log_text = (tmp_path / 'out' / 'model_benchmark.log').read_text()
    assert 'stopped at its limit of 2 s' in log_text
    assert '== gpu_check: 3 failed stage(s)' in result.stdout
    ncu = next(line for line in log if line.startswith('ncu '))
    assert ncu == ("ncu -k regex:^(fwd|bwd|value|release|outlook)_ --section SpeedOfLight "
                   "--section Occupancy --section LaunchStats --section SchedulerStats "
                   "--section WarpStateStats --section MemoryWorkloadAnalysis python3 "
                   "tools/sanitize_kernels.py --ops paper-parallel --shapes 16,256,128,128"), ncu
    for stage in ('splits_64', 'splits_16', 'glue_1', 'glue_8'):
        assert f'== {stage}: rc 0' in result.stdout
    assert '== model_graph: rc 0' in result.stdout
    for variable in ('MAX_SPLITS', 'GLUE_BLOCKS'):   # the sweeps' calls, 2 each
        sweeps = [line for line in log if re.search(variable + r'=\d', line)]
        assert len(sweeps) == 2 and all('--forms psa_p-official,paper-parallel' in line
                                        for line in sweeps), log
    assert 'pytest tests/ops tests/models/test_volo.py tests/test_benchmark.py -q -m cuda' \
        in calls.read_text()
    calls.unlink()
    env.update(GRAPH_ARGS='', SPLIT_SWEEP='', NCU_ARGS='', CUDA_TESTS='tests/ops')
    result = subprocess.run(['bash', script], capture_output=True, text=True, env=env,
                            timeout=120)
    assert 'model_graph' not in result.stdout and '--cuda-graph' not in calls.read_text()
    assert '== model_benchmark:' in result.stdout
    assert '== ncu' not in result.stdout and 'ncu ' not in calls.read_text()
    assert '== mmcv_build' in result.stdout
    assert 'pytest tests/ops -q -m cuda' in calls.read_text()   # CUDA_TESTS's paths only
    calls.unlink()
    # the kernels' stages alone: mmcv's ops not built; a hazard in cuBLAS alone fails nothing
    env.update(MMCV_OPS='0', MMATTN_RACE='')
    result = subprocess.run(['bash', script], capture_output=True, text=True, env=env,
                            timeout=120)
    assert "== racecheck: 1 hazard report(s), none in mmattn's kernels" in result.stdout
    assert '== mmcv_build' not in result.stdout and 'pip wheel' not in calls.read_text()
    assert 'mmattn.ops.build' in calls.read_text()
    assert 'kernels_prebuilt' not in result.stdout and '== kernels_build: rc 0' in result.stdout


def test_script_loads_prebuilt_kernels_where_they_pass_their_check(tmp_path) -> None:
    """Kernels that --prepare built (.whl/kernels/), or those the caller's MMATTN_KERNELS_LIB
    names: checked by the build command given MMATTN_KERNELS_LIB, then exported to every later
    stage, with no build; where the check fails (another torch, other sources), compiled as
    before, the variable unset."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3').write_text(FAKE_PYTHON)
    for tool in ('nvidia-smi', 'compute-sanitizer'):
        (bin_dir / tool).write_text('#!/bin/bash\nexit 0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    prebuilt = tmp_path / 'kernels' / 'mmattn_kernels.so'
    prebuilt.parent.mkdir()
    prebuilt.write_bytes(b'')
    calls = tmp_path / 'calls'
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', CALLS=str(calls),
               OUT=str(tmp_path / 'out'), DEADLINE='60', MIN_STAGE_S='1', MMCV_OPS='0',
               GRAPH_ARGS='', LIMIT_model_benchmark='2', PREBUILT=str(prebuilt))
    script = osp.join(ROOT, 'tools', 'gpu_check.sh')
    own = tmp_path / 'own' / 'mmattn_kernels.so'
    for refused, callers in (('', ''), ('1', ''), ('', str(own)), ('1', str(own))):
        env.update(PREBUILT_REFUSED=refused, MMATTN_KERNELS_LIB=callers)
        checked = callers or prebuilt   # the caller's library first
        result = subprocess.run(['bash', script], capture_output=True, text=True, env=env,
                                timeout=120)
        log = calls.read_text().splitlines()
        calls.unlink()
        builds = [line for line in log if 'mmattn.ops.build --cuda' in line]
        later = [line for line in log if line.startswith(('python3 -m pytest', 'python3 tools/'))]
        assert later, log
        assert f'MMATTN_KERNELS_LIB={checked}' in builds[0], builds
        if refused:
            assert '== kernels_prebuilt: not used, compiled instead' in result.stdout
            assert builds[1].endswith('MMATTN_KERNELS_LIB=') and len(builds) == 2, builds
            assert '== kernels_build: rc 0' in result.stdout
            assert all(line.endswith('MMATTN_KERNELS_LIB=') for line in later), later
        else:
            assert f'== kernels_prebuilt: using {checked}' in result.stdout
            assert len(builds) == 1 and '== kernels_build' not in result.stdout, builds
            assert all(line.endswith(f'MMATTN_KERNELS_LIB={checked}') for line in later), later
