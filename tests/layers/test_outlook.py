"""OutlookAttention (VOLO, arXiv 2106.13112): the maths against a reference written from the
paper's equations, equality with timm's implementation, gradients, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmattn.layers import OutlookAttention
from mmattn.layers.outlook import outlook_attention
from mmattn.ops.outlook import outlook_pool
from mmattn.registry import MODELS


def reference_outlook(x: torch.Tensor, block: OutlookAttention) -> torch.Tensor:
    """Outlook attention of ``x`` (B, C, H, W), from Sec. 3.1 of the paper, with explicit loops.

    Pooled token of cell (i, j): mean of the in-image pixels of rows s*i..s*i+s-1, cols
    s*j..s*j+s-1. ``A_{i,j} = W_A token + b_A`` reshaped per head to (K^2 x K^2) (rows: window
    position m, columns: source position n), scaled by d^-1/2 and softmax-normalised over n.
    Window (i, j) covers pixels (s*i - p + a, s*j - p + b), 0 <= a, b < K, position m = a*K + b;
    pixels outside the image are zero values. Eq. 4: ``Y_{i,j}[m] = sum_n A[m, n] V[n]``.
    Eq. 5: each output pixel sums ``Y_{i,j}[m]`` over every window (i, j) whose position m lands
    on it. Finally the projection ``W_P y + b_P``.
    """
    k, p, s, heads = block.kernel_size, block.padding, block.stride, block.num_heads
    wv = block.v.weight.detach()
    bv = block.v.bias.detach() if block.v.bias is not None else torch.zeros_like(wv[:, 0])
    wa, ba = block.attn.weight.detach(), block.attn.bias.detach()
    wp, bp = block.proj.weight.detach(), block.proj.bias.detach()
    bsz, c, height, width = x.shape
    d = c // heads
    h, w = math.ceil(height / s), math.ceil(width / s)
    out = torch.zeros_like(x)
    for bi in range(bsz):
        values = torch.einsum('oc,chw->ohw', wv, x[bi]) + bv[:, None, None]
        window_out = {}
        for i in range(h):
            for j in range(w):
                token = x[bi, :, s * i:s * i + s, s * j:s * j + s].mean(dim=(1, 2))
                logits = (wa @ token + ba).view(heads, k * k, k * k) * d ** -0.5
                weights = torch.softmax(logits, dim=-1)
                window_v = torch.zeros(k * k, c, dtype=x.dtype)
                for a in range(k):
                    for b in range(k):
                        u, t = s * i - p + a, s * j - p + b
                        if 0 <= u < height and 0 <= t < width:
                            window_v[a * k + b] = values[:, u, t]
                y = torch.zeros(k * k, c, dtype=x.dtype)
                for head in range(heads):
                    chans = slice(head * d, (head + 1) * d)
                    y[:, chans] = weights[head] @ window_v[:, chans]
                window_out[i, j] = y
        folded = torch.zeros(c, height, width, dtype=x.dtype)
        for u in range(height):
            for t in range(width):
                for (i, j), y in window_out.items():
                    a, b = u - (s * i - p), t - (s * j - p)
                    if 0 <= a < k and 0 <= b < k:
                        folded[:, u, t] += y[a * k + b]
        out[bi] = torch.einsum('oc,chw->ohw', wp, folded) + bp[:, None, None]
    return out


def make_block(channels, **kwargs) -> OutlookAttention:
    torch.manual_seed(0)
    block = OutlookAttention(channels, dtype=torch.float64, **kwargs).eval()
    with torch.no_grad():  # larger weights than the default init make the softmax non-trivial
        for prm in block.parameters():
            prm.normal_(0, 0.5)
    return block


# (channels, heads, kernel, padding, stride, H, W)
CASES = [
    (4, 1, 3, 1, 1, 5, 4),
    (6, 2, 3, 1, 2, 7, 5),  # VOLO's geometry, odd sizes
    (6, 3, 3, 1, 2, 1, 1),
    (3, 1, 3, 1, 1, 1, 1),
    (4, 2, 5, 2, 2, 6, 3),
    (4, 2, 5, 2, 3, 7, 8),
    (4, 1, 2, 0, 2, 4, 6),  # non-overlapping windows (even sizes only)
    (4, 1, 4, 1, 2, 6, 4),  # even kernel, works for even sizes
]


@pytest.mark.parametrize('c,heads,k,p,s,height,width', CASES)
def test_matches_paper_reference(c, heads, k, p, s, height, width):
    block = make_block(c, num_heads=heads, kernel_size=k, padding=p, stride=s, qkv_bias=True)
    x = torch.randn(2, c, height, width, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_outlook(x, block), rtol=0, atol=1e-10)


def test_no_qkv_bias_and_batch1():
    block = make_block(8, num_heads=2, stride=2)
    assert block.v.bias is None
    x = torch.randn(1, 8, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_outlook(x, block), rtol=0, atol=1e-10)


@pytest.mark.parametrize('c,heads,k,p,s,height,width', CASES[:5])
def test_matches_timm(c, heads, k, p, s, height, width):
    from timm.models.volo import OutlookAttention as TimmOutlookAttention
    block = make_block(c, num_heads=heads, kernel_size=k, padding=p, stride=s, qkv_bias=True)
    ref = TimmOutlookAttention(c, heads, kernel_size=k, padding=p, stride=s, qkv_bias=True)
    ref = ref.double().eval()
    ref.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, height, width, c, dtype=torch.float64)  # timm's layer is NHWC
    expected = ref(x)
    torch.testing.assert_close(block(x.permute(0, 3, 1, 2)), expected.permute(0, 3, 1, 2),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(block.forward_nhwc(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize('s', [1, 2])
def test_gradcheck(s):
    block = make_block(4, num_heads=2, stride=s, qkv_bias=True)
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))
    # and the functional core on its own inputs
    v = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    h, w = math.ceil(3 / s), math.ceil(5 / s)
    attn = torch.rand(1, h, w, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v_, a_: outlook_attention(v_, a_, kernel_size=3, padding=1, stride=s), (v, attn))


def paper_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """AvgPool_s of (B, H, W, C) ``x`` as the paper's pooled tokens: cell (i, j) is the mean of
    the in-image pixels of rows s*i..s*i+s-1 and columns s*j..s*j+s-1."""
    height, width = x.shape[1], x.shape[2]
    rows, cols = -(-height // s), -(-width // s)
    return torch.stack([torch.stack([x[:, s * i:s * i + s, s * j:s * j + s].mean((1, 2))
                                     for j in range(cols)], 1) for i in range(rows)], 1)


@pytest.mark.parametrize('s, height, width', [(2, 6, 4), (3, 9, 6), (2, 5, 4), (2, 7, 7),
                                              (3, 4, 9), (1, 3, 5)])
def test_outlook_pool_is_the_papers_average_pooling(s, height, width):
    """Sizes the stride divides and sizes with partial cells (ceil mode) alike."""
    x = torch.randn(2, height, width, 5, dtype=torch.float64)
    torch.testing.assert_close(outlook_pool(x, s), paper_pool(x, s), rtol=0, atol=1e-12)


@pytest.mark.parametrize('s, height, width', [(2, 7, 5), (3, 4, 8)])
def test_outlook_pool_gradient_under_torch_compile(s, height, width):
    """Inductor's gradient of the pooling is the paper pooling's: each pixel gets its cell's
    gradient over the cell's pixel count, the partial cells of the last row and column included
    (Inductor's avg_pool2d backward with the default count_include_pad=True divides those by
    s^2, pytorch/pytorch#198119, torch 2.13.0: a compiled VOLO block trained wrongly there)."""
    x = torch.randn(2, height, width, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, -(-height // s), -(-width // s), 5, dtype=torch.float64)
    compiled = torch.compile(outlook_pool, dynamic=False)
    (ours,) = torch.autograd.grad(compiled(x, s), x, grad)
    (truth,) = torch.autograd.grad(paper_pool(x, s), x, grad)
    torch.testing.assert_close(ours, truth, rtol=0, atol=1e-12)


def test_outlook_weights_are_normalised():
    block = make_block(6, num_heads=3, stride=2)
    weights = block.attention_weights(torch.randn(2, 5, 7, 6, dtype=torch.float64))
    assert weights.shape == (2, 3, 4, 3, 9, 9)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 4, 3, 9, dtype=torch.float64))


def test_defaults_registry_device_dtype():
    block = MODELS.build(dict(type='mmattn.OutlookAttention', in_channels=32))
    assert isinstance(block, OutlookAttention) and block.in_channels == 32
    assert OutlookAttention._abbr_ == 'outlook'
    assert sorted(block.state_dict()) == ['attn.bias', 'attn.weight', 'proj.bias', 'proj.weight',
                                          'v.weight']
    assert block.attn.out_features == 81
    meta = OutlookAttention(16, num_heads=4, device='meta', dtype=torch.float16)
    assert all(t.device.type == 'meta' and t.dtype == torch.float16
               for t in meta.parameters())
    x = torch.randn(2, 32, 9, 11)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), out)


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_heads=3), 'in_channels=8 is not divisible by num_heads=3'),
    (dict(num_heads=0), 'num_heads must be an integer >= 1'),
    (dict(kernel_size=0), 'kernel_size must be an integer >= 1'),
    (dict(stride=4), 'stride must be <= kernel_size=3'),
    (dict(padding=3), 'padding must be < kernel_size=3'),
    (dict(padding=-1), 'padding must be an integer >= 0'),
    (dict(attn_drop=1.5), r'attn_drop must be a probability, a number in \[0, 1\], got 1.5'),
    (dict(proj_drop=-0.1), r'proj_drop must be a probability, a number in \[0, 1\], got -0.1'),
    (dict(proj_drop='0.1'), r"proj_drop must be a probability, a number in \[0, 1\], got '0.1'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OutlookAttention(8, **kwargs)


def test_sizes_that_do_not_tile():
    block = OutlookAttention(4, kernel_size=2, padding=0, stride=2)
    block(torch.randn(1, 4, 4, 6))  # even sizes tile
    with pytest.raises(ValueError, match=r'kernel_size=2, padding=0, stride=2 do not tile an '
                                         r'input of height 5'):
        block(torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match='width 3'):
        block(torch.randn(1, 4, 4, 3))
    with pytest.raises(ValueError, match='in_channels=4'):
        block(torch.randn(1, 5, 4, 4))


def test_geometry_that_tiles_no_size_fails_at_construction():
    """A (kernel_size, padding, stride) for which no input length n has as many unfold windows
    (counted by F.unfold) as ceil-mode pooled cells (counted by F.avg_pool2d) is refused when
    the block is built; every other one builds, and runs at a length it tiles."""
    def tiles(n: int, k: int, p: int, s: int) -> bool:
        if n + 2 * p < k:
            return False
        line = torch.zeros(1, 1, 1, n)
        windows = F.unfold(line, (1, k), padding=(0, p), stride=(1, s)).shape[-1]
        cells = F.avg_pool2d(line, (1, s), (1, s), ceil_mode=True).shape[-1]
        return windows == cells
    refused = 0
    for k in range(1, 7):
        for p in range(k):
            for s in range(1, k + 1):
                sizes = [n for n in range(1, 40) if tiles(n, k, p, s)]
                if sizes:
                    block = OutlookAttention(4, kernel_size=k, padding=p, stride=s)
                    assert block(torch.randn(1, 4, sizes[0], sizes[-1])).shape[2:] == \
                        (sizes[0], sizes[-1])
                else:
                    refused += 1
                    with pytest.raises(ValueError, match=rf'kernel_size={k}, padding={p}, '
                                                         rf'stride={s} tile no input size'):
                        OutlookAttention(4, kernel_size=k, padding=p, stride=s)
    assert refused > 0
    with pytest.raises(ValueError, match=r'kernel_size=2, padding=1, stride=1 tile no input '
                                         r'size .*use kernel_size = 2\*padding \+ 1'):
        OutlookAttention(8, kernel_size=2)
