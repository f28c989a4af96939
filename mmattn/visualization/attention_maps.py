"""Capture what every mmattn block attends to in a forward pass, and draw it over the image.

:class:`AttentionRecorder` hooks every attention block of a model (only forward hooks and
pre-hooks on the blocks or their public submodules; the model is not modified) and records,
for the first image of the batch, one :class:`AttentionMap` per quantity:

================================  ===========================================================
block                             recorded
================================  ===========================================================
PolarizedSelfAttention (+ the     ``A^ch`` (channel weights, hook on ``channel_gate``) and
channel-/spatial-only branches)   ``A^sp`` (spatial mask, hook on ``spatial_gate``)
SqueezeExcitation                 ``s`` (channel weights, hook on ``gate``)
EfficientChannelAttention         ``omega`` (channel weights, hook on ``gate``)
CBAM                              ``M_c`` (``channel.gate``) and ``M_s`` (``spatial.gate``)
CoordinateAttention               ``g^h``, ``g^w`` (``gate_h``/``gate_w``, averaged over
                                  channels) and their product
NonLocalAttention                 weights of the query pixel over all pixels
                                  (``attention_map``)
PositionAttention (PAM)           ``s_ji`` of the query pixel j over all pixels i
ChannelAttention (CAM)            the C x C matrix ``x_ji``
DualAttention                     both of the above
RecurrentCrissCrossAttention      the criss-cross weights of the query pixel in each loop,
                                  and their composition over the ``R`` loops
OutlookAttention                  the weight with which every pixel of the neighbourhood
                                  enters the output at the query pixel, summed over the
                                  windows covering it and averaged over heads
================================  ===========================================================

The query pixel is given in relative image coordinates and mapped onto each block's grid.
:func:`draw_attention` draws the maps with matplotlib (Agg), :func:`render_attention` writes
the PNG: spatial maps and per-pixel weights as heat maps over the image, C x C matrices as
images, all in the sequential ``viridis`` with a colour bar in the data's units; channel
weights as bars from 0. Panels of the same quantity share one scale, so rows compare, and a
near-constant quantity (e.g. an untrained gate at 0.496 +- 1e-4) is drawn as the constant it
is rather than stretched over the colours. :func:`visualize_attention` does capture + render.
"""
from __future__ import annotations

import os.path as osp
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmattn.analysis.costs import iter_attention_blocks
from mmattn.layers.checks import check_positive, is_number
from mmattn.utils.file_mode import write_atomic

__all__ = ['AttentionMap', 'AttentionRecorder', 'CMAP', 'ColourScale', 'NEAR_CONSTANT_RTOL',
           'colour_scale', 'draw_attention', 'render_attention', 'visualize_attention',
           'outlook_pixel_map', 'criss_cross_maps']

@dataclass
class AttentionMap:
    """One captured quantity of one block (first image of the batch).

    Attributes:
        block: the block's module name in the model.
        block_type: its class name.
        title: what it is (the paper's symbol).
        kind: ``'channel'`` (``data`` (C,)), ``'spatial'`` (``data`` (h, w) on the block's
            grid), ``'pixel'`` (``data`` (h, w): attention of the query pixel) or ``'matrix'``
            (``data`` (C, C)).
        data: float32 CPU tensor.
        query: ``(row, col)`` of the query pixel on the ``data`` grid, for ``'pixel'`` maps.
        window: the part of the image ``data`` covers, relative ``(y0, x0, y1, x1)``;
            ``None``: all of it.
        group: maps of one block type with the same group share one colour scale in a
            figure (the quantity drawn in several panels); ``None``: the title.
    """

    block: str
    block_type: str
    title: str
    kind: str
    data: torch.Tensor
    query: tuple[int, int] | None = None
    window: tuple[float, float, float, float] | None = None
    group: str | None = None


def _grid_index(rel: tuple[float, float], height: int, width: int) -> tuple[int, int]:
    return (min(int(rel[0] * height), height - 1), min(int(rel[1] * width), width - 1))


