"""tools/visualize_attention.py and mmattn.visualization: the captured maps are the ones the
blocks use (checked against the papers' equations), and a PNG is written per block type."""
from __future__ import annotations

import itertools
import os.path as osp
import sys

import numpy as np
import pytest
import torch

from PIL import Image
from torch import nn

from mmattn.layers import attention_blocks
from mmattn.visualization import (DEMO_IMAGE, AttentionRecorder, make_demo_image,
                                  outlook_pixel_map, visualize_attention)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import visualize_attention as tool  # noqa: E402

# panels per block, from the table in the spec: PSA A^ch + A^sp; SE/ECA one channel vector;
# CBAM M_c + M_s; CoordAtt g^h, g^w, product; NL/PAM one pixel map; CAM one matrix; DANet
# both; RCCA loop 1, loop 2, composition (R=2); outlook map + zoom.
PANELS = {
    'PolarizedSelfAttention': 2, 'PolarizedChannelAttention': 1, 'PolarizedSpatialAttention': 1,
    'SqueezeExcitation': 1, 'EfficientChannelAttention': 1, 'CBAM': 2, 'CoordinateAttention': 3,
    'NonLocalAttention': 1, 'PositionAttention': 1, 'ChannelAttention': 1, 'DualAttention': 2,
    'RecurrentCrissCrossAttention': 3, 'OutlookAttention': 2,
}
PANEL_PX = 128


def _demo(height: int = 64, width: int = 128) -> np.ndarray:
    img = Image.open(osp.join(ROOT, DEMO_IMAGE)).convert('RGB')
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def _two_block_model(cls: type[nn.Module], channels: int = 32) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), cls(channels),
                          cls(channels)).eval()
    for name, p in model.named_parameters():  # residual scales start at 0: open them
        if 'gamma' in name:
            torch.nn.init.constant_(p, 0.7)
    return model


def _panels(path: str, rows: int, cols: int) -> list[np.ndarray]:
    arr = np.asarray(Image.open(path).convert('RGB')).astype(np.int16)
    return [arr[r * PANEL_PX:(r + 1) * PANEL_PX, c * PANEL_PX:(c + 1) * PANEL_PX]
            for r in range(rows) for c in range(cols)]


def test_demo_image_ships_and_is_reproducible() -> None:
    shipped = np.asarray(Image.open(osp.join(ROOT, DEMO_IMAGE)).convert('RGB'))
    assert shipped.shape == (256, 512, 3)
    assert osp.getsize(osp.join(ROOT, DEMO_IMAGE)) < 200 * 1024
    np.testing.assert_array_equal(shipped, make_demo_image())


def test_every_block_type_is_covered() -> None:
    assert set(attention_blocks()) == set(PANELS)


@pytest.mark.parametrize('name', sorted(PANELS))
def test_png_per_block_type(name: str, tmp_path: pytest.TempPathFactory) -> None:
    image = _demo()
    model = _two_block_model(attention_blocks()[name])
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.
    out = str(tmp_path / 'vis.png')
    written = visualize_attention(model, model, image, x, out, query=(0.6, 0.3),
                                  panel_px=PANEL_PX)
    assert set(written) == {name, 'overview'}
    cols = PANELS[name]
    with Image.open(written[name]) as png:
        assert png.size == (cols * PANEL_PX, 2 * PANEL_PX)   # 2 blocks x the block's maps
    with Image.open(written['overview']) as png:
        assert png.size == (cols * PANEL_PX, PANEL_PX)
    panels = _panels(written[name], 2, cols)
    for a, b in itertools.combinations(range(len(panels)), 2):
        assert np.abs(panels[a] - panels[b]).sum() > 0, f'panels {a} and {b} are identical'
    for p in panels:
        assert p.std() > 0


def test_no_block_raises(tmp_path: pytest.TempPathFactory) -> None:
    model = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match='contains no mmattn attention block'):
        visualize_attention(model, model, _demo(), torch.zeros(1, 3, 64, 128),
                            str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='query'):
        AttentionRecorder(model, query=(1.5, 0.2))


# ------------------------------------------------------------------ the maps are the real ones
def _record(block: nn.Module, x: torch.Tensor, query: tuple[float, float] = (0.4, 0.7)):
    with AttentionRecorder(block, query) as rec, torch.no_grad():
        out = block(x)
    return rec.maps, out


