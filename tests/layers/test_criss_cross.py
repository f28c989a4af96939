"""RecurrentCrissCrossAttention against CCNet's Eq. 1-2 and Sec. 3.3 written out in float64 with
an explicit loop over each pixel's criss-cross path (H + W - 1 positions, the pixel once), shared
weights across loops, mmcv's keys, identity at init, gradcheck and the argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmattn.layers import RecurrentCrissCrossAttention

SHAPES = [(2, 8, 5, 7), (1, 8, 1, 1), (1, 16, 3, 3), (1, 8, 1, 6), (2, 8, 4, 1)]


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return (torch.einsum('oc,bchw->bohw', conv.weight[:, :, 0, 0], x)
            + conv.bias[None, :, None, None])


def cross(h: int, w: int, height: int, width: int, centre_twice: bool = False) -> list:
    """The criss-cross path of (h, w): its row and its column, (h, w) once (H + W - 1)."""
    path = [(h, j) for j in range(width)]
    path += [(i, w) for i in range(height) if i != h or centre_twice]
    return path


def cca_reference(m: nn.Module, x: torch.Tensor, centre_twice: bool = False) -> torch.Tensor:
    """H'_u = gamma sum_i A_{i,u} Phi_{i,u} + H_u, A = softmax_i(Q_u . Omega_{i,u}) (Eq. 1-2)."""
    q, k, v = conv1x1(x, m.query_conv), conv1x1(x, m.key_conv), conv1x1(x, m.value_conv)
    _, _, height, width = x.shape
    out = torch.zeros_like(x)
    for h in range(height):
        for w in range(width):
            path = cross(h, w, height, width, centre_twice)
            assert len(path) == height + width - 1 + centre_twice
            keys = torch.stack([k[:, :, i, j] for i, j in path], dim=-1)    # (B, C', P)
            values = torch.stack([v[:, :, i, j] for i, j in path], dim=-1)  # (B, C, P)
            d = torch.einsum('bc,bcp->bp', q[:, :, h, w], keys)
            a = torch.exp(d) / torch.exp(d).sum(dim=-1, keepdim=True)
            out[:, :, h, w] = torch.einsum('bp,bcp->bc', a, values)
    return m.gamma.scale * out + x


def randomise(m: RecurrentCrissCrossAttention) -> RecurrentCrissCrossAttention:
    with torch.no_grad():
        m.cca.gamma.scale.fill_(0.8)
    return m


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('recurrence', [1, 2, 3])
def test_matches_paper(shape: tuple, recurrence: int) -> None:
    """R loops of one module with shared weights (Sec. 3.3)."""
    m = randomise(RecurrentCrissCrossAttention(shape[1], recurrence=recurrence,
                                               dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    expected = x
    for _ in range(recurrence):
        expected = cca_reference(m.cca, expected)
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-10)


def test_centre_is_counted_once() -> None:
    """The reference that counts the pixel twice (H + W positions) disagrees: the test above
    does pin mmcv's handling of the centre."""
    m = randomise(RecurrentCrissCrossAttention(8, recurrence=1, dtype=torch.float64))
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    assert (m(x) - cca_reference(m.cca, x, centre_twice=True)).abs().max() > 1e-6


def test_weights_shared_and_keys() -> None:
    m = RecurrentCrissCrossAttention(32)
    assert m.recurrence == 2
    assert set(m.state_dict()) == {
        'cca.query_conv.weight', 'cca.query_conv.bias', 'cca.key_conv.weight',
        'cca.key_conv.bias', 'cca.value_conv.weight', 'cca.value_conv.bias', 'cca.gamma.scale'}
    assert m.cca.query_conv.out_channels == 4 and m.cca.value_conv.out_channels == 32
    assert sum(p.numel() for p in m.parameters()) == sum(
        p.numel() for p in RecurrentCrissCrossAttention(32, recurrence=5).parameters())


def test_identity_at_init() -> None:
    m = RecurrentCrissCrossAttention(16)
    assert m.cca.gamma.scale.item() == 0
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(m(x), x)


def test_device_dtype_and_channels_last() -> None:
    m = randomise(RecurrentCrissCrossAttention(8, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in m.parameters())
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), rtol=0,
                               atol=1e-12)


def test_gradcheck() -> None:
    m = randomise(RecurrentCrissCrossAttention(8, dtype=torch.float64))
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match='in_channels must be an integer >= 8, got 7'):
        RecurrentCrissCrossAttention(7)
    with pytest.raises(ValueError, match='recurrence'):
        RecurrentCrissCrossAttention(8, recurrence=0)
    with pytest.raises(ValueError, match='in_channels=8'):
        RecurrentCrissCrossAttention(8)(torch.randn(1, 16, 3, 3))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_module(dtype: torch.dtype) -> None:
    """A .half()/.bfloat16() module works (mmcv's op alone mixes in its float32 mask)."""
    m = randomise(RecurrentCrissCrossAttention(16, dtype=torch.float64))
    x = torch.randn(1, 16, 5, 7, dtype=torch.float64)
    expected = cca_reference(m.cca, cca_reference(m.cca, x))
    out = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.1)


def test_onnx_export_dynamo() -> None:
    """The docstring's export route (the TorchScript exporter lacks aten::diag)."""
    onnxruntime = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    m = randomise(RecurrentCrissCrossAttention(8)).eval()
    x = torch.randn(1, 8, 5, 4)
    with torch.no_grad():
        program = torch.onnx.export(m, (x,), dynamo=True, verbose=False)
        expected = m(x)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-5)
