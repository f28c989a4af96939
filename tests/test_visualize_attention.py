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
from mmattn.visualization import (CMAP, DEMO_IMAGE, NEAR_CONSTANT_RTOL, AttentionMap,
                                  AttentionRecorder, colour_scale, draw_attention,
                                  make_demo_image, outlook_pixel_map, visualize_attention)

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


@pytest.mark.parametrize('kwargs, message', [
    (dict(image=np.zeros((64, 128), np.uint8)), 'visualize_attention: image must be an (H, W, 3) '
                                                'uint8 RGB array with H, W >= 1, got shape '
                                                '(64, 128) dtype uint8'),
    (dict(image=np.zeros((64, 128, 3), np.float32)), 'got shape (64, 128, 3) dtype float32'),
    (dict(image=np.zeros((0, 128, 3), np.uint8)), 'got shape (0, 128, 3) dtype uint8'),
    (dict(panel_px=0), 'visualize_attention: panel_px must be an integer >= 1, got 0'),
    (dict(panel_px=True), 'visualize_attention: panel_px must be an integer >= 1, got True'),
    (dict(max_rows=0), 'visualize_attention: max_rows must be an integer >= 1, got 0'),
    (dict(query=(0.5,)), 'AttentionRecorder: query must be relative (y, x) in [0, 1], got '
                         '(0.5,)'),
    (dict(query=('0.5', 0.2)), "got y='0.5'"),
])
def test_bad_drawing_arguments_are_named_before_the_forward(
        kwargs: dict, message: str, tmp_path: pytest.TempPathFactory) -> None:
    """A NaN figure size (panel_px=0), an empty figure (max_rows=0), an unpacking error (a
    grey image) or an IndexError (a one-value query) came after the model had run; now the
    argument is named first and the runner is never called."""
    calls = []
    model = _two_block_model(attention_blocks()['PolarizedSelfAttention'])
    args = {'image': _demo(), 'query': (0.5, 0.5), **kwargs}
    with pytest.raises(ValueError) as info:
        visualize_attention(lambda x: calls.append(x), model, args.pop('image'),
                            torch.zeros(1, 3, 64, 128), str(tmp_path / 'x.png'), **args)
    assert message in str(info.value)
    assert calls == [] and list(tmp_path.iterdir()) == []


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


def test_cli_pixel_outside_the_input_is_one_line(tmp_path: pytest.TempPathFactory) -> None:
    """Checked before the model is built where --size gives the input size."""
    with pytest.raises(SystemExit, match=r'--pixel must lie inside the 64x48 input '
                                         r'\(0 <= Y < 64, 0 <= X < 48\), got Y=20, X=48'):
        tool.main(['timm:volo_d1', 'demo', '--out', str(tmp_path / 'v.png'), '--size', '64',
                   '48', '--pixel', '20', '48'])
    assert not (tmp_path / 'v.png').exists()


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
    first = tool.main(args + ['--out', str(tmp_path / 'a.png'), '--random-weights'])
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


# ------------------------------------------------------------------ honest scales and layout
def test_colour_scale() -> None:
    noise = 0.496 + 1e-4 * torch.rand(5, 7)
    const = colour_scale([noise])
    assert const.constant == pytest.approx(0.496, abs=2e-4)
    assert (const.vmin, const.vmax) == (0., const.constant)      # from 0 to the value
    assert const.label == f'constant {const.constant:.4g}'
    zero = colour_scale([torch.zeros(3, 3)])
    assert (zero.vmin, zero.vmax, zero.constant) == (0., 1., 0.)
    a, b = torch.tensor([0.2, 0.5]), torch.tensor([0.3, 0.9])
    shared = colour_scale([a, b])
    assert (shared.vmin, shared.vmax, shared.constant) == (pytest.approx(0.2),
                                                           pytest.approx(0.9), None)
    assert colour_scale([a, b], from_zero=True).vmin == 0.
    # just above the threshold: a real (if small) range is kept
    edge = torch.tensor([1.0, 1.0 + 2 * NEAR_CONSTANT_RTOL])
    assert colour_scale([edge]).constant is None


