"""tools/benchmark.py: the host-overhead preset (every PSA form at [1, 8, 4, 4] against a 3x3
conv + BN + ReLU, one thread: the yardstick of issue 12's CPU goal), several shapes in one call,
the per-case profile (``--kernels``) and ``--cudnn-benchmark``."""
from __future__ import annotations

import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run_benchmark(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python tools/benchmark.py *args`` from the repository root, its output captured."""
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def benchmark_module():
    """tools/benchmark.py imported as a module (its helpers)."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    return benchmark


def impl_rows(stdout: str, op: str) -> dict[str, list[str]]:
    """The op's rows of the benchmark's table by implementation: each row's cells (split on
    '|', as printed)."""
    return {r.split('|')[4].strip(): r.split('|') for r in stdout.splitlines()
            if r.startswith(f'| {op} |')}


def test_host_preset_reports_each_form_against_the_conv_block() -> None:
    """``--preset host``: each PSA form's implementations and the yardstick (a 3x3 conv + BN +
    ReLU) timed in one round-robin per form, each implementation's ratio to that form's
    yardstick."""
    result = run_benchmark('--preset', 'host', '--iters', '2', '--warmup', '0')
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert 'CPU, 1 threads' in out
    assert 'cudnn.benchmark off' in out  # the default
    rows = [[c.strip() for c in row.split('|')[1:-1]] for row in out.splitlines()
            if row.startswith('| psa |')]
    header = next([c.strip() for c in row.split('|')[1:-1]] for row in out.splitlines()
                  if row.startswith('| op |'))
    # (the speedups and the last column, the error)
    blank = [header.index('fwd speedup'), header.index('fwd+bwd speedup'), -1]
    kernels = header.index('fwd+bwd kernels ms (launches)')
    assert all(r[kernels] == '-' for r in rows)   # CUDA's kernels only
    yardsticks = {r[2]: float(r[5]) for r in rows if r[3] == 'conv3x3+BN+ReLU (yardstick)'}
    assert set(yardsticks) == {'paper, parallel', 'paper, sequential', 'official, parallel',
                               'official, sequential'}
    assert all(r[i] == '-' for r in rows if r[3].endswith('(yardstick)') for i in blank)
    summary = out[out.index('against a 3x3 conv + BN + ReLU'):]
    forms = re.findall(r'  PSA (\w+), (\w+), (eager|mmattn): (\d+\.\d\d)x '
                       r'\(the yardstick (\d+\.\d+) ms\)', summary)
    assert {(v, m, impl) for v, m, impl, *_ in forms} == {
        (v, m, impl) for v in ('paper', 'official') for m in ('parallel', 'sequential')
        for impl in ('eager', 'mmattn')}
    for v, m, impl, ratio, base in forms:
        assert float(ratio) > 0
        # the form's own yardstick: the table rounds it to 0.01 ms, the summary to 0.001 ms
        assert abs(float(base) - yardsticks[f'{v}, {m}']) <= 0.005 + 0.0005 + 1e-9
    assert 'compile' not in {r[3] for r in rows}


def test_kernels_option_profiles_each_shape() -> None:
    """``--shape`` takes several shapes and ``--kernels N`` prints, per case, the profiler's
    table of mmattn's N costliest operators (on the CPU: by host time)."""
    result = run_benchmark('--op', 'psa', '--mode', 'parallel', '--no-compile', '--shape',
                           '1,8,4,4', '2,8,4,8', '--iters', '1', '--warmup', '0', '--threads', '1',
                           '--kernels', '4', '--cudnn-benchmark')
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
    result = run_benchmark('--op', 'psa', '--mode', 'parallel', '--no-compile', '--device', 'cuda',
                           '--shape', '2,16,8,8', '--iters', '2', '--warmup', '1', '--cuda-graph')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'each call a CUDA graph replay' in result.stdout
    rows = [row.split('|') for row in result.stdout.splitlines() if row.startswith('| psa |')]
    assert {'eager', 'mmattn'} <= {r[4].strip() for r in rows}, result.stdout[-3000:]
    assert all(float(r[6]) > 0 for r in rows)
    # the kernels a replayed forward + backward runs (as the profiler sees a replay's kernels)
    assert all(re.fullmatch(r' \d+\.\d\d \(\d+\) ', r[8]) for r in rows), rows


@pytest.mark.cuda
def test_outlook_rows_time_the_tensor_core_gathers_too() -> None:
    """On CUDA in bf16 with the kernels, the outlook case also times mmattn with its gathers on
    the tensor-core kernel (``MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1`` around its calls), in the
    same turns, as exact as the default row."""
    result = run_benchmark('--op', 'outlook', '--no-compile', '--device', 'cuda', '--dtype',
                           'bfloat16', '--shape', '2,14,14,64', '--heads', '2', '--iters', '2',
                           '--warmup', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = impl_rows(result.stdout, 'outlook')
    if 'mmattn (reference)' not in rows:
        pytest.skip('the outlook kernels are not built for CUDA here')
    assert 'mmattn (tensor-core gathers)' in rows, result.stdout[-3000:]
    # each row's kernels a forward + backward: their summed durations (launches)
    for name, r in rows.items():
        ms, launches = re.fullmatch(r' (\d+\.\d\d) \((\d+)\) ', r[8]).groups()
        assert float(ms) > 0 and int(launches) > 0, (name, r)
    errors = {name: float(rows[name][-2]) for name in ('mmattn', 'mmattn (tensor-core gathers)')}
    assert errors['mmattn (tensor-core gathers)'] <= 2 * errors['mmattn'] + 0.05


@pytest.mark.cuda
def test_psa_rows_time_the_shared_memory_tiles_too() -> None:
    """On the CUDA kernels at up to 256 channels, the PSA case also times mmattn with its
    passes on the shared-memory tiles (``MMATTN_PSA_REGISTER_TILES=0`` around its
    calls), and on GPUs with clusters its glues on one block an image
    (``MMATTN_PSA_GLUE_BLOCKS=1``), in the same turns, as exact as the default row."""
    result = run_benchmark('--op', 'psa', '--mode', 'parallel', '--no-compile', '--device', 'cuda',
                           '--dtype', 'bfloat16', '--shape', '2,64,16,16', '--iters', '2',
                           '--warmup', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = impl_rows(result.stdout, 'psa')
    if 'mmattn (folded)' not in rows:
        pytest.skip('the PSA kernels are not built for CUDA here')
    assert 'mmattn (shared-memory tiles)' in rows, result.stdout[-3000:]
    names = ['mmattn', 'mmattn (shared-memory tiles)']
    if torch.cuda.get_device_capability()[0] >= 9:
        names.append('mmattn (one glue block an image)')
    assert set(names) <= set(rows), result.stdout[-3000:]
    errors = {name: float(rows[name][-2]) for name in names}
    assert max(errors.values()) <= 2 * min(errors.values()) + 0.05, errors


@pytest.mark.cuda
@pytest.mark.parametrize('mode, row', [('parallel', 'mmattn (two launches after the glue)'),
                                       ('sequential', 'mmattn (value map by GEMM)'),
                                       ('sequential', 'mmattn (M by GEMM)')])
def test_release_rows_time_what_their_default_replaced(mode: str, row: str) -> None:
    """For the release's forms on the CUDA kernels the PSA case also times what their default
    replaced, as exact as the default row: PSA_p's spatial reduction and apply pass in two
    launches (``MMATTN_PSA_COOPERATIVE=0``, beside one cooperative launch), PSA_s's value map
    as a GEMM (``MMATTN_PSA_VALUE_TILES=0``, beside the kernel's own tiles) and its M = dVl x^T
    as a GEMM after the backward's cooperative launch (``MMATTN_PSA_FUSED_M=0``)."""
    result = run_benchmark('--op', 'psa', '--variant', 'official', '--mode', mode,
                           '--no-compile', '--device', 'cuda', '--dtype', 'bfloat16',
                           '--shape', '2,64,16,16', '--iters', '2', '--warmup', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = impl_rows(result.stdout, 'psa')
    if 'mmattn (folded)' not in rows:
        pytest.skip('the PSA kernels are not built for CUDA here')
    names = ['mmattn', row]
    assert set(names) <= set(rows), result.stdout[-3000:]
    errors = {name: float(rows[name][-2]) for name in names}
    assert max(errors.values()) <= 2 * min(errors.values()) + 0.05, errors


def test_mlp_case_times_torchs_and_mmattns_layers() -> None:
    """``--op mlp``: VOLO's MLP half-block with torch's layers and with mmattn's
    (``dense_layers``), same weights: on the CPU both run torch's functions, equal outputs."""
    result = run_benchmark('--op', 'mlp', '--no-compile', '--shape', '2,3,4,16', '--iters', '1',
                           '--warmup', '0', '--threads', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = impl_rows(result.stdout, 'mlp')
    assert set(rows) == {'eager', 'mmattn'}, result.stdout[-3000:]
    assert float(rows['mmattn'][-2]) == 0
    assert rows['mmattn'][2].strip() == '2x3x4x16'


@pytest.mark.cuda
def test_mlp_rows_time_pytorchs_column_sums_too() -> None:
    """On CUDA the mlp case also times mmattn's layers with ``MMATTN_COLUMN_SUMS=0``."""
    result = run_benchmark('--op', 'mlp', '--no-compile', '--device', 'cuda', '--dtype',
                           'bfloat16', '--shape', '2,14,14,64', '--iters', '2', '--warmup', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r.split('|')[4].strip() for r in result.stdout.splitlines()
            if r.startswith('| mlp |')}
    assert rows == {'eager', 'mmattn', 'mmattn (PyTorch column sums)'}, result.stdout[-3000:]


def test_cuda_graph_option_needs_cuda() -> None:
    result = run_benchmark('--op', 'psa', '--device', 'cpu', '--cuda-graph', timeout=300)
    assert result.returncode == 2
    assert '--cuda-graph needs a CUDA device' in result.stderr


def _host_split_rows(out: str, title: str) -> dict[str, list[float]]:
    table = out[out.index(title):].split('\n\n')[0]
    rows = [row.split('|')[1:-1] for row in table.splitlines() if row.startswith('| ')]
    assert rows[0][0].strip() == 'impl', table
    return {r[0].strip(): [float(v) for v in r[1:]] for r in rows[1:]}


def test_host_split_option_times_each_phase() -> None:
    """``--host-split N``: per implementation, each phase's wall time and CPU time (the calling
    thread's, every thread's). On the CPU the host does all the work: each phase's CPU time is
    its wall time, within the clocks' resolution, and the phases fit in the whole."""
    result = run_benchmark('--op', 'psa', '--mode', 'parallel', '--no-compile', '--shape',
                           '2,8,16,16', '--iters', '5', '--warmup', '1', '--threads', '1',
                           '--host-split', '4')
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _host_split_rows(result.stdout, 'psa 2x8x16x16 paper, parallel: where the host time')
    assert {'eager', 'mmattn'} <= set(rows)
    for name, (wall, *phases) in rows.items():
        fwd, bwd = phases[:3], phases[3:]
        assert fwd[0] > 0 and bwd[0] > 0 and fwd[0] + bwd[0] <= wall * 1.01 + 0.01, (name, rows)
        for phase_wall, thread_cpu, process_cpu in (fwd, bwd):
            # (process_time and thread_time tick in microseconds or coarser)
            assert thread_cpu <= process_cpu + 0.05, (name, rows)
            assert 0.5 * phase_wall - 0.05 <= process_cpu <= 1.5 * phase_wall + 0.05, (name, rows)
    assert 'CUDA runtime/driver calls' not in result.stdout   # (CPU: none to show)


def test_api_call_rows_counts_runtime_calls_inside_the_steps() -> None:
    """The runtime/driver calls of ``--host-split``'s table, from profiler events: CUDA
    runtime (``cuda*``) and driver (``cu*``) names only (not ``cudnn*`` or ATen operators), per
    run, longest call, most time first; only those that start inside a step's range (of any
    thread: a backward's launches), not the harness's wait after the steps or the profiler's
    synchronisation when it stops (which an H200 showed in a profile, 2026-11-27)."""
    from types import SimpleNamespace

    import torch
    bench = benchmark_module()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def evt(name: str, start: float, end: float, device=cpu) -> SimpleNamespace:
        rng = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
        return SimpleNamespace(name=name, device_type=device, time_range=rng)
    events = [evt('step', 0, 360), evt('aten::add', 0, 50), evt('cudaLaunchKernel', 1, 9),
              evt('cudaLaunchKernel', 10, 14), evt('cuLaunchKernel', 20, 22),
              evt('cudnnConvolutionForward', 23, 40), evt('cudaStreamSynchronize', 41, 341),
              evt('void my_kernel<float>', 50, 90, cuda), evt('step', 380, 395),
              evt('cudaLaunchKernel', 390, 396),   # (another thread's, ending after the step)
              evt('cudaDeviceSynchronize', 401, 899), evt('cudaLaunchKernel', 901, 907),
              evt('cudaDeviceSynchronize', 910, 920)]
    rows = bench.api_call_rows(events, 2, 'step')
    assert [r[0] for r in rows] == ['cudaStreamSynchronize', 'cudaLaunchKernel',
                                    'cuLaunchKernel']
    sync, launch, driver = rows
    assert sync[1:] == pytest.approx((0.5, 0.15, 0.3))
    assert launch[1:] == pytest.approx((1.5, 0.009, 0.008))
    assert driver[1:] == pytest.approx((0.5, 0.001, 0.002))


def test_with_env_sets_and_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An implementation's environment (``Case.envs``, e.g. the outlook row with the scalar
    gathers) is set around each of its calls and the previous state restored: a variable
    unset before is unset again, one set keeps its value, also when the call raises."""
    import os
    bench = benchmark_module()
    monkeypatch.delenv('MMATTN_BENCH_A', raising=False)
    monkeypatch.setenv('MMATTN_BENCH_B', 'before')
    seen = bench.with_env(lambda: (os.environ.get('MMATTN_BENCH_A'),
                                   os.environ.get('MMATTN_BENCH_B')),
                          {'MMATTN_BENCH_A': '1', 'MMATTN_BENCH_B': '2'})()
    assert seen == ('1', '2')
    assert 'MMATTN_BENCH_A' not in os.environ and os.environ['MMATTN_BENCH_B'] == 'before'

    def fails() -> None:
        raise ValueError('inside')
    with pytest.raises(ValueError, match='inside'):
        bench.with_env(fails, {'MMATTN_BENCH_B': '3'})()
    assert os.environ['MMATTN_BENCH_B'] == 'before'


@pytest.mark.cuda
def test_host_split_option_lists_cuda_runtime_calls() -> None:
    """On CUDA, ``--host-split`` also lists each implementation's costliest runtime/driver
    calls: the launches at least, as many per step as the profiler sees kernels."""
    result = run_benchmark('--op', 'psa', '--mode', 'parallel', '--no-compile', '--device', 'cuda',
                           '--shape', '2,16,8,8', '--iters', '3', '--warmup', '1',
                           '--host-split', '6')
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert set(_host_split_rows(out, 'psa 2x16x8x8 paper, parallel: where the host time')) >= {
        'eager', 'mmattn'}
    table = out[out.index('CUDA runtime/driver calls'):].split('\n\n')[0]
    rows = [[c.strip() for c in row.split('|')[1:-1]] for row in table.splitlines()
            if row.startswith('| ') and not row.startswith('| impl')]
    launches = {r[0]: float(r[2]) for r in rows if 'LaunchKernel' in r[1]}
    assert {'eager', 'mmattn'} <= set(launches) and all(v >= 1 for v in launches.values()), table
    # (the harness's wait, and the profiler's when it stops: an H200 showed one per 3 runs)
    assert 'cudaDeviceSynchronize' not in {r[1] for r in rows}