def test_psa_masks_are_those_of_eq5() -> None:
    block = attention_blocks()['PolarizedSelfAttention'](16, mode='parallel').double().eval()
    x = torch.randn(1, 16, 5, 7, dtype=torch.float64)
    maps, out = _record(block, x)
    ch = next(m for m in maps if 'A^ch' in m.title).data.double()
    sp = next(m for m in maps if 'A^sp' in m.title).data.double()
    assert ch.shape == (16,) and sp.shape == (5, 7)
    # PSA_p(X) = A^ch (.) X + A^sp (.) X  (Eq. 5); masks stored in float32
    ref = ch.view(1, 16, 1, 1) * x + sp.view(1, 1, 5, 7) * x
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_se_weights_rescale_the_channels() -> None:
    block = attention_blocks()['SqueezeExcitation'](32).eval()
    x = torch.randn(1, 32, 6, 5)
    maps, out = _record(block, x)
    (m,) = maps
    torch.testing.assert_close(out, m.data.view(1, 32, 1, 1) * x)


def test_pam_row_is_eq1() -> None:
    """DANet Eq. 1-2: E_j - A_j = alpha sum_i s_ji D_i with s_ji = softmax_i(B_i . C_j)."""
    block = attention_blocks()['PositionAttention'](16).double().eval()
    torch.nn.init.constant_(block.gamma, 1.0)
    x = torch.randn(1, 16, 5, 6, dtype=torch.float64)
    maps, out = _record(block, x, query=(0.5, 0.5))
    (m,) = maps
    r, c = m.query
    assert (r, c) == (2, 3)
    q = block.query_conv(x)[0, :, r, c]
    k = block.key_conv(x)[0].flatten(1)
    s_ref = torch.softmax(q @ k, -1)
    torch.testing.assert_close(m.data.double().flatten(), s_ref, rtol=1e-6, atol=1e-7)
    d = block.value_conv(x)[0].flatten(1)
    torch.testing.assert_close((out - x)[0, :, r, c], d @ s_ref)


def test_criss_cross_weights_are_ccnet_eq1() -> None:
    """Each loop's map: softmax over the column (u itself excluded) and the row of
    d_{i,u} = Q_u . K_i, and the aggregation H'_u = gamma sum_i A_{i,u} V_i + H_u matches
    what mmcv's op computes."""
    block = attention_blocks()['RecurrentCrissCrossAttention'](16, recurrence=1).double().eval()
    torch.nn.init.constant_(block.cca.gamma.scale, 0.5)
    x = torch.randn(1, 16, 5, 4, dtype=torch.float64)
    maps, out = _record(block, x, query=(0.5, 0.3))
    (m,) = maps
    r, c = m.query
    q = block.cca.query_conv(x)[0, :, r, c]
    k = block.cca.key_conv(x)[0]
    cross = [(i, c) for i in range(5) if i != r] + [(r, j) for j in range(4)]
    energies = torch.stack([q @ k[:, i, j] for i, j in cross])
    weights = torch.softmax(energies, 0)
    ref = torch.zeros(5, 4, dtype=torch.float64)
    for (i, j), wgt in zip(cross, weights):
        ref[i, j] += wgt
    torch.testing.assert_close(m.data.double(), ref, rtol=1e-5, atol=1e-7)
    v = block.cca.value_conv(x)[0]
    agg = sum(wgt * v[:, i, j] for (i, j), wgt in zip(cross, weights))
    torch.testing.assert_close(out[0, :, r, c], x[0, :, r, c] + 0.5 * agg)


@pytest.mark.parametrize('size,kernel,padding,stride,pixel', [
    ((7, 9), 3, 1, 2, (3, 4)), ((6, 5), 3, 1, 1, (0, 4)), ((8, 8), 5, 2, 2, (5, 2))])
