"""CoordinateAttention against Eq. 4-9 of the paper written out in float64 (BatchNorm in eval mode
and with training-mode batch statistics), the official checkpoint keys, the gate hooks and its
argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmattn.layers import CoordinateAttention

SHAPES = [(1, 16, 1, 1), (2, 16, 7, 5), (1, 40, 8, 8), (3, 8, 3, 12)]


def sigmoid(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-t))


def hswish(t: torch.Tensor) -> torch.Tensor:
    """h-swish (MobileNetV3): t * ReLU6(t + 3) / 6."""
    return t * (t + 3).clamp(0, 6) / 6


def coord_reference(block: CoordinateAttention, x: torch.Tensor, training: bool = False):
    """Eq. 4-9; returns (y, g_h (N, C, H), g_w (N, C, W)). With ``training`` BatchNorm uses the
    batch mean and biased variance over (N, H + W) per channel."""
    n, c, h, w = x.shape
    mid = block.mid_channels
    z_h = x.sum(dim=3) / w                                      # Eq. 4: (N, C, H)
    z_w = x.sum(dim=2) / h                                      # Eq. 5: (N, C, W)
    z = torch.cat([z_h, z_w], dim=2)                            # (N, C, H + W)
    t = torch.einsum('mc,ncl->nml', block.conv1.weight.reshape(mid, c), z) \
        + block.conv1.bias[None, :, None]
    bn = block.bn1
    if training:
        mean = t.mean(dim=(0, 2))
        var = ((t - mean[None, :, None]) ** 2).mean(dim=(0, 2))
    else:
        mean, var = bn.running_mean, bn.running_var
    t = (t - mean[None, :, None]) / torch.sqrt(var[None, :, None] + bn.eps) \
        * bn.weight[None, :, None] + bn.bias[None, :, None]
    f = hswish(t)                                               # Eq. 6
    f_h, f_w = f[:, :, :h], f[:, :, h:]
    g_h = sigmoid(torch.einsum('cm,nml->ncl', block.conv_h.weight.reshape(c, mid), f_h)
                  + block.conv_h.bias[None, :, None])           # Eq. 7
    g_w = sigmoid(torch.einsum('cm,nml->ncl', block.conv_w.weight.reshape(c, mid), f_w)
                  + block.conv_w.bias[None, :, None])           # Eq. 8
    return x * g_h[:, :, :, None] * g_w[:, :, None, :], g_h, g_w  # Eq. 9


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('reduction', [32, 4])
def test_matches_equations_eval(shape: tuple[int, int, int, int], reduction: int) -> None:
    block = CoordinateAttention(shape[1], reduction=reduction, dtype=torch.float64).eval()
    randomize(block)
    x = torch.randn(shape, dtype=torch.float64)
    ref, _, _ = coord_reference(block, x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(xcl), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('shape', SHAPES)
def test_matches_equations_train(shape: tuple[int, int, int, int]) -> None:
    block = CoordinateAttention(shape[1], dtype=torch.float64).train()
    randomize(block)
    x = torch.randn(shape, dtype=torch.float64)
    ref, _, _ = coord_reference(block, x, training=True)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-10)


def test_gate_hooks() -> None:
    block = CoordinateAttention(16, dtype=torch.float64).eval()
    randomize(block)
    captured = {}
    block.gate_h.register_forward_hook(lambda m, i, o: captured.setdefault('h', o))
    block.gate_w.register_forward_hook(lambda m, i, o: captured.setdefault('w', o))
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        block(x)
    _, g_h, g_w = coord_reference(block, x)
    assert captured['h'].shape == (2, 16, 5, 1)
    assert captured['w'].shape == (2, 16, 1, 7)
    torch.testing.assert_close(captured['h'][..., 0], g_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(captured['w'][:, :, 0], g_w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('train', [False, True])
def test_gradcheck(train: bool) -> None:
    block = CoordinateAttention(4, min_channels=3, dtype=torch.float64).train(train)
    randomize(block)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    names = [n for n, _ in block.named_parameters()]

    def by_params(*ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(
        by_params, tuple(p.detach().clone().requires_grad_() for p in block.parameters()),
        fast_mode=True)


@pytest.mark.parametrize('channels, reduction, mid', [
    (32, 32, 8),     # max(8, 1)
    (512, 32, 16),   # max(8, 16)
    (300, 32, 9),    # max(8, 9)
    (64, 4, 16),     # max(8, 16)
    (16, 4, 8),      # max(8, 4)
])
def test_mid_channels(channels: int, reduction: int, mid: int) -> None:
    assert CoordinateAttention(channels, reduction=reduction).mid_channels == mid


@pytest.mark.parametrize('channels', [32, 512])
def test_loads_official_checkpoint_keys(channels: int) -> None:
    """The state dict of the official ``CoordAtt(inp=C, oup=C, reduction=32)``
    (Andrew-Qibin/CoordAttention, coordatt.py), written out by hand."""
    mid = max(8, channels // 32)
    official = {
        'conv1.weight': torch.randn(mid, channels, 1, 1), 'conv1.bias': torch.randn(mid),
        'bn1.weight': torch.randn(mid), 'bn1.bias': torch.randn(mid),
        'bn1.running_mean': torch.randn(mid), 'bn1.running_var': torch.rand(mid) + 0.5,
        'bn1.num_batches_tracked': torch.tensor(100),
        'conv_h.weight': torch.randn(channels, mid, 1, 1), 'conv_h.bias': torch.randn(channels),
        'conv_w.weight': torch.randn(channels, mid, 1, 1), 'conv_w.bias': torch.randn(channels),
    }
    block = CoordinateAttention(channels)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in official.items()}
    block.load_state_dict(official, strict=True)
    assert torch.equal(block.conv_w.bias, official['conv_w.bias'])
    assert isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.act, nn.Hardswish)


def test_norm_cfg() -> None:
    block = CoordinateAttention(32, norm_cfg=dict(type='GN', num_groups=4))
    assert isinstance(block.bn1, nn.GroupNorm) and block.bn1.num_groups == 4
    assert block(torch.randn(1, 32, 3, 5)).shape == (1, 32, 3, 5)


def test_abbr() -> None:
    assert CoordinateAttention._abbr_ == 'coord_attn'


@pytest.mark.parametrize('kwargs, match', [
    (dict(reduction=0), r'reduction must be an integer >= 1, got 0'),
    (dict(reduction=2.5), r'reduction must be an integer >= 1, got 2.5'),
    (dict(min_channels=0), r'min_channels must be an integer >= 1, got 0'),
    (dict(act_layer='h_swish'), r"act_layer must be a timm activation name.*got 'h_swish'"),
    (dict(gate_layer=None), r'gate_layer must be a timm activation name.*got None'),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoordinateAttention(16, **kwargs)
    with pytest.raises(ValueError, match=r'in_channels must be an integer >= 1, got -4'):
        CoordinateAttention(-4)


def test_bad_input() -> None:
    block = CoordinateAttention(16)
    with pytest.raises(ValueError, match=r'12 channels.*in_channels=16'):
        block(torch.randn(1, 12, 4, 4))
    with pytest.raises(ValueError, match=r'4-D'):
        block(torch.randn(16, 4, 4))