# ----------------------------------------------------------------------------- maps of blocks
def criss_cross_maps(cca: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention weights of mmcv's ``CrissCrossAttention`` on ``x`` (B, C, H, W),
    recomputed from its ``query_conv``/``key_conv`` as its forward does (Eq. 1 of CCNet): a
    softmax over the ``H + W`` energies of the column (the pixel itself masked out) and the row.
    Returns (B, H, W, H + W): ``[..., :H]`` the column weights, ``[..., H:]`` the row weights."""
    h = x.shape[2]
    q, k = cca.query_conv(x), cca.key_conv(x)
    energy_h = torch.einsum('bchw,bciw->bhwi', q, k)
    eye = torch.eye(h, dtype=torch.bool, device=x.device)
    energy_h = energy_h.masked_fill(eye[None, :, None, :], float('-inf'))
    energy_w = torch.einsum('bchw,bchj->bhwj', q, k)
    return torch.cat([energy_h, energy_w], dim=-1).softmax(-1)


def _cross_dense(attn: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Dense (H, W) map of the criss-cross weights ``attn`` (H, W, H + W) of pixel (row, col)."""
    h, w = attn.shape[0], attn.shape[1]
    dense = attn.new_zeros(h, w)
    dense[:, col] += attn[row, col, :h]
    dense[row, :] += attn[row, col, h:]
    return dense


def _compose_cross(attns: Sequence[torch.Tensor], row: int, col: int) -> torch.Tensor:
    """How much every pixel reaches (row, col) through the ``R`` criss-cross loops: the
    product of the per-loop weight matrices (values and ``gamma`` left out), one row of it."""
    h, w = attns[0].shape[0], attns[0].shape[1]
    current = _cross_dense(attns[-1], row, col)  # weights over the loop-R sources
    for attn in reversed(attns[:-1]):
        nxt = attn.new_zeros(h, w)
        rows, cols = torch.nonzero(current, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            nxt += current[r, c] * _cross_dense(attn, r, c)
        current = nxt
    return current


def outlook_pixel_map(weights: torch.Tensor, height: int, width: int, row: int, col: int, *,
                      kernel_size: int, padding: int, stride: int) -> torch.Tensor:
    """Effective outlook weights of output pixel (row, col): Eq. 4-5 of VOLO are linear in
    ``V``, and ``Y[row, col] = sum over windows (i,j) covering it at position m of
    sum_n A_{i,j}[m, n] V[Delta(i,j)_n]``; this returns that coefficient of every pixel.

    Args:
        weights: normalised outlook weights of one image, averaged over heads: (h, w, K^2, K^2).
        height, width: the value map's size.
    """
    k, s, p = kernel_size, stride, padding
    grid_h, grid_w = weights.shape[0], weights.shape[1]
    out = weights.new_zeros(height + 2 * p, width + 2 * p)
    pr, pc = row + p, col + p
    for ma in range(k):
        for mb in range(k):
            if (pr - ma) % s or (pc - mb) % s:
                continue
            i, j = (pr - ma) // s, (pc - mb) // s
            if not (0 <= i < grid_h and 0 <= j < grid_w):
                continue
            coeff = weights[i, j, ma * k + mb].view(k, k)
            out[s * i:s * i + k, s * j:s * j + k] += coeff
    return out[p:p + height, p:p + width]


# ----------------------------------------------------------------------------- the recorder
class AttentionRecorder:
    """Context manager that records :class:`AttentionMap` s of every mmattn block in ``model``
    during the forward passes run inside it (``self.maps``, in call order).

    Args:
        model: any module containing mmattn attention blocks.
        query: relative ``(y, x)`` in [0, 1) of the query pixel for the per-pixel maps.
    """

    def __init__(self, model: nn.Module, query: tuple[float, float] = (0.5, 0.5)) -> None:
        if not isinstance(query, Sequence) or len(query) != 2:
            raise ValueError(f'AttentionRecorder: query must be relative (y, x) in [0, 1], '
                             f'got {query!r}')
        for name, value in zip(('y', 'x'), query):
            if not is_number(value) or not 0 <= value <= 1:
                raise ValueError(f'AttentionRecorder: query must be relative (y, x) in [0, 1], '
                                 f'got {name}={value!r}')
        self.model = model
        self.query = (float(query[0]), float(query[1]))
        self.maps: list[AttentionMap] = []
        self._handles: list[Any] = []

    # -- helpers used by the hooks
    def _add(self, block: str, block_type: str, title: str, kind: str, data: torch.Tensor,
             query: tuple[int, int] | None = None,
             window: tuple[float, float, float, float] | None = None,
             group: str | None = None) -> None:
        self.maps.append(AttentionMap(block, block_type, title, kind,
                                      data.detach().float().cpu(), query, window, group))

    def _hook(self, module: nn.Module, fn: Callable[..., None], pre: bool = False) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(fn))
        else:
            self._handles.append(module.register_forward_hook(fn))

    def _gate(self, name: str, kind_name: str, module: nn.Module, title: str, kind: str) -> None:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            first = out[0]
            data = first.flatten() if kind == 'channel' else first.reshape(first.shape[-2:])
            self._add(name, kind_name, title, kind, data)
        self._hook(module, hook)

    # -- per block type
    def _attach(self, name: str, block: nn.Module) -> None:
        tname = type(block).__name__
        if hasattr(block, 'channel_gate') or hasattr(block, 'spatial_gate'):  # PSA family
            if hasattr(block, 'channel_gate'):
                self._gate(name, tname, block.channel_gate, 'A^ch (channel mask)', 'channel')
            if hasattr(block, 'spatial_gate'):
                self._gate(name, tname, block.spatial_gate, 'A^sp (spatial mask)', 'spatial')
        elif tname == 'SqueezeExcitation':
            self._gate(name, tname, block.gate, 's (channel weights)', 'channel')
        elif tname == 'EfficientChannelAttention':
            self._gate(name, tname, block.gate, 'omega (channel weights)', 'channel')
        elif tname == 'CBAM':
            if block.channel is not None:
                self._gate(name, tname, block.channel.gate, 'M_c (channel)', 'channel')
            if block.spatial is not None:
                self._gate(name, tname, block.spatial.gate, 'M_s (spatial)', 'spatial')
        elif tname == 'CoordinateAttention':
            self._attach_coord(name, block)
        elif tname == 'NonLocalAttention':
            self._attach_pixel(name, block, lambda x, rc: block.attention_map(x, rc)[0],
                               'f(x_i, x_j)/C(x) of the query pixel')
        elif tname == 'PositionAttention':
            self._attach_pixel(name, block, lambda x, rc: _pam_row(block, x, rc),
                               's_ji of the query pixel (PAM)')
        elif tname == 'ChannelAttention':
            self._hook(block, lambda _m, args: self._add(
                name, tname, 'x_ji (CAM, C x C)', 'matrix', _cam_matrix(block, args[0])), pre=True)
        elif tname == 'DualAttention':
            self._attach_pixel(name, block, lambda x, rc: _pam_row(block.pam, x, rc),
                               's_ji of the query pixel (PAM)')
            self._hook(block, lambda _m, args: self._add(
                name, tname, 'x_ji (CAM, C x C)', 'matrix', _cam_matrix(block.cam, args[0])),
                pre=True)
        elif tname == 'RecurrentCrissCrossAttention':
            self._attach_rcca(name, block)
        elif tname == 'OutlookAttention':
            self._attach_outlook(name, block)

    def _attach_coord(self, name: str, block: nn.Module) -> None:
        tname = type(block).__name__
        state: dict[str, torch.Tensor] = {}

        def on_h(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            state['h'] = out[0].mean(0)                     # (H, 1)

        def on_w(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            g_h, g_w = state.pop('h'), out[0].mean(0)       # (H, 1), (1, W)
            self._add(name, tname, 'g^h (mean over C)', 'spatial', g_h.expand(-1, g_w.shape[1]),
                      group='gates')
            self._add(name, tname, 'g^w (mean over C)', 'spatial', g_w.expand(g_h.shape[0], -1),
                      group='gates')
            self._add(name, tname, 'g^h g^w (mean over C)', 'spatial', g_h * g_w)
        self._hook(block.gate_h, on_h)
        self._hook(block.gate_w, on_w)

    def _attach_pixel(self, name: str, block: nn.Module,
                      fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor],
                      title: str) -> None:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0][:1]
            rc = _grid_index(self.query, x.shape[2], x.shape[3])
            data = fn(x, rc)
            q = _grid_index(self.query, data.shape[-2], data.shape[-1])
            self._add(name, type(block).__name__, title, 'pixel', data.reshape(data.shape[-2:]), q)
        self._hook(block, hook, pre=True)

    def _attach_rcca(self, name: str, block: nn.Module) -> None:
        tname = type(block).__name__
        attns: list[torch.Tensor] = []

        def on_loop(_m: nn.Module, args: tuple) -> None:
            attns.append(criss_cross_maps(block.cca, args[0][:1])[0])

        def on_block(_m: nn.Module, _i: Any, _o: Any) -> None:
            h, w = attns[0].shape[0], attns[0].shape[1]
            rc = _grid_index(self.query, h, w)
            for r, attn in enumerate(attns, 1):
                self._add(name, tname, f'loop {r}: criss-cross weights', 'pixel',
                          _cross_dense(attn, *rc), rc, group='weights')
            if len(attns) > 1:
                self._add(name, tname, f'{len(attns)} loops composed', 'pixel',
                          _compose_cross(attns, *rc), rc, group='weights')
            attns.clear()
        self._hook(block.cca, on_loop, pre=True)
        self._hook(block, on_block)

    def _attach_outlook(self, name: str, block: nn.Module) -> None:
        # the value projection ``v`` sees the (B, H, W, C) input in both data formats
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0][:1]
            height, width = x.shape[1], x.shape[2]
            weights = block.attention_weights(x)[0].mean(2)  # (h, w, K^2, K^2)
            rc = _grid_index(self.query, height, width)
            data = outlook_pixel_map(weights, height, width, *rc, kernel_size=block.kernel_size,
                                     padding=block.padding, stride=block.stride)
            tname = type(block).__name__
            self._add(name, tname, 'outlook weights of the query pixel', 'pixel', data, rc,
                      group='weights')
            # the neighbourhood it reaches (at most (2K-1) pixels across), zoomed in
            rows, cols = torch.nonzero(data, as_tuple=True)
            r0, r1 = int(rows.min()), int(rows.max()) + 1
            c0, c1 = int(cols.min()), int(cols.max()) + 1
            self._add(name, tname, 'the same, zoomed', 'pixel', data[r0:r1, c0:c1],
                      (rc[0] - r0, rc[1] - c0),
                      (r0 / height, c0 / width, r1 / height, c1 / width), group='weights')
        self._hook(block.v, hook, pre=True)

    def __enter__(self) -> 'AttentionRecorder':
        self.maps.clear()
        for name, block in iter_attention_blocks(self.model):
            self._attach(name, block)
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _pam_row(pam: nn.Module, x: torch.Tensor, rc: tuple[int, int]) -> torch.Tensor:
    """``s_ji`` (Eq. 1 of DANet) of output pixel j = rc over all pixels i: softmax over i of
    ``query_conv(x)_j . key_conv(x)_i``; (H, W)."""
    h, w = x.shape[2], x.shape[3]
    q = pam.query_conv(x)[0, :, rc[0], rc[1]]             # (d,)
    k = pam.key_conv(x)[0].flatten(1)                     # (d, HW)
    return torch.softmax(q @ k, dim=-1).view(h, w)


