"""The demo picture shipped as ``demo/demo.png``: a street scene drawn from a fixed recipe.

``make_demo_image()`` draws it (deterministic: no randomness, same pixels on every platform
that runs the same Pillow); ``python tools/visualize_attention.py --make-demo demo/demo.png``
writes it. Sky, buildings with windows, a road with lane marks, a car, a pedestrian, a tree
and a sign give attention something to pick out.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['DEMO_IMAGE', 'make_demo_image', 'save_demo_image']

#: the shipped demo picture, relative to the repository root
DEMO_IMAGE = 'demo/demo.png'


def make_demo_image(height: int = 256, width: int = 512) -> np.ndarray:
    """Draw the demo street scene; returns (height, width, 3) uint8 RGB.

    The default 256 x 512 has the Cityscapes aspect ratio; every shape scales with the size.
    """
    if height < 16 or width < 16:
        raise ValueError(f'make_demo_image: height and width must be >= 16, got '
                         f'height={height}, width={width}')
    h, w = height, width
    # sky: vertical gradient; ground below the horizon
    t = np.linspace(0., 1., h, dtype=np.float32)[:, None, None]
    sky = (1 - t) * np.array([90, 150, 220], np.float32) + t * np.array([200, 225, 245],
                                                                       np.float32)
    canvas = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(img)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        return int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h)

    horizon = 0.62
    # buildings with windows
    buildings = [(0.00, 0.18, 0.16, (120, 110, 105)), (0.16, 0.30, 0.30, (150, 140, 130)),
                 (0.30, 0.10, 0.42, (100, 100, 115)), (0.62, 0.22, 0.80, (135, 120, 110)),
                 (0.80, 0.05, 1.00, (110, 115, 125))]
    for x0, top, x1, colour in buildings:
        draw.rectangle(box(x0, top, x1, horizon), fill=colour)
        cols = max(2, int((x1 - x0) * w / 18))
        rows = max(2, int((horizon - top) * h / 22))
        for r in range(rows):
            for c in range(cols):
                wx = x0 + (c + 0.3) * (x1 - x0) / cols
                wy = top + (r + 0.3) * (horizon - top - 0.04) / rows
                draw.rectangle(box(wx, wy, wx + 0.4 * (x1 - x0) / cols,
                                   wy + 0.45 * (horizon - top - 0.04) / rows),
                               fill=(230, 220, 150) if (r + c) % 3 else (60, 70, 90))
    # sidewalk and road with lane marks
    draw.rectangle(box(0, horizon, 1, horizon + 0.06), fill=(190, 180, 185))
    draw.rectangle(box(0, horizon + 0.06, 1, 1), fill=(85, 85, 90))
    for i in range(8):
        draw.rectangle(box(0.03 + i * 0.125, 0.84, 0.10 + i * 0.125, 0.86), fill=(240, 240, 240))
    # tree
    draw.rectangle(box(0.50, 0.42, 0.52, horizon + 0.04), fill=(90, 60, 30))
    draw.ellipse(box(0.44, 0.22, 0.58, 0.47), fill=(50, 130, 50))
    # sign on a pole
    draw.rectangle(box(0.585, 0.40, 0.592, horizon + 0.05), fill=(150, 150, 150))
    draw.regular_polygon((int(0.588 * w), int(0.38 * h), int(0.035 * min(h, w) * 1.4)), 8,
                         fill=(210, 30, 30))
    # car
    draw.rounded_rectangle(box(0.18, 0.70, 0.42, 0.84), radius=max(2, h // 40),
                           fill=(20, 60, 160))
    draw.polygon([(int(0.22 * w), int(0.70 * h)), (int(0.26 * w), int(0.62 * h)),
                  (int(0.35 * w), int(0.62 * h)), (int(0.39 * w), int(0.70 * h))],
                 fill=(30, 80, 190))
    draw.polygon([(int(0.24 * w), int(0.695 * h)), (int(0.27 * w), int(0.635 * h)),
                  (int(0.34 * w), int(0.635 * h)), (int(0.37 * w), int(0.695 * h))],
                 fill=(170, 210, 235))
    for cx in (0.23, 0.37):
        draw.ellipse(box(cx - 0.03, 0.80, cx + 0.03, 0.92), fill=(15, 15, 15))
        draw.ellipse(box(cx - 0.012, 0.835, cx + 0.012, 0.885), fill=(160, 160, 160))
    # pedestrian: head, body, arms, legs
    px = 0.72
    draw.ellipse(box(px - 0.013, 0.50, px + 0.013, 0.56), fill=(230, 190, 160))
    draw.rectangle(box(px - 0.016, 0.56, px + 0.016, 0.70), fill=(200, 40, 60))
    lw = max(1, w // 200)
    draw.line([(int((px - 0.016) * w), int(0.58 * h)), (int((px - 0.035) * w), int(0.68 * h))],
              fill=(200, 40, 60), width=lw * 2)
    draw.line([(int((px + 0.016) * w), int(0.58 * h)), (int((px + 0.035) * w), int(0.68 * h))],
              fill=(200, 40, 60), width=lw * 2)
    draw.line([(int((px - 0.008) * w), int(0.70 * h)), (int((px - 0.02) * w), int(0.80 * h))],
              fill=(40, 40, 70), width=lw * 3)
    draw.line([(int((px + 0.008) * w), int(0.70 * h)), (int((px + 0.02) * w), int(0.80 * h))],
              fill=(40, 40, 70), width=lw * 3)
    # sun
    draw.ellipse(box(0.88, 0.04, 0.95, 0.18), fill=(255, 235, 120))
    return np.asarray(img, dtype=np.uint8).copy()


def save_demo_image(path: str, height: int = 256, width: int = 512) -> str:
    """Write :func:`make_demo_image` as a PNG at ``path``; returns ``path``."""
    Image.fromarray(make_demo_image(height, width)).save(path, optimize=True)
    return path
