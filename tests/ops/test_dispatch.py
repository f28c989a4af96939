"""Backend selection: the environment variable, the predicates and their reasons, the
errors for kernels that are not loaded (saying how to build them), and the one-line report.

The compiled extension is absent in this process unless a kernel test loaded its JIT build; the
``no_kernels`` fixture makes every test here see the state of a fresh install without one.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmattn.ops import dispatch, extension
from mmattn.ops.dispatch import (ENV_VAR, KernelUnavailableError, backends_for,
                                 can_use_outlook_cpu, can_use_outlook_cuda, can_use_psa_cuda,
                                 can_use_psa_folded, kernel_status, select_backend)
from mmattn.utils.collect_env import collect_env

NOT_BUILT = f"not built (No module named 'mmattn._C'); {extension.BUILD_HINT}"


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(extension, '_state', {'loaded_from': None, 'error': NOT_BUILT})


def test_import_needs_no_extension_and_never_compiles() -> None:
    code = ('import mmattn, mmattn.ops.extension as e; '
            'assert e.load_extension() is None, e.loaded_from(); print(e.load_error())')
    env = {k: v for k, v in __import__('os').environ.items()
           if k not in (extension.JIT_ENV, extension.LIBRARY_ENV)}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'MMATTN_WITH_CUDA=1 pip install' in out.stdout and 'MMATTN_JIT=1' in out.stdout


def test_kernel_status_line() -> None:
    status = kernel_status()
    assert '\n' not in status
    assert 'compiled kernels: not loaded' in status and 'MMATTN_WITH_CUDA=1' in status
    assert 'psa_paper' in status and f'{ENV_VAR}=auto (unset)' in status


def test_kernel_status_lists_loaded_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extension, '_state', {'loaded_from': 'JIT (CPU kernels only)',
                                              'error': None})
    monkeypatch.setattr(extension, 'has_kernel',
                        lambda op, device: device == 'cpu' and op.startswith('outlook'))
    assert ('compiled kernels: JIT (CPU kernels only): CPU outlook_bwd, outlook_fwd, '
            'outlook_pool, outlook_softmax, outlook_unpool_add;') in \
        kernel_status()


def test_collect_env_reports_kernels() -> None:
    assert collect_env()['mmattn kernels'] == kernel_status()


def test_auto_picks_folded_for_float_input() -> None:
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2)) == ('folded', 'auto')


def test_auto_reasons_when_declined() -> None:
    backend, reason = select_backend('psa_paper', torch.ones(1, 4, 2, 2, dtype=torch.int64))
    assert backend == 'reference'
    assert 'cuda: input dtype torch.int64 is not floating point' in reason
    backend, reason = select_backend('psa_paper', torch.randn(1, 4, 2, 2), hooks=True)
    assert backend == 'reference' and 'hooks' in reason
    backend, reason = select_backend('outlook', torch.randn(1, 4, 4, 8))
    assert backend == 'reference'
    assert 'cuda: input is on cpu, the kernel runs on cuda tensors' in reason
    assert 'cpu: the compiled CPU kernel is not loaded: not built' in reason


@pytest.mark.parametrize('value', ['reference', ' Reference '])
def test_env_forces_reference(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2)) == \
        ('reference', f'{ENV_VAR}=reference')
    assert select_backend('outlook', torch.randn(1, 4, 2, 2))[0] == 'reference'
    # an explicit request still wins over the environment
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2), 'folded')[0] == 'folded'
    assert f'{ENV_VAR}={value}' in kernel_status()


def test_env_auto_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, 'auto')
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2))[0] == 'folded'
    monkeypatch.setenv(ENV_VAR, 'cuda')
    with pytest.raises(ValueError, match=f"{ENV_VAR}.*'auto', 'reference'.*'cuda'"):
        select_backend('psa_paper', torch.randn(1, 4, 2, 2))


def test_explicit_kernel_says_why_and_how_to_build() -> None:
    x = torch.randn(1, 4, 2, 2)
    ok, reason = can_use_psa_cuda(x)
    assert not ok and reason == 'input is on cpu, the kernel runs on cuda tensors'
    with pytest.raises(KernelUnavailableError, match=r"backend='cuda'.*input is on cpu"):
        select_backend('psa_paper', x, 'cuda')
    ok, reason = can_use_outlook_cpu(x)
    assert not ok and 'the compiled CPU kernel is not loaded' in reason
    with pytest.raises(KernelUnavailableError,
                       match=r"outlook: backend='cpu'.*not loaded.*MMATTN_WITH_CUDA=1 pip "
                             r"install.*MMATTN_JIT=1") as raised:
        select_backend('outlook', x, 'cpu')
    assert str(raised.value).count(extension.BUILD_HINT) == 1, str(raised.value)
    assert not can_use_outlook_cuda(x)[0]


@pytest.mark.parametrize('state', [
    {'loaded_from': None, 'error': 'MMATTN_JIT=1 but the JIT build failed: no compiler'},
    {'loaded_from': 'mmattn._C (built at install)', 'error': None}])
def test_explicit_kernel_not_loaded_says_how_to_build_once(
        state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever kept the kernel from loading (a failed JIT build, or a build without it; a
    missing build: the test above), the error says how to build it, once."""
    monkeypatch.setattr(extension, '_state', state)
    monkeypatch.setattr(extension, 'has_kernel', lambda op, device: False)
    monkeypatch.setattr(dispatch, '_DECISIONS', {})   # this made-up state's decisions: dropped
    with pytest.raises(KernelUnavailableError, match=r"outlook: backend='cpu'.*not loaded") \
            as raised:
        select_backend('outlook', torch.randn(1, 4, 4, 8), 'cpu')
    assert str(raised.value).count(extension.BUILD_HINT) == 1, str(raised.value)