def _map(block: str, title: str, kind: str, data: torch.Tensor,
         group: str | None = None) -> AttentionMap:
    q = (1, 2) if kind == 'pixel' else None
    return AttentionMap(block, 'Demo', title, kind, data, q, None, group)


def _overlaps(a: object, b: object) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1  # type: ignore


@pytest.mark.parametrize('panel_px', [PANEL_PX, 256])
def test_figure_scales_colormaps_and_layout(panel_px: int) -> None:
    """Panels of one quantity share a labelled scale with the real range, heat maps use the
    sequential colormap, a near-constant map is drawn as its constant, and no title
    overlaps another title or a panel."""
    import matplotlib.pyplot as plt
    torch.manual_seed(0)
    gate_a, gate_b = 0.2 + 0.5 * torch.rand(4, 6), 0.1 + 0.3 * torch.rand(4, 6)
    flat = 0.496 + 1e-5 * torch.rand(4, 6)
    weights = torch.rand(4, 6).softmax(-1)
    weights[0] = 0                                   # pixels that get no weight
    maps = [_map('block.a', 'gate', 'spatial', gate_a), _map('block.a', 'flat', 'spatial', flat),
            _map('block.a', 'w', 'pixel', weights, group='weights'),
            _map('block.a', 'w zoomed', 'pixel', weights[1:3, 1:4], group='weights'),
            _map('block.b', 'gate', 'spatial', gate_b),
            _map('block.b', 'flat', 'spatial', flat.clone()),
            _map('block.b', 'w', 'pixel', weights.flip(0), group='weights'),
            _map('block.b', 'w zoomed', 'pixel', weights[0:2, 0:3], group='weights'),
            _map('block.b', 'channel', 'channel', torch.full((8,), 0.5))]
    fig = draw_attention(_demo(), maps, panel_px=panel_px, max_rows=2,
                         title='Demo: 2 of 2 blocks (random weights)')
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert fig.get_size_inches().tolist() == [5 * panel_px / 100, 2 * panel_px / 100]
        panels = [ax for ax in fig.axes if ax.get_label() != '<colorbar>' and ax.axison]
        assert len(panels) == 9                             # 4 + 5 maps, one cell empty
        heat = {}
        for ax in panels:
            images = ax.get_images()
            if not images:
                continue
            assert images[0].get_cmap().name == 'gray'      # the photo underneath
            (im,) = images[1:]
            assert im.get_cmap().name == CMAP == 'viridis'
            assert im.colorbar is not None
            heat.setdefault(ax.get_title().split('\n')[0], []).append(im)
        for ims in heat.values():                           # one scale per quantity
            assert len({(im.norm.vmin, im.norm.vmax) for im in ims}) == 1
        (g1, g2) = heat['gate']
        lo, hi = min(float(gate_a.min()), float(gate_b.min())), max(float(gate_a.max()),
                                                                  float(gate_b.max()))
        assert (g1.norm.vmin, g1.norm.vmax) == (pytest.approx(lo), pytest.approx(hi))
        for im in heat['flat']:                             # not stretched: 0 .. 0.496
            assert im.norm.vmin == 0. and im.norm.vmax == pytest.approx(0.496, abs=1e-4)
            assert im.colorbar.ax.get_ylabel().startswith('constant 0.496')
        for im in heat['w'] + heat['w zoomed']:             # weights from 0
            assert im.norm.vmin == 0. and im.norm.vmax == pytest.approx(float(weights.max()))
        bars = next(ax for ax in panels if ax.get_title().startswith('channel'))
        assert bars.get_ylim()[0] == 0.                     # bars start at 0
        assert 'constant 0.5' in bars.get_title()
        # layout: the figure title and the panel titles overlap nothing
        sup = fig._suptitle.get_window_extent(renderer)
        titles = [ax.title.get_window_extent(renderer) for ax in panels if ax.get_title()]
        for box in titles:
            assert not _overlaps(sup, box)
        for ax in fig.axes:
            assert not _overlaps(sup, ax.get_window_extent(renderer))
        for i, j in itertools.combinations(range(len(titles)), 2):
            assert not _overlaps(titles[i], titles[j])
        for ax in panels:
            for other in fig.axes:
                if other is not ax:
                    assert not _overlaps(ax.title.get_window_extent(renderer),
                                         other.get_window_extent(renderer))
        fig_box = fig.bbox
        for box in titles + [sup]:
            assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1
            assert box.y0 >= fig_box.y0 - 1 and box.y1 <= fig_box.y1 + 1
    finally:
        plt.close(fig)


