"""mmattn.analysis and tools/analysis: MAC counts from hand-written formulas, per-block
attribution, the activation-memory measures and the command lines."""
from __future__ import annotations

import json
import os.path as osp
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmattn.analysis import count_flops, load_model, measure_block, model_costs, saved_bytes
from mmattn.layers import attention_blocks

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools', 'analysis'))
import block_costs  # noqa: E402
import get_flops  # noqa: E402


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)


def _macs(fn, *inputs: torch.Tensor) -> int:
    return int(count_flops(_Fn(fn), inputs).total())


def test_sdpa_is_counted() -> None:
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 5)
    # q k^T: 2*3 * 10*12*8 ; A v: 2*3 * 10*12*5
    assert _macs(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), q, k, v) == \
        2 * 3 * 10 * 12 * (8 + 5)


def test_matmul_broadcast_and_einsum() -> None:
    a, b = torch.randn(4, 5), torch.randn(2, 3, 5, 6)
    assert _macs(torch.matmul, a, b) == 2 * 3 * 4 * 5 * 6
    assert _macs(lambda x, y: x @ y, b.transpose(-1, -2), b) == 2 * 3 * 6 * 5 * 6
    q, k = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 7, 6)
    assert _macs(lambda x, y: torch.einsum('bchw,bciw->bhwi', x, y), q, k) == 2 * 4 * 5 * 6 * 7


def test_non_local_macs_from_the_paper_shapes() -> None:
    """Embedded Gaussian non-local at C, C' = C/2, N = HW: three 1x1 embeddings (C C' N
    each), W_z (C' C N), theta^T phi (N N C') and the weighted sum (N N C'); the SDPA path
    and the explicit one cost the same."""
    c, h, w = 16, 6, 5
    n, ci = h * w, c // 2
    expected = 3 * c * ci * n + ci * c * n + 2 * n * n * ci
    cls = attention_blocks()['NonLocalAttention']
    x = torch.randn(1, c, h, w)
    for efficient in (True, False):
        assert measure_block(cls(c, efficient=efficient), x)['macs'] == expected


def test_psa_macs_from_the_paper_shapes() -> None:
    """PSA_p (paper form) at C, N = HW: W_v, W_q of the channel branch (C C/2 N + C N), the
    product with the softmaxed query (C/2 N), W_z (C/2 C), LN (5 C, mmengine's norm estimate);
    spatial branch W_q, W_v (2 C C/2 N) and the product with the pooled query (C/2 N)."""
    c, h, w = 16, 5, 7
    n, half = h * w, c // 2
    expected = (c * half * n + c * n + half * n + half * c + 5 * c) + (2 * c * half * n + half * n)
    block = attention_blocks()['PolarizedSelfAttention'](c, mode='parallel')
    assert measure_block(block, torch.randn(1, c, h, w))['macs'] == expected


def test_volo_d1_matches_timm_published_macs() -> None:
    """timm lists volo_d1_224 at 6.94 GMACs and 26.6 M parameters."""
    loaded = load_model('timm:volo_d1')
    cost = model_costs(loaded.runner, (torch.zeros(1, 3, 224, 224),), root=loaded.model)
    assert abs(cost.macs / 6.94e9 - 1) < 0.02
    assert abs(cost.params / 26.6e6 - 1) < 0.01
    # per-block attribution of VOLO's outlook blocks (NHWC, called as modules): C=192,
    # 6 heads, K=3, stride 2 on the 28x28 grid (14x14 pooled): v and proj (HW C C each), the
    # weight predictor (hw C K^4 N) and the aggregation (hw K^2 K^2 C)
    big, small, c = 28 * 28, 14 * 14, 192
    per_block = 2 * big * c * c + small * c * 81 * 6 + small * 81 * c
    outlook = [b for b in cost.blocks if b.type == 'OutlookAttention']
    assert len(outlook) == 4
    assert all(b.macs == per_block for b in outlook)


def test_activation_memory_sees_the_quadratic_map() -> None:
    """The eager non-local stores the N x N weights (N = HW), the SDPA path does not."""
    c, h, w = 8, 16, 16
    n = h * w
    cls = attention_blocks()['NonLocalAttention']
    x = torch.randn(1, c, h, w)
    eager = measure_block(cls(c, efficient=False), x)
    fused = measure_block(cls(c, efficient=True), x)
    assert eager['peak_bytes'] >= n * n * 4
    assert eager['saved_bytes'] >= n * n * 4
    assert fused['peak_bytes'] < n * n * 4
    # ECA keeps only its C weights (and the output) besides the input
    eca = measure_block(attention_blocks()['EfficientChannelAttention'](c), x)
    assert eca['peak_bytes'] >= c * n * 4  # the output
    assert eca['saved_bytes'] < c * n * 4


def test_saved_bytes_counts_what_autograd_keeps() -> None:
    """x * y keeps both factors for the backward (the inputs are not counted, so one product
    of two inputs keeps nothing new); exp keeps its output. A non-tensor input is named."""
    x = torch.randn(64, requires_grad=True)
    y = torch.randn(64, requires_grad=True)
    assert saved_bytes(lambda a, b: a * b, x, y) == 0
    assert saved_bytes(lambda a: (a * 2).exp(), x) == 64 * 4   # exp's output; a * 2 keeps none
    with pytest.raises(TypeError, match='saved_bytes: inputs must be tensors, got int at '
                                        'position 1'):
        saved_bytes(lambda a, b: a * b, x, 3)


def test_get_flops_cli(tmp_path: pytest.TempPathFactory) -> None:
    out = str(tmp_path / 'f.json')
    result = get_flops.main(['timm:volo_d1', '--shape', '64', '64', '--json', out,
                             '--per-block'])
    with open(out) as f:
        assert json.load(f)['macs'] == result['macs']
    assert result['blocks_by_type']['OutlookAttention']['count'] == 4
    assert result['blocks'][0]['name'].startswith('network.0.')


def test_block_costs_cli(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture) -> None:
    rows = block_costs.main(['--channels', '16', '--size', '8', '8',
                             '--blocks', 'NonLocalAttention', 'SqueezeExcitation'])
    labels = [(r['block'], r['variant']) for r in rows]
    assert labels == [('NonLocalAttention', 'default'),
                      ('NonLocalAttention', 'eager reference (efficient=False)'),
                      ('SqueezeExcitation', 'default')]
    assert '| NonLocalAttention |' in capsys.readouterr().out
    with pytest.raises(ValueError, match='unknown block'):
        block_costs.main(['--blocks', 'NotABlock'])


def test_load_model_rejects_bad_spec() -> None:
    with pytest.raises(ValueError, match='no such file'):
        load_model('configs/does_not_exist.py')
