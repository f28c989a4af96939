"""CBAM against Eq. 1-3 of the paper written out in float64, timm's CbamModule weights, the
switchable gates and its argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmattn.layers import CBAM, CBAMChannelGate, CBAMSpatialGate

SHAPES = [(1, 16, 1, 1), (2, 16, 7, 5), (1, 24, 8, 8), (3, 8, 3, 12)]


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def channel_reference(f: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Eq. 2: M_c = sigma(W1 relu(W0 F_avg) + W1 relu(W0 F_max)), shape (N, C)."""
    n, c, h, w = f.shape
    r = w0.shape[0]
    w0, w1 = w0.reshape(r, c), w1.reshape(c, r)
    f_avg = f.sum(dim=(2, 3)) / (h * w)
    f_max = f.reshape(n, c, h * w).max(dim=2).values
    return sigmoid((f_avg @ w0.T).clamp_min(0) @ w1.T + (f_max @ w0.T).clamp_min(0) @ w1.T)


def conv_same(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """k x k cross-correlation with zero padding k // 2, as a sum over the k^2 shifted windows."""
    n, cin, h, w = inp.shape
    k = weight.shape[-1]
    p = k // 2
    padded = torch.zeros(n, cin, h + 2 * p, w + 2 * p, dtype=inp.dtype)
    padded[:, :, p:p + h, p:p + w] = inp
    out = torch.zeros(n, weight.shape[0], h, w, dtype=inp.dtype)
    for a in range(k):
        for b in range(k):
            window = padded[:, :, a:a + h, b:b + w]
            out = out + torch.einsum('oc,nchw->nohw', weight[:, :, a, b], window)
    if bias is not None:
        out = out + bias[None, :, None, None]
    return out


def spatial_reference(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
    """Eq. 3: M_s = sigma(f^{kxk}([AvgPool(F); MaxPool(F)])) with both poolings across channels,
    (optionally) followed by an eval-mode BatchNorm before sigma. Shape (N, 1, H, W)."""
    c = f.shape[1]
    pooled = torch.cat([f.sum(dim=1, keepdim=True) / c, f.max(dim=1, keepdim=True).values], dim=1)
    t = conv_same(pooled, weight, bias)
    if bn is not None:
        t = (t - bn.running_mean[None, :, None, None]) / torch.sqrt(
            bn.running_var[None, :, None, None] + bn.eps) * bn.weight[None, :, None, None] \
            + bn.bias[None, :, None, None]
    return sigmoid(t)


def cbam_reference(block: CBAM, f: torch.Tensor) -> torch.Tensor:
    """Eq. 1: F' = M_c(F) * F, F'' = M_s(F') * F'."""
    if block.channel is not None:
        mc = channel_reference(f, block.channel.fc1.weight, block.channel.fc2.weight)
        f = f * mc[:, :, None, None]
    if block.spatial is not None:
        conv = block.spatial.conv
        f = f * spatial_reference(f, conv.conv.weight, conv.conv.bias,
                                  conv.bn if conv.with_norm else None)
    return f


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(use_channel=False),
    dict(use_spatial=False),
    dict(kernel_size=3, rd_channels=3),
    dict(kernel_size=1),
    dict(spatial_norm_cfg=dict(type='BN')),
])
def test_matches_equations(shape: tuple[int, int, int, int], kwargs: dict) -> None:
    block = CBAM(shape[1], dtype=torch.float64, **kwargs).eval()
    randomize(block)
    x = torch.randn(shape, dtype=torch.float64)
    ref = cbam_reference(block, x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(xcl), ref, rtol=1e-10, atol=1e-10)


def test_gate_submodules_and_hooks() -> None:
    block = CBAM(16, dtype=torch.float64)
    randomize(block)
    assert isinstance(block.channel, CBAMChannelGate)
    assert isinstance(block.spatial, CBAMSpatialGate)
    captured = {}
    block.channel.gate.register_forward_hook(lambda m, i, o: captured.setdefault('mc', o))
    block.spatial.gate.register_forward_hook(lambda m, i, o: captured.setdefault('ms', o))
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    block(x)
    mc = channel_reference(x, block.channel.fc1.weight, block.channel.fc2.weight)
    assert captured['mc'].shape == (2, 16, 1, 1)
    torch.testing.assert_close(captured['mc'][:, :, 0, 0], mc, rtol=1e-10, atol=1e-10)
    ms = spatial_reference(x * mc[:, :, None, None], block.spatial.conv.conv.weight,
                           block.spatial.conv.conv.bias)
    assert captured['ms'].shape == (2, 1, 5, 7)
    torch.testing.assert_close(captured['ms'], ms, rtol=1e-10, atol=1e-10)


