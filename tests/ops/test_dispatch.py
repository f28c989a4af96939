"""Backend selection: the environment variable, the predicates and their reasons, the
error for a kernel that is not built, and the one-line kernel report."""
from __future__ import annotations

import pytest
import torch

from mmattn.ops import dispatch
from mmattn.ops.dispatch import (ENV_VAR, KernelUnavailableError, can_use_psa_cuda,
                                 can_use_psa_folded, kernel_status, select_backend)
from mmattn.utils.collect_env import collect_env


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_import_needs_no_extension() -> None:
    assert dispatch.cuda_extension() is None


def test_kernel_status_line() -> None:
    status = kernel_status()
    assert '\n' not in status
    assert 'CUDA kernels: not built (none in this version)' in status
    assert 'psa_paper' in status and f'{ENV_VAR}=auto (unset)' in status


def test_collect_env_reports_kernels() -> None:
    assert collect_env()['mmattn kernels'] == kernel_status()


def test_auto_picks_folded_for_float_input() -> None:
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2)) == ('folded', 'auto')


def test_auto_reasons_when_declined() -> None:
    backend, reason = select_backend('psa_paper', torch.ones(1, 4, 2, 2, dtype=torch.int64))
    assert backend == 'reference'
    assert 'cuda: no compiled CUDA kernel' in reason and 'torch.int64' in reason
    backend, reason = select_backend('psa_paper', torch.randn(1, 4, 2, 2), hooks=True)
    assert backend == 'reference' and 'hooks' in reason


@pytest.mark.parametrize('value', ['reference', ' Reference '])
def test_env_forces_reference(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2)) == \
        ('reference', f'{ENV_VAR}=reference')
    # an explicit request still wins over the environment
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2), 'folded')[0] == 'folded'
    assert f'{ENV_VAR}={value}' in kernel_status()


def test_env_auto_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, 'auto')
    assert select_backend('psa_paper', torch.randn(1, 4, 2, 2))[0] == 'folded'
    monkeypatch.setenv(ENV_VAR, 'cuda')
    with pytest.raises(ValueError, match=f"{ENV_VAR}.*'auto', 'reference'.*'cuda'"):
        select_backend('psa_paper', torch.randn(1, 4, 2, 2))


def test_explicit_cuda_says_how_to_get_a_kernel() -> None:
    ok, reason = can_use_psa_cuda(torch.randn(1, 4, 2, 2))
    assert not ok and 'no compiled CUDA kernel' in reason
    with pytest.raises(KernelUnavailableError,
                       match=r"backend='cuda'.*ships no compiled CUDA kernels.*nvcc"):
        select_backend('psa_paper', torch.randn(1, 4, 2, 2), 'cuda')


def test_explicit_folded_that_declines_raises() -> None:
    with pytest.raises(KernelUnavailableError, match="backend='folded'.*torch.int32"):
        select_backend('psa_paper', torch.ones(1, 4, 2, 2, dtype=torch.int32), 'folded')


def test_bad_arguments() -> None:
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="backend.*'fast'"):
        select_backend('psa_paper', x, 'fast')
    with pytest.raises(ValueError, match="op.*'psa_official'"):
        select_backend('psa_official', x)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
def test_predicate_declines_while_tracing() -> None:
    seen: list[tuple[bool, str]] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(can_use_psa_folded(x))
        return x * 2

    torch.jit.trace(fn, torch.randn(2, 2))
    assert seen[0][0] is False and 'torch.jit.trace' in seen[0][1]
    assert can_use_psa_folded(torch.randn(2, 2)) == (True, 'ok')