def _cam_matrix(cam: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x_ji`` (Eq. 3 of DANet; the release's energy when ``cam.energy == 'release'``)."""
    a = x[:1].flatten(2).double()
    energy = torch.bmm(a, a.transpose(1, 2))[0]
    if getattr(cam, 'energy', 'paper') == 'release':
        energy = energy.amax(dim=-1, keepdim=True) - energy
    return torch.softmax(energy, dim=-1)


# ----------------------------------------------------------------------------- rendering
#: the colormap of every heat map: sequential and perceptually uniform (low = dark blue,
#: high = yellow), so equal steps of weight look like equal steps of colour
CMAP = 'viridis'
#: a group of maps whose values span less than this fraction of their magnitude is drawn
#: as the constant it is (one colour, a colour bar from 0 labelled with the value) instead
#: of being stretched over the colour range, where float noise would look like structure
NEAR_CONSTANT_RTOL = 1e-2


@dataclass(frozen=True)
class ColourScale:
    """The value range a colour bar (or a bar chart's axis) spans.

    Attributes:
        vmin, vmax: the data values at the two ends.
        constant: the value of a near-constant group (see :data:`NEAR_CONSTANT_RTOL`), else
            ``None``.
    """

    vmin: float
    vmax: float
    constant: float | None = None

    @property
    def label(self) -> str:
        """``'constant 0.496'`` for a near-constant group, else ``''``."""
        return '' if self.constant is None else f'constant {self.constant:.4g}'


def _near_constant(lo: float, hi: float, rtol: float) -> bool:
    return hi - lo <= rtol * max(abs(lo), abs(hi))


def colour_scale(values: Sequence[torch.Tensor], *, from_zero: bool = False,
                 rtol: float = NEAR_CONSTANT_RTOL) -> ColourScale:
    """One scale for all of ``values``: their min..max (from 0 when ``from_zero``: weights
    and bar lengths), or, when they vary by at most ``rtol`` of their magnitude, a scale
    from 0 to their mean labelled as that constant (0 to 1 for a constant 0)."""
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    if _near_constant(lo, hi, rtol):
        c = float(torch.cat([v.flatten().double() for v in values]).mean())
        return ColourScale(min(0., c), max(0., c) if c != 0 else 1., c)
    return ColourScale(min(lo, 0.) if from_zero else lo, hi)


def _range_text(data: torch.Tensor, rtol: float = NEAR_CONSTANT_RTOL) -> str:
    lo, hi = float(data.min()), float(data.max())
    if _near_constant(lo, hi, rtol):
        return f'constant {float(data.double().mean()):.4g} (spread {hi - lo:.1g})'
    return f'range [{lo:.3g}, {hi:.3g}]'


def _select(names: list[str], limit: int) -> list[str]:
    """``limit`` names spread evenly from the first to the last."""
    if len(names) <= limit:
        return names
    idx = sorted({round(i * (len(names) - 1) / (limit - 1)) for i in range(limit)}) \
        if limit > 1 else [0]
    return [names[i] for i in idx]


def _group_key(m: AttentionMap) -> tuple[str, str]:
    return m.block_type, m.group or m.title


def _wrap(text: str, width: int) -> str:
    return '\n'.join(textwrap.fill(line, width) for line in text.split('\n'))


def _colorbar(fig: Any, mappable: Any, ax: Any, scale: ColourScale, font: float) -> Any:
    from matplotlib.ticker import FormatStrFormatter
    cbar = fig.colorbar(mappable, ax=ax, fraction=0.06, pad=0.03, aspect=15)
    cbar.ax.tick_params(labelsize=font, length=2, pad=1)
    if scale.constant is not None:
        cbar.set_ticks([scale.vmin, scale.vmax])
        cbar.set_label(scale.label, fontsize=font, labelpad=1)
    cbar.ax.yaxis.set_major_formatter(FormatStrFormatter('%.3g'))
    return cbar


def _draw_map(ax: Any, m: AttentionMap, gray: np.ndarray,
              scale: ColourScale) -> Any:
    """A spatial / per-pixel map as a heat map over (its window of) the grey image, in the
    units of the data (``scale`` fixes the colour bar). Dense spatial maps are drawn
    semi-transparent (the colour bar too) and upsampled bilinearly; per-pixel weights opaque
    with nearest upsampling, transparent only where a pixel gets no weight (there the image
    shows), with the query pixel marked."""
    if m.window is not None:
        y0, x0, y1, x1 = m.window
        height, width = gray.shape
        gray = gray[int(y0 * height):max(int(y1 * height), int(y0 * height) + 1),
                    int(x0 * width):max(int(x1 * width), int(x0 * width) + 1)]
    img_h, img_w = gray.shape
    data = m.data.double()
    ax.imshow(gray, cmap='gray', vmin=0, vmax=1)
    if m.kind == 'spatial':
        up = F.interpolate(data[None, None], size=(img_h, img_w), mode='bilinear',
                           align_corners=False)[0, 0].numpy()
        shown: Any = up
        alpha = 0.6
    else:
        up = F.interpolate(data[None, None], size=(img_h, img_w), mode='nearest')[0, 0].numpy()
        shown = np.ma.masked_equal(up, 0.)
        alpha = 1.0
    im = ax.imshow(shown, cmap=CMAP, alpha=alpha, vmin=scale.vmin, vmax=scale.vmax)
    if m.query is not None:
        gh, gw = data.shape
        ax.plot((m.query[1] + 0.5) * img_w / gw - 0.5, (m.query[0] + 0.5) * img_h / gh - 0.5,
                marker='+', color='red', markersize=9, mew=2)
    return im


def check_drawing(image: Any, panel_px: Any, max_rows: Any, caller: str) -> None:
    """What :func:`draw_attention` draws on and at which size: an (H, W, 3) uint8 RGB
    picture with H, W >= 1, ``panel_px`` and ``max_rows`` integers >= 1; else ValueError
    naming ``caller`` and the argument."""
    if (not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3
            or image.dtype != np.uint8 or not image.size):
        got = (f'shape {image.shape} dtype {image.dtype}' if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ValueError(f'{caller}: image must be an (H, W, 3) uint8 RGB array with H, W >= 1, '
                         f'got {got}')
    check_positive('panel_px', panel_px, caller)
    check_positive('max_rows', max_rows, caller)


def draw_attention(image: np.ndarray, maps: Sequence[AttentionMap], *, panel_px: int = 256,
                   max_rows: int = 4, title: str | None = None) -> Any:
    """The matplotlib figure of ``maps``: one row per block (at most ``max_rows`` blocks
    spread over the depth), one column per captured quantity.

    Every heat map uses the sequential :data:`CMAP` with a colour bar in the data's units;
    maps of the same quantity (same block type and :attr:`AttentionMap.group`) share one
    scale across the figure (:func:`colour_scale`), so rows compare; per-pixel weights and
    channel-weight bars start at 0; a near-constant group is drawn as its constant. Each
    panel's title gives its own range. The figure is ``cols * panel_px`` wide and
    ``rows * panel_px`` high at 100 dpi; matplotlib's constrained layout places the title,
    panel titles and colour bars without overlaps.
    """
    import matplotlib
    matplotlib.use('Agg', force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    check_drawing(image, panel_px, max_rows, 'draw_attention')
    if not maps:
        raise ValueError('draw_attention: maps is empty (no attention block ran)')
    blocks: dict[str, list[AttentionMap]] = {}
    for m in maps:
        blocks.setdefault(m.block, []).append(m)
    rows = _select(list(blocks), max_rows)
    drawn = [m for b in rows for m in blocks[b]]
    groups: dict[tuple[str, str], list[AttentionMap]] = {}
    for m in drawn:
        groups.setdefault(_group_key(m), []).append(m)
    scales = {key: colour_scale([m.data for m in ms],
                                from_zero=ms[0].kind in ('pixel', 'channel'))
              for key, ms in groups.items()}
    ncols = max(len(blocks[b]) for b in rows)
    dpi = 100
    # text scaled with the panels, titles wrapped to a panel's width (about 3/4 of it
    # is left beside a colour bar; a character is about 0.55 em wide)
    font = min(8., max(4.5, 6.5 * panel_px / 256))
    chars = max(12, int(0.75 * panel_px / (0.55 * font * dpi / 72)))
    fig = plt.figure(figsize=(ncols * panel_px / dpi, len(rows) * panel_px / dpi), dpi=dpi,
                     layout='constrained')
    fig.get_layout_engine().set(w_pad=2 / dpi, h_pad=2 / dpi, wspace=0.02, hspace=0.02)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    gray = image.astype(np.float32).mean(-1) / 255.
    for r, block in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(blocks[block]):
                ax.axis('off')
                continue
            m = blocks[block][c]
            scale = scales[_group_key(m)]
            if m.kind == 'channel':
                data = m.data.double().numpy()
                ax.bar(np.arange(data.size), data, width=1.0, color='tab:blue')
                ax.set_xlim(-0.5, data.size - 0.5)
                ax.set_ylim(scale.vmin, scale.vmax + 0.05 * (scale.vmax - scale.vmin))
                ax.set_yticks([scale.vmin, scale.vmax])
                ax.yaxis.set_major_formatter(FormatStrFormatter('%.3g'))
                ax.tick_params(labelsize=font - 0.5, length=2, pad=1)
                ax.set_xlabel('channel', fontsize=font - 0.5, labelpad=1)
            elif m.kind == 'matrix':
                im = ax.imshow(m.data.double().numpy(), cmap=CMAP, interpolation='nearest',
                               vmin=scale.vmin, vmax=scale.vmax)
                _colorbar(fig, im, ax, scale, font - 0.5)
            else:
                _colorbar(fig, _draw_map(ax, m, gray, scale), ax, scale, font - 0.5)
            ax.set_title(_wrap(f'{m.title}\n{_range_text(m.data)}', chars), fontsize=font,
                         pad=2)
            if c == 0:
                ax.set_ylabel(block if len(block) <= 28 else '...' + block[-25:], fontsize=font)
    if title:
        fig.suptitle(_wrap(title, int(chars * ncols * 0.9)), fontsize=font + 1.5)
    return fig


def render_attention(image: np.ndarray, maps: Sequence[AttentionMap], out: str, *,
                     panel_px: int = 256, max_rows: int = 4, title: str | None = None) -> str:
    """Draw ``maps`` with :func:`draw_attention` into the PNG ``out`` (written to a
    temporary file renamed into place); returns ``out``. ``image`` is (H, W, 3) uint8 RGB."""
    import matplotlib.pyplot as plt

    fig = draw_attention(image, maps, panel_px=panel_px, max_rows=max_rows, title=title)
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=fig.dpi, format='png'))
    finally:
        plt.close(fig)


def visualize_attention(runner: Callable[[torch.Tensor], Any], model: nn.Module,
                        image: np.ndarray, inputs: torch.Tensor, out: str, *,
                        query: tuple[float, float] = (0.5, 0.5), max_rows: int = 4,
                        panel_px: int = 256, note: str | None = None) -> dict[str, str]:
    """Run ``runner(inputs)`` with an :class:`AttentionRecorder` on ``model`` and write one
    PNG per block type, ``<out stem>_<BlockType>.png``, plus ``out`` itself: an overview with
    the first block of every type (one row each).

    Args:
        runner: what to call with ``inputs`` (e.g. :class:`mmattn.analysis.TensorForward`).
        model: the module holding the blocks (hooks go there).
        image: (H, W, 3) uint8 RGB picture matching ``inputs`` (drawn under the maps).
        inputs: the preprocessed (1, 3, H, W) batch.
        out: path of the overview PNG.
        query: relative (y, x) of the query pixel.
        note: appended to every figure's title (e.g. which weights were loaded).

    Returns:
        ``{'overview': out, '<BlockType>': path, ...}``.

    Raises:
        ValueError: the model holds no mmattn attention block, or ``image``, ``query``,
            ``panel_px`` or ``max_rows`` is not what is described above (named before the
            forward runs).
    """
    check_drawing(image, panel_px, max_rows, 'visualize_attention')  # before the forward
    if not any(True for _ in iter_attention_blocks(model)):
        raise ValueError(f'visualize_attention: model ({type(model).__name__}) contains no '
                         f'mmattn attention block')
    with AttentionRecorder(model, query) as rec, torch.no_grad():
        runner(inputs)
    by_type: dict[str, list[AttentionMap]] = {}
    for m in rec.maps:
        by_type.setdefault(m.block_type, []).append(m)
    stem, ext = osp.splitext(out)
    suffix = f' ({note})' if note else ''
    written = {}
    firsts: list[AttentionMap] = []
    for tname, maps in by_type.items():
        path = f'{stem}_{tname}{ext or ".png"}'
        n_blocks = len({m.block for m in maps})
        written[tname] = render_attention(
            image, maps, path, panel_px=panel_px, max_rows=max_rows,
            title=f'{tname}: {min(n_blocks, max_rows)} of {n_blocks} blocks{suffix}')
        first = maps[0].block
        firsts.extend(m for m in maps if m.block == first)
    written['overview'] = render_attention(image, firsts, out, panel_px=panel_px,
                                           max_rows=len(by_type),
                                           title=f'first block of each type{suffix}')
    return written

