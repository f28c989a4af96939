"""EfficientChannelAttention against ECA-Net's Eq. 9 and 12 written out in float64, the kernel-size
formula by hand, timm's EcaModule weights, and its argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmattn.layers import EfficientChannelAttention
from mmattn.layers.eca import eca_kernel_size

SHAPES = [(1, 16, 1, 1), (2, 16, 7, 5), (1, 33, 8, 8), (3, 8, 3, 12)]


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def eca_reference(x: torch.Tensor, weight: torch.Tensor,
                  gate=sigmoid) -> tuple[torch.Tensor, torch.Tensor]:
    """y = GAP(x); omega_i = sigma(sum_j w_j y_{i + j - (k-1)/2}) with y = 0 outside [0, C)
    (the k neighbours of channel i, Eq. 9/12); output omega_i * x_i. Returns (out, omega (N, C))."""
    n, c, h, w = x.shape
    k = weight.numel()
    wk = weight.reshape(k)
    y = x.sum(dim=(2, 3)) / (h * w)
    pre = torch.zeros(n, c, dtype=x.dtype)
    for i in range(c):
        for j in range(k):
            src = i + j - (k - 1) // 2
            if 0 <= src < c:
                pre[:, i] = pre[:, i] + wk[j] * y[:, src]
    omega = gate(pre)
    return x * omega[:, :, None, None], omega


@pytest.mark.parametrize('channels, gamma, beta, expected', [
    # t = (log2 C + b) / gamma; k = |t|_odd (floor, +1 if even), by hand:
    (64, 2, 1, 3),     # (6 + 1)/2 = 3.5 -> 3
    (256, 2, 1, 5),    # (8 + 1)/2 = 4.5 -> 4 -> 5
    (512, 2, 1, 5),    # (9 + 1)/2 = 5
    (128, 2, 1, 5),    # (7 + 1)/2 = 4 -> 5
    (1024, 2, 1, 5),   # (10 + 1)/2 = 5.5 -> 5
    (2048, 2, 1, 7),   # (11 + 1)/2 = 6 -> 7
    (32, 2, 1, 3),     # (5 + 1)/2 = 3
    (100, 2, 1, 3),    # (6.64 + 1)/2 = 3.82 -> 3
    (4, 2, 1, 1),      # (2 + 1)/2 = 1.5 -> 1
    (512, 3, 1, 3),    # (9 + 1)/3 = 3.33 -> 3
    (512, 1, 0, 9),    # 9
    (2048, 2, 3, 7),   # (11 + 3)/2 = 7
])
def test_kernel_size_formula(channels: int, gamma: float, beta: float, expected: int) -> None:
    assert eca_kernel_size(channels, gamma, beta) == expected
    block = EfficientChannelAttention(channels, gamma=gamma, beta=beta)
    assert block.kernel_size == expected
    assert block.conv.weight.shape == (1, 1, expected)
    assert block.conv.bias is None


def test_fixed_kernel_size() -> None:
    block = EfficientChannelAttention(256, kernel_size=9)
    assert block.kernel_size == 9 and block.conv.weight.shape == (1, 1, 9)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('kernel_size', [None, 1, 5, 9])
def test_matches_equations(shape: tuple[int, int, int, int], kernel_size: int | None) -> None:
    n, c, h, w = shape
    block = EfficientChannelAttention(c, kernel_size=kernel_size, dtype=torch.float64)
    with torch.no_grad():
        block.conv.weight.normal_()
    x = torch.randn(shape, dtype=torch.float64)
    ref, _ = eca_reference(x, block.conv.weight)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(xcl), ref, rtol=1e-10, atol=1e-10)


def test_gate_hook_and_other_gate() -> None:
    block = EfficientChannelAttention(16, kernel_size=3, gate_layer='hard_sigmoid',
                                      dtype=torch.float64)
    with torch.no_grad():
        block.conv.weight.normal_()
    captured = []
    block.gate.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    out = block(x)
    ref, hard = eca_reference(x, block.conv.weight, gate=lambda t: (t + 3).clamp(0, 6) / 6)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert captured[0].shape == (2, 1, 16)
    torch.testing.assert_close(captured[0][:, 0], hard, rtol=1e-10, atol=1e-10)


def test_gradcheck() -> None:
    block = EfficientChannelAttention(5, kernel_size=3, dtype=torch.float64)
    with torch.no_grad():
        block.conv.weight.normal_()
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    weight = block.conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda wt: torch.func.functional_call(block, {'conv.weight': wt}, (x.detach(),)), (weight,))


@pytest.mark.parametrize('channels', [8, 64, 256, 2048])
def test_loads_timm_ecamodule(channels: int) -> None:
    from timm.layers import EcaModule
    theirs = EcaModule(channels).double().eval()
    with torch.no_grad():
        theirs.conv.weight.normal_()
    ours = EfficientChannelAttention(channels, dtype=torch.float64).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {'conv.weight'}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_abbr() -> None:
    assert EfficientChannelAttention._abbr_ == 'eca'


@pytest.mark.parametrize('kwargs, match', [
    (dict(kernel_size=4), r'kernel_size must be an odd integer >= 1, got 4'),
    (dict(kernel_size=0), r'kernel_size must be an integer >= 1, got 0'),
    (dict(kernel_size=-3), r'kernel_size must be an integer >= 1, got -3'),
    (dict(kernel_size=3.0), r'kernel_size must be an integer >= 1, got 3.0'),
    (dict(gamma=0), r'gamma must be a number > 0, got 0'),
    (dict(gamma=-2), r'gamma must be a number > 0, got -2'),
    (dict(beta='1'), r"beta must be a number, got '1'"),
    (dict(gate_layer='sigmod'), r"gate_layer must be a timm activation name.*got 'sigmod'"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EfficientChannelAttention(16, **kwargs)
    with pytest.raises(ValueError, match=r'in_channels must be an integer >= 1, got 0'):
        EfficientChannelAttention(0)


def test_bad_input() -> None:
    block = EfficientChannelAttention(16)
    with pytest.raises(ValueError, match=r'15 channels.*in_channels=16'):
        block(torch.randn(1, 15, 4, 4))
    assert isinstance(block.gate, nn.Module)
