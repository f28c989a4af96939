"""SqueezeExcitation against SE-Net's Eq. 2-4 written out in float64, timm's SEModule weights,
and its argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mmattn.layers import SqueezeExcitation

SHAPES = [(1, 16, 1, 1), (2, 16, 7, 5), (1, 24, 8, 8), (3, 8, 3, 12)]


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def se_reference(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                 b2: torch.Tensor | None, act=lambda t: t.clamp_min(0), gate=sigmoid):
    """Eq. 2: z_c = 1/(HW) sum_ij x_c(i,j); Eq. 3: s = sigma(W2 delta(W1 z)); Eq. 4: s_c * x_c.
    Returns the output and s of shape (N, C)."""
    n, c, h, w = x.shape
    z = x.sum(dim=(2, 3)) / (h * w)                          # (N, C)
    hidden = z @ w1.reshape(w1.shape[0], c).T                 # (N, r)
    if b1 is not None:
        hidden = hidden + b1
    e = act(hidden) @ w2.reshape(c, w1.shape[0]).T            # (N, C)
    if b2 is not None:
        e = e + b2
    s = gate(e)
    return x * s[:, :, None, None], s


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


@pytest.mark.parametrize('shape', SHAPES)
def test_matches_equations(shape: tuple[int, int, int, int]) -> None:
    n, c, h, w = shape
    block = SqueezeExcitation(c, rd_channels=4, dtype=torch.float64)
    randomize(block)
    x = torch.randn(shape, dtype=torch.float64)
    ref, _ = se_reference(x, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias)
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(block(xcl), ref, rtol=1e-10, atol=1e-10)


def test_other_activations_and_no_bias() -> None:
    block = SqueezeExcitation(16, rd_channels=8, act_layer=nn.SiLU, gate_layer='hard_sigmoid',
                              bias=False, dtype=torch.float64)
    randomize(block)
    assert block.fc1.bias is None and block.fc2.bias is None
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    ref, _ = se_reference(x, block.fc1.weight, None, block.fc2.weight, None,
                          act=lambda t: t * sigmoid(t),                      # SiLU
                          gate=lambda t: (t + 3).clamp(0, 6) / 6)           # hard sigmoid
    torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)


def test_gate_hook_captures_excitation() -> None:
    block = SqueezeExcitation(16, dtype=torch.float64)
    randomize(block)
    captured = []
    block.gate.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    block(x)
    _, s = se_reference(x, block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias)
    assert captured[0].shape == (2, 16, 1, 1)
    torch.testing.assert_close(captured[0][:, :, 0, 0], s, rtol=1e-10, atol=1e-10)


def test_gradcheck() -> None:
    block = SqueezeExcitation(4, rd_channels=3, dtype=torch.float64)
    randomize(block)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    names = [n for n, _ in block.named_parameters()]

    def by_params(*ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(
        by_params, tuple(p.detach().clone().requires_grad_() for p in block.parameters()),
        fast_mode=True)


@pytest.mark.parametrize('kwargs, expected', [
    # make_divisible(v, d, round_limit=0) = max(d, floor(v + d/2) // d * d), by hand:
    (dict(in_channels=32), 8),                                # v=2: max(8, 6//8*8=0) = 8
    (dict(in_channels=256), 16),                              # v=16: 20//8*8 = 16
    (dict(in_channels=200), 16),                              # v=12.5: 16//8*8 = 16
    (dict(in_channels=512, rd_ratio=0.25), 128),              # v=128
    (dict(in_channels=512, rd_ratio=np.float32(0.25)), 128),  # a NumPy number too
    (dict(in_channels=64, rd_ratio=0.25, rd_divisor=1), 16),  # v=16, divisor 1
    (dict(in_channels=48, rd_divisor=1), 3),                  # v=3: floor(3.5) = 3
    (dict(in_channels=64, rd_channels=5), 5),                 # explicit width wins
])
def test_reduced_width(kwargs: dict, expected: int) -> None:
    block = SqueezeExcitation(**kwargs)
    assert block.rd_channels == expected
    assert block.fc1.weight.shape == (expected, kwargs['in_channels'], 1, 1)
    assert block.fc2.weight.shape == (kwargs['in_channels'], expected, 1, 1)


@pytest.mark.parametrize('channels', [16, 64, 200])
def test_loads_timm_semodule(channels: int) -> None:
    from timm.layers import SEModule
    theirs = SEModule(channels).double().eval()
    randomize(theirs)
    ours = SqueezeExcitation(channels, dtype=torch.float64).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {
        'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_abbr() -> None:
    assert SqueezeExcitation._abbr_ == 'se'


@pytest.mark.parametrize('kwargs, match', [
    (dict(in_channels=0), r'in_channels must be an integer >= 1, got 0'),
    (dict(in_channels=16, rd_ratio=0), r'rd_ratio must be a number > 0, got 0'),
    (dict(in_channels=16, rd_ratio=-0.5), r'rd_ratio must be a number > 0, got -0.5'),
    (dict(in_channels=16, rd_ratio=True), r'rd_ratio must be a number > 0, got True'),
    (dict(in_channels=16, rd_channels=0), r'rd_channels must be an integer >= 1, got 0'),
    (dict(in_channels=16, rd_divisor=0), r'rd_divisor must be an integer >= 1, got 0'),
    (dict(in_channels=16, act_layer='nonsense'),
     r"act_layer must be a timm activation name.*got 'nonsense'"),
    (dict(in_channels=16, gate_layer=None), r'gate_layer must be a timm activation name.*got None'),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SqueezeExcitation(**kwargs)


def test_bad_input() -> None:
    block = SqueezeExcitation(16)
    with pytest.raises(ValueError, match=r'17 channels.*in_channels=16'):
        block(torch.randn(1, 17, 4, 4))