def test_outlook_pixel_map_is_eq4_5(size: tuple[int, int], kernel: int, padding: int,
                                    stride: int, pixel: tuple[int, int]) -> None:
    """Y_{Delta(i,j)} = A_{i,j} V_{Delta(i,j)} (Eq. 4) folded by summing (Eq. 5): the
    coefficient of V at every pixel in the output at ``pixel``, from the definition."""
    height, width = size
    gh, gw = -(-height // stride), -(-width // stride)
    k2 = kernel * kernel
    weights = torch.rand(gh, gw, k2, k2, dtype=torch.float64).softmax(-1)
    ref = torch.zeros(height, width, dtype=torch.float64)
    for i, j, m, n in itertools.product(range(gh), range(gw), range(k2), range(k2)):
        out_pos = (stride * i - padding + m // kernel, stride * j - padding + m % kernel)
        src = (stride * i - padding + n // kernel, stride * j - padding + n % kernel)
        if out_pos == pixel and 0 <= src[0] < height and 0 <= src[1] < width:
            ref[src] += weights[i, j, m, n]
    got = outlook_pixel_map(weights, height, width, *pixel, kernel_size=kernel,
                            padding=padding, stride=stride)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_outlook_map_matches_the_block_aggregation() -> None:
    """The captured map is the derivative of the block's output (before ``proj``) at the
    query pixel with respect to V, for a single head."""
    cls = attention_blocks()['OutlookAttention']
    block = cls(8, num_heads=1, kernel_size=3, padding=1, stride=2).double().eval()
    x = torch.randn(1, 7, 6, 8, dtype=torch.float64)  # NHWC, as VOLO calls it
    with AttentionRecorder(block, (0.5, 0.5)) as rec, torch.no_grad():
        block.forward_nhwc(x)
    full = rec.maps[0]
    r, c = full.query
    from mmattn.layers.outlook import outlook_attention
    v = torch.zeros(1, 7, 6, 8, dtype=torch.float64, requires_grad=True)
    y = outlook_attention(v, block.attention_weights(x).detach(), kernel_size=3, padding=1,
                          stride=2)
    (grad,) = torch.autograd.grad(y[0, r, c, 0], v)
    torch.testing.assert_close(full.data.double(), grad[0, :, :, 0], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the command line
def test_cli_timm_model(tmp_path: pytest.TempPathFactory) -> None:
    out = str(tmp_path / 'volo.png')
    written = tool.main(['timm:volo_d1', 'demo', '--out', out, '--size', '64', '64',
                         '--pixel', '20', '40', '--panel-px', str(PANEL_PX)])
    assert set(written) == {'OutlookAttention', 'overview'}
    with Image.open(written['OutlookAttention']) as png:
        assert png.size == (2 * PANEL_PX, 4 * PANEL_PX)  # 4 outlookers, map + zoom


def test_cli_mm_config_with_checkpoint(tmp_path: pytest.TempPathFactory) -> None:
    """A config whose model is a small plugin HRNet with PSA, first with random weights, then
    with a checkpoint of changed weights: the maps change."""
    extra = dict(
        stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1,),
                    num_channels=(8,)),
        stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1),
                    num_channels=(8, 16)),
        stage3=dict(num_modules=1, num_branches=3, block='BASIC', num_blocks=(1, 1, 1),
                    num_channels=(8, 16, 32)),
        stage4=dict(num_modules=1, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1),
                    num_channels=(8, 16, 32, 64)))
    cfg = tmp_path / 'tiny_psa_hrnet.py'
    cfg.write_text(
        "default_scope = 'mmpose'\n"
        f'model = dict(type="mmattn.PosePluginHRNet", extra={extra!r}, plugins=[dict(\n'
        "    cfg=dict(type='mmattn.PolarizedSelfAttention'), position='after_conv1',\n"
        '    stages=(False, True, True, True))])\n')
    args = [str(cfg), 'demo', '--size', '64', '96', '--panel-px', str(PANEL_PX),
            '--max-blocks', '3']
    first = tool.main(args + ['--out', str(tmp_path / 'a.png')])
    with Image.open(first['PolarizedSelfAttention']) as png:
        assert png.size == (2 * PANEL_PX, 3 * PANEL_PX)

    from mmattn.analysis import load_model
    model = load_model(str(cfg)).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.psa.' in name:
                p.add_(torch.randn_like(p))
    ckpt = str(tmp_path / 'changed.pth')
    torch.save({'state_dict': model.state_dict()}, ckpt)
    second = tool.main(args + ['--out', str(tmp_path / 'b.png'), '--checkpoint', ckpt])
    a = np.asarray(Image.open(first['PolarizedSelfAttention']))
    b = np.asarray(Image.open(second['PolarizedSelfAttention']))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).sum() > 0


def test_cli_rejects_unknown_model() -> None:
    with pytest.raises(ValueError, match='timm'):
        tool.main(['not_a_model_xyz', 'demo'])