class _CudaLike:
    """What the folded paths' predicates read of a CUDA tensor (none on this machine)."""
    device = torch.device('cuda', 0)

    @staticmethod
    def is_floating_point() -> bool:
        return True


def test_auto_passes_over_folded_paths_measured_slower_on_cuda() -> None:
    """auto's heuristics skip the folded path on CUDA for the forms it measured slower than
    the reference there (the paper's and PSA_s), keep it for PSA_p and on the CPU; an explicit
    backend='folded' is not subject to them."""
    paper = dispatch._PREDICATES[('psa_paper', 'folded')]
    official = dispatch._PREDICATES[('psa_official', 'folded')]
    x = _CudaLike()
    ok, reason = paper(x, heuristics=True, form='paper')
    assert not ok and reason.startswith('on CUDA the folded paper form measured slower')
    ok, reason = official(x, heuristics=True, form='PSA_s')
    assert not ok and 'folded PSA_s form' in reason
    assert official(x, heuristics=True, form='PSA_p') == (True, 'ok')
    assert paper(x) == (True, 'ok') and official(x, form='PSA_s') == (True, 'ok')
    cpu = torch.randn(1, 4, 2, 2)
    assert paper(cpu, heuristics=True, form='paper') == (True, 'ok')
    assert official(cpu, heuristics=True, form='PSA_s') == (True, 'ok')
    assert dispatch.FOLDED_SLOWER_ON_CUDA == ('paper', 'PSA_s')


def test_auto_takes_the_psa_cuda_block_for_every_form_and_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the kernels built, auto takes the CUDA block for every form at every size: PSA_s's
    value products are GEMMs there (an earlier version ran them on scalar FMAs and auto passed
    over it above a work limit)."""
    monkeypatch.setattr(dispatch, '_kernel_check', lambda *args: None)  # as if built, on CUDA
    monkeypatch.setattr(dispatch, '_DECISIONS', {})
    big = torch.zeros(()).expand(16, 256, 128, 128)
    hrnet = torch.zeros(()).expand(2, 48, 128, 256)
    for x in (big, hrnet):
        for form in ('PSA_s', 'PSA_p', 'paper'):
            assert can_use_psa_cuda(x, heuristics=True, form=form) == (True, 'ok')
        for form in ('PSA_s', 'PSA_p'):
            assert select_backend('psa_official', x, heuristics=True, form=form)[0] == 'cuda'


def test_psa_cuda_declines_when_determinism_is_demanded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA block adds its weight gradients with atomics: with
    torch.use_deterministic_algorithms(True) the predicate declines (auto then takes a
    deterministic path), with warn_only it serves (the op's backward warns then)."""
    monkeypatch.setattr(dispatch, '_kernel_check', lambda *args: None)  # as if built, on CUDA
    monkeypatch.setattr(dispatch, '_DECISIONS', {})   # none cached from other tests' states
    x = torch.randn(1, 4, 2, 2)
    assert can_use_psa_cuda(x) == (True, 'ok')
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        ok, reason = can_use_psa_cuda(x)
        assert not ok and reason.startswith('torch.use_deterministic_algorithms(True) is on')
        assert select_backend('psa_official', x)[0] != 'cuda'
        torch.use_deterministic_algorithms(True, warn_only=True)
        assert can_use_psa_cuda(x) == (True, 'ok')
        assert select_backend('psa_official', x)[0] == 'cuda'   # the cached decision is per mode
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_kernel_declines_dtype_and_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, '_kernel_loaded', lambda op, device_type: True)
    assert can_use_outlook_cpu(torch.randn(2, 2)) == (True, 'ok')
    ok, reason = can_use_outlook_cpu(torch.ones(2, 2, dtype=torch.int32))
    assert not ok and 'torch.int32 is not one of the kernel dtypes' in reason
    seen: list[tuple[bool, str]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(can_use_outlook_cpu(x))
        return x * 2

    with pytest.warns(Warning):
        torch.jit.trace(fn, torch.randn(2, 2))
    assert seen[0][0] is False and 'torch.jit.trace' in seen[0][1]


def test_explicit_folded_that_declines_raises() -> None:
    with pytest.raises(KernelUnavailableError, match="backend='folded'.*torch.int32"):
        select_backend('psa_paper', torch.ones(1, 4, 2, 2, dtype=torch.int32), 'folded')


def test_bad_arguments() -> None:
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="backend.*'fast'"):
        select_backend('psa_paper', x, 'fast')
    with pytest.raises(ValueError, match=r"outlook: backend must be one of \('auto', "
                                         r"'reference', 'cuda', 'cpu'\), got 'folded'"):
        select_backend('outlook', x, 'folded')
    with pytest.raises(ValueError, match="op.*'psa_release'"):
        select_backend('psa_release', x)
    assert backends_for('psa_paper') == ('auto', 'reference', 'cuda', 'cpu', 'folded')
    assert backends_for('psa_official') == ('auto', 'reference', 'cuda', 'cpu', 'folded')


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_predicate_declines_while_tracing() -> None:
    seen: list[tuple[bool, str]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(can_use_psa_folded(x))
        return x * 2

    torch.jit.trace(fn, torch.randn(2, 2))
    assert seen[0][0] is False and 'torch.jit.trace' in seen[0][1]
    assert can_use_psa_folded(torch.randn(2, 2)) == (True, 'ok')