def test_cli_defaults_to_the_latest_checkpoint(tmp_path: pytest.TempPathFactory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --checkpoint the tool loads the work dir's latest checkpoint (the same
    picture as passing it), without one it says the weights are random."""
    cfg = tmp_path / 'tiny_se.py'
    cfg.write_text("default_scope = 'mmpretrain'\n"
                   "model = dict(type='mmattn.SqueezeExcitation', in_channels=3, "
                   "rd_channels=2)\n")
    monkeypatch.chdir(tmp_path)
    assert tool.find_checkpoint(str(cfg)) == (None, osp.join('work_dirs', 'tiny_se'))
    assert tool.find_checkpoint('timm:volo_d1') == (None, None)
    from mmattn.analysis import load_model
    work = tmp_path / 'work_dirs' / 'tiny_se'
    work.mkdir(parents=True)
    for it in (2, 10):
        model = load_model(str(cfg)).model
        torch.save({'state_dict': model.state_dict()}, str(work / f'iter_{it}.pth'))
    rel = osp.join('work_dirs', 'tiny_se')
    assert tool.find_checkpoint(str(cfg)) == (osp.join(rel, 'iter_10.pth'), rel)
    assert tool.find_checkpoint(str(cfg), str(work))[0] == str(work / 'iter_10.pth')
    (work / 'last_checkpoint').write_text(str(work / 'iter_2.pth'))
    assert tool.find_checkpoint(str(cfg))[0] == str(work / 'iter_2.pth')

    args = [str(cfg), 'demo', '--size', '32', '64', '--panel-px', str(PANEL_PX)]
    found = tool.main(args + ['--out', str(tmp_path / 'found.png')])
    given = tool.main(args + ['--out', str(tmp_path / 'given.png'), '--checkpoint',
                              str(work / 'iter_2.pth')])
    other = tool.main(args + ['--out', str(tmp_path / 'other.png'), '--checkpoint',
                              str(work / 'iter_10.pth')])
    key = 'SqueezeExcitation'
    pngs = {name: np.asarray(Image.open(d[key])).astype(int)
            for name, d in (('found', found), ('given', given), ('other', other))}
    np.testing.assert_array_equal(pngs['found'], pngs['given'])
    assert np.abs(pngs['found'] - pngs['other']).sum() > 0
    with pytest.raises(FileNotFoundError, match='--checkpoint'):
        tool.main(args + ['--checkpoint', str(tmp_path / 'missing.pth')])


def test_cli_names_a_file_that_is_no_checkpoint(tmp_path: pytest.TempPathFactory) -> None:
    """A wrong --checkpoint is one line naming the file and the fix (exit status 2, as for a
    usage error), before any model is built."""
    import subprocess
    bad = tmp_path / 'iter_40.pth'
    bad.write_bytes(b'not a checkpoint')
    result = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'visualize_attention.py'), 'volo_d1', 'demo',
         '--checkpoint', str(bad), '--out', str(tmp_path / 'x.png')],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert str(bad) in last and 'not a PyTorch checkpoint' in last
    assert not (tmp_path / 'x.png').exists()