def test_state_dict_keys() -> None:
    channel_keys = {'channel.fc1.weight', 'channel.fc2.weight'}
    spatial_keys = {'spatial.conv.conv.weight', 'spatial.conv.conv.bias'}
    assert set(CBAM(32).state_dict()) == channel_keys | spatial_keys
    assert set(CBAM(32, use_spatial=False).state_dict()) == channel_keys
    assert set(CBAM(32, use_channel=False).state_dict()) == spatial_keys
    sd = CBAM(32, mlp_bias=True, kernel_size=5).state_dict()
    assert sd['channel.fc1.weight'].shape == (2, 32, 1, 1)   # 32 / 16, rd_divisor 1
    assert sd['channel.fc1.bias'].shape == (2,)
    assert sd['spatial.conv.conv.weight'].shape == (1, 2, 5, 5)
    assert CBAM(64, rd_ratio=0.25).channel.rd_channels == 16
    assert CBAM(64, rd_divisor=8).channel.rd_channels == 8


def test_gradcheck() -> None:
    block = CBAM(4, rd_channels=2, kernel_size=3, dtype=torch.float64)
    randomize(block)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    names = [n for n, _ in block.named_parameters()]

    def by_params(*ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(
        by_params, tuple(p.detach().clone().requires_grad_() for p in block.parameters()),
        fast_mode=True)


@pytest.mark.parametrize('channels', [16, 64])
def test_loads_timm_cbammodule(channels: int) -> None:
    from timm.layers.cbam import CbamModule
    theirs = CbamModule(channels).double().eval()
    randomize(theirs)
    ours = CBAM(channels, spatial_norm_cfg=dict(type='BN'), dtype=torch.float64).eval()
    theirs_sd = {k: v for k, v in theirs.state_dict().items()}
    assert set(ours.state_dict()) == set(theirs_sd)
    ours.load_state_dict(theirs_sd, strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_abbr() -> None:
    assert CBAM._abbr_ == 'cbam'


@pytest.mark.parametrize('kwargs, match', [
    (dict(use_channel=False, use_spatial=False),
     r'at least one of use_channel and use_spatial must be True'),
    (dict(kernel_size=4), r'kernel_size must be an odd integer >= 1, got 4'),
    (dict(kernel_size=0), r'kernel_size must be an integer >= 1, got 0'),
    (dict(rd_ratio=0.0), r'rd_ratio must be a number > 0, got 0.0'),
    (dict(rd_channels=-1), r'rd_channels must be an integer >= 1, got -1'),
    (dict(gate_layer=''), r"gate_layer must be a timm activation name.*got ''"),
    (dict(act_layer='rleu'), r"act_layer must be a timm activation name.*got 'rleu'"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    """Named as the block the user built, also where a gate checks the argument."""
    with pytest.raises(ValueError, match='^CBAM: ' + match):
        CBAM(16, **kwargs)


def test_bad_input() -> None:
    block = CBAM(16)
    with pytest.raises(ValueError, match=r'8 channels.*in_channels=16'):
        block(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize('gate', [CBAMChannelGate(16), CBAMSpatialGate()])
def test_gates_used_alone_check_their_input(gate: nn.Module) -> None:
    """Each gate is a module of its own too: a bad input fails with the gate's name and what is
    wrong, not inside a pooling or a convolution; the spatial gate takes any channel count."""
    name = type(gate).__name__
    with pytest.raises(ValueError, match=rf'{name}: expected a 4-D NCHW input, got a 3-D '
                                         r'tensor of shape \(2, 16, 5\)'):
        gate(torch.randn(2, 16, 5))
    with pytest.raises(TypeError, match=rf'{name}: expected a floating-point input'):
        gate(torch.ones(1, 16, 4, 4, dtype=torch.long))
    for scripted in (False, True):
        module = torch.jit.script(gate) if scripted else gate
        if isinstance(gate, CBAMChannelGate):
            with pytest.raises((ValueError, torch.jit.Error),
                               match=rf'{name}: the input has 8 channels .*in_channels=16'):
                module(torch.randn(1, 8, 4, 4))
        else:
            assert module(torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)
