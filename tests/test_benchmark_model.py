"""tools/benchmark_model.py: whole HRNet-OCR training steps, stock against the PSA forms,
built from the real configs in a process where mmpose, mmdet and mmpretrain cannot be
imported (the GPU machines have none of them)."""
from __future__ import annotations

import json
import os
import os.path as osp
import subprocess
import sys
import types

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'benchmark_model.py')

# run the tool with mmpose, mmdet and mmpretrain made unimportable, then report what got
# imported
_RUN_WITHOUT_MMPOSE = """
import importlib.abc, runpy, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('mmpose', 'mmdet', 'mmpretrain'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None

sys.meta_path.insert(0, Missing())
tool = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(tool, run_name='__main__')
print('loaded:', ','.join(sorted({m.split('.')[0] for m in sys.modules}
                                 & {'mmseg', 'mmpose', 'mmdet', 'mmpretrain'})))
"""


def _table(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith('| ')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[1:]]


@pytest.mark.slow
def test_training_steps_of_stock_and_psa_forms_with_mmseg_only() -> None:
    result = subprocess.run(
        [sys.executable, '-c', _RUN_WITHOUT_MMPOSE, TOOL, '--shape', '1,32,64',
         '--forms', 'psa_s-official,paper-parallel', '--backends', 'auto,reference,cuda',
         '--iters', '1', '--warmup', '0', '--threads', '1', '--switches', 'all'],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.strip().splitlines()[-1] == 'loaded: mmseg'
    assert 'batch 1 x 3x32x64' in out
    # the CUDA backend cannot run on CPU tensors: that is said, not run
    for form, op in (('psa_s-official', 'psa_official'), ('paper-parallel', 'psa_paper')):
        assert f"skipped: {form} with backend='cuda': {op}: backend='cuda' requested but it " \
            "declined: input is on cpu" in out
        # the kernels' defaults switched off are CUDA rows: said, not run
        for backend, runs_on in (('auto', 'folded'), ('reference', 'reference')):
            assert f'skipped: {form} ({backend}) with its kernel defaults switched off: its ' \
                f"blocks run on '{runs_on}' here, not on the CUDA kernels" in out
    rows = _table(out)
    runs = [(row[0], row[1]) for row in rows]
    assert runs[:5] == [('stock', '-'), ('psa_s-official', 'auto'),
                        ('psa_s-official', 'reference'), ('paper-parallel', 'auto'),
                        ('paper-parallel', 'reference')]
    assert rows[0][4] == '1.00x'
    for row in rows:
        assert row[2] == 'float32'
        assert float(row[3]) > 0 and float(row[6]) > 0   # step ms, host ms
        assert row[5] == '-' and row[7] == '-'           # CUDA-only columns on a CPU run


# run the tool's main() once per argument list (sys.argv[1:], each a JSON list) in one process,
# printing each exit code and what it wrote to stderr as a JSON line
_RUN_EACH = """
import contextlib, io, json, runpy, sys

tool = runpy.run_path(sys.argv[1])
for argv in sys.argv[2:]:
    sys.argv = [sys.argv[0]] + json.loads(argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            tool['main']()
            code = 0
        except SystemExit as e:
            code = e.code
    print(json.dumps([code, err.getvalue()]))
"""


def test_bad_arguments_name_the_option() -> None:
    """Each bad argument list exits with argparse's usage error (2), naming the option; all
    of them in one process (the tool's imports, torch and mmseg, once)."""
    cases = [(['--forms', 'psa_x'], "--forms: unknown ['psa_x']"),
             (['--shape', '2,64'], "argument --shape: takes batch,height,width (3 positive "
                                   "integers), got '2,64'"),
             (['--iters', '0'], "argument --iters: must be an integer >= 1, got '0'"),
             (['--dtypes', 'float16'], "--dtypes: unknown ['float16']"),
             (['--cuda-graph', '--device', 'cpu'], '--cuda-graph needs --device cuda'),
             (['--switches', 'register-tiles,tf32'],
              "--switches: unknown ['tf32']; choose from ['register-tiles', 'glue-clusters', "
              "'cooperative', 'value-tiles', 'fused-m'] or all")]
    result = subprocess.run(
        [sys.executable, '-c', _RUN_EACH, TOOL] + [json.dumps(argv) for argv, _ in cases],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('[')]
    assert len(lines) == len(cases), result.stdout[-3000:]
    for (argv, expected), (code, stderr) in zip(cases, lines):
        assert code == 2, (argv, stderr)
        assert expected in stderr, (argv, stderr[-2000:])


@pytest.mark.cuda
@pytest.mark.parametrize('graph', [False, True], ids=['eager', 'cuda-graph'])
def test_switched_kernel_defaults_run_as_rows_of_their_own(graph: bool) -> None:
    """``--switches``: a copy of each PSA model per kernel default switched off, its variable set
    around its steps (around the capture, for ``--cuda-graph``, whose models share one memory
    pool), a row each with the variable in its backend column; with PSA_s's M as a GEMM and
    PSA_p's spatial reduction and apply pass in two launches, each such model launches more
    kernels per block than its default."""
    result = subprocess.run(
        [sys.executable, TOOL, '--device', 'cuda', '--shape', '1,64,128', '--dtypes', 'bfloat16',
         '--forms', 'psa_s-official,psa_p-official', '--backends', 'auto', '--iters', '1',
         '--warmup', '1', '--switches', 'fused-m,cooperative'] + (['--cuda-graph'] * graph),
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(row[0], row[1]): row for row in _table(result.stdout)}
    if ('psa_s-official', 'auto; MMATTN_PSA_FUSED_M=0') not in rows:
        pytest.skip('the PSA kernels are not built for CUDA here: ' + result.stdout[-2000:])
    assert "skipped: psa_s-official (auto) with MMATTN_PSA_COOPERATIVE=0: its default does " \
        'not apply to this form or GPU' in result.stdout
    for form, variable in (('psa_s-official', 'MMATTN_PSA_FUSED_M'),
                           ('psa_p-official', 'MMATTN_PSA_COOPERATIVE')):
        default, switched = rows[(form, 'auto')], rows[(form, f'auto; {variable}=0')]
        assert float(switched[3]) > 0, switched
        assert float(switched[-1]) > float(default[-1]), (default, switched)


def test_graph_steps_share_a_pool_switch_around_the_capture_and_start_afresh(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``--cuda-graph``'s captures (CUDA only, so stood in for here): one memory pool for the
    models' graphs, each switched model's variable set during its capture and unset after, and
    after a capture that fails the model left out (said) and the next captures in a fresh
    pool."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        import benchmark_model as tool
    finally:
        sys.path.pop(0)
    fused_m = next(s for s in tool.PSA_SWITCHES if s.key == 'fused-m')
    monkeypatch.delenv(fused_m.variable, raising=False)
    pools = iter(['pool 1', 'pool 2', 'pool 3'])
    monkeypatch.setattr(tool.torch.cuda, 'graph_pool_handle', lambda: next(pools))
    captures = []

    def capture(fn, device, warmup, reset=None, pool=None):  # graph_replay's stand-in
        captures.append((os.environ.get(fused_m.variable), pool))
        if len(captures) == 2:
            raise RuntimeError('operation not permitted when stream is capturing')
        return lambda: None

    monkeypatch.setattr(tool, 'graph_replay', capture)

    class Net(torch.nn.Module):
        def data_preprocessor(self, batch: dict, training: bool) -> dict:
            return batch

    def model(form: str, backend: str, switch=None):
        optim = types.SimpleNamespace(zero_grad=lambda: None)
        return tool.Model(form, backend, Net(), optim, 0 if form == 'stock' else 104, None,
                          switch)

    models = [model('stock', '-'), model('psa_s-official', 'auto', fused_m),
              model('paper-sequential', 'auto', fused_m), model('psa_s-official', 'auto')]
    host = {m.label: [] for m in models}
    steps = tool.graph_steps(models, {}, torch.bfloat16, torch.device('cpu'), host, 2)
    assert captures == [(None, 'pool 1'), ('0', 'pool 1'), ('0', 'pool 2'), (None, 'pool 2')]
    assert list(steps) == ['stock', 'paper-sequential (auto; MMATTN_PSA_FUSED_M=0)',
                           'psa_s-official (auto)']
    assert fused_m.variable not in os.environ
    out = capsys.readouterr().out
    assert 'skipped: psa_s-official (auto; MMATTN_PSA_FUSED_M=0), bfloat16: its step did not ' \
        'capture in a CUDA graph: operation not permitted when stream is capturing' in out
    steps['stock']()
    assert len(host['stock']) == 1   # a replay's host time
