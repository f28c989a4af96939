"""The embedded demo data: tiny generated datasets in the real on-disk formats.

``make_demo_data('data/demo')`` writes, in a few seconds and from a fixed seed::

    data/demo/
      cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
      cityscapes/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png
      coco/annotations/person_keypoints_{train,val}2017.json
      coco/{train,val}2017/<12-digit id>.jpg
      imagenet/{train,val}/<class>/<class>_<n>.png
      .demo_data.json          (stamp: generator version, seed and sha256 of every file)

so that mmseg's ``CityscapesDataset``, mmpose's ``CocoDataset`` with ``CocoMetric``
(xtcocotools) and mmpretrain's ``CustomDataset`` read it as they read the real data.
The pictures are simple and their labels quick to learn, every class having its own
colour, texture and place: Cityscapes scenes (24 train / 4 val, 128x256) show a blue sky,
brick facades with windows and yellow signs, green trees, a grey road in perspective with
red cars, beige sidewalks with orange pedestrians, each class in every image, with random
layout, shades and lighting; their label maps hold the train ids (255 for the ego-vehicle
hood). COCO persons (32 train / 8 val images, one or two persons each, 47 / 13 in all)
face the camera with random arm and leg poses, each of their 17 keypoints a disc of its own
colour, all visible, on a plain background. The classification images are one shape (circle, cross,
square, triangle) each.

Writing is deterministic (same seed, same bytes), idempotent (a complete, matching
``out`` is left alone) and atomic: everything is written into a temporary sibling
directory that is renamed to ``out`` only once complete, so an interrupted run leaves
nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image, ImageDraw

from mmattn.utils.file_mode import default_mode

__all__ = ['DEMO_ROOT', 'DEMO_VERSION', 'make_demo_data', 'demo_data_ok']

#: where the tools and the demo configs expect the demo data (relative to the repo root)
DEMO_ROOT = 'data/demo'
#: bump when the generated content changes, so an old copy is rebuilt
DEMO_VERSION = 2
STAMP = '.demo_data.json'

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------- Cityscapes
CITYSCAPES_SIZE = (128, 256)  # (H, W): the real 1024x2048 divided by 8
CITYSCAPES_SPLITS = {'train': {'aachen': 12, 'bochum': 12}, 'val': {'frankfurt': 4}}
ROAD, SIDEWALK, BUILDING, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 7, 8, 10, 11, 13
#: the train ids every demo scene shows (all of them, in every image)
CITYSCAPES_CLASSES = (ROAD, SIDEWALK, BUILDING, SIGN, VEGETATION, SKY, PERSON, CAR)
IGNORE = 255  # the ego-vehicle hood, as in Cityscapes' labelTrainIds
MIN_CLASS_PIXELS = 40  # every class covers at least this many pixels of every scene
# the base colour of each class's pixels (RGB); textures and lighting vary around it
ROAD_RGB, SIDEWALK_RGB, HOOD_RGB = (96, 96, 102), (196, 176, 150), (24, 26, 30)
BRICK_RGB, WINDOW_RGB, SIGN_RGB = (150, 96, 72), (52, 60, 84), (236, 208, 28)
LEAF_RGB, SKY_TOP_RGB, SKY_LOW_RGB = (52, 118, 38), (64, 122, 204), (156, 194, 236)
SHIRT_RGB, TROUSERS_RGB, SKIN_RGB = (246, 136, 28), (214, 100, 12), (236, 170, 120)
CAR_RGB, CAR_GLASS_RGB, TYRE_RGB = (178, 22, 34), (70, 18, 30), (28, 28, 28)

Box = tuple[float, float, float, float]


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1] of ``shape``: a random grid of ``cell``-pixel spacing,
    bilinearly interpolated (blotches of about ``cell`` pixels)."""
    h, w = shape
    grid = rng.uniform(-1, 1, (h // cell + 2, w // cell + 2)).astype(np.float32)
    size = (grid.shape[1] * cell, grid.shape[0] * cell)
    return np.asarray(Image.fromarray(grid).resize(size, Image.BILINEAR))[:h, :w]


class _Scene:
    """A picture and its train-id label map painted together, shape by shape."""

    def __init__(self, rgb: np.ndarray, label: int) -> None:
        h, w = rgb.shape[:2]
        self.img = Image.fromarray(rgb)
        self.label = Image.new('L', (w, h), label)
        self.draw_img = ImageDraw.Draw(self.img)
        self.draw_label = ImageDraw.Draw(self.label)

    def paint(self, kind: str, xy, label: int, color: tuple[int, ...], **kw) -> None:
        getattr(self.draw_img, kind)(xy, fill=tuple(int(c) for c in color), **kw)
        getattr(self.draw_label, kind)(xy, fill=label, **kw)


def _shade(rng: np.random.Generator, color: tuple[int, int, int], spread: float) -> tuple:
    """``color`` with each channel jittered by up to +-``spread``."""
    return tuple(int(np.clip(c + rng.uniform(-spread, spread), 0, 255)) for c in color)


def _car(scene: _Scene, rng: np.random.Generator, x: float, y: float, cw: float) -> None:
    """A car seen from behind, ``cw`` wide, wheels on the line ``y``, left edge at ``x``."""
    ch = cw * float(rng.uniform(0.55, 0.7))
    body = _shade(rng, CAR_RGB, 25)
    top = y - ch
    scene.paint('rounded_rectangle', [x + 0.15 * cw, top, x + 0.85 * cw, top + 0.45 * ch],
                CAR, body, radius=max(1, int(cw / 10)))
    scene.paint('rectangle', [x + 0.24 * cw, top + 0.1 * ch, x + 0.76 * cw, top + 0.38 * ch],
                CAR, CAR_GLASS_RGB)
    scene.paint('rounded_rectangle', [x, top + 0.4 * ch, x + cw, y - 0.12 * ch],
                CAR, body, radius=max(1, int(cw / 12)))
    for wx in (x + 0.08 * cw, x + 0.72 * cw):
        scene.paint('rectangle', [wx, y - 0.2 * ch, wx + 0.2 * cw, y], CAR, TYRE_RGB)


def _person(scene: _Scene, rng: np.random.Generator, x: float, y: float, ph: float) -> None:
    """A pedestrian ``ph`` tall standing on the line ``y``, centred on ``x``."""
    pw = ph * float(rng.uniform(0.3, 0.4))
    head = ph * 0.15
    scene.paint('rectangle', [x - 0.3 * pw, y - 0.5 * ph, x - 0.04 * pw, y], PERSON,
                _shade(rng, TROUSERS_RGB, 15))
    scene.paint('rectangle', [x + 0.04 * pw, y - 0.5 * ph, x + 0.3 * pw, y], PERSON,
                _shade(rng, TROUSERS_RGB, 15))
    scene.paint('rounded_rectangle', [x - 0.5 * pw, y - 0.85 * ph, x + 0.5 * pw, y - 0.45 * ph],
                PERSON, _shade(rng, SHIRT_RGB, 15), radius=max(1, int(pw / 4)))
    scene.paint('ellipse', [x - head / 2, y - ph, x + head / 2, y - ph + head], PERSON,
                _shade(rng, SKIN_RGB, 10))


def _cityscapes_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (RGB uint8 HxWx3, train-id uint8 HxW).

    Each class has its own colour and texture (blue sky with a gradient, brick buildings
    with a grid of windows, yellow signs on the facades, blotchy green trees, grainy grey
    road, tiled beige sidewalks, red cars, orange pedestrians) and its own place (sky on
    top, road in a perspective trapezoid at the bottom, people on the sidewalks); the
    layout, sizes, shades and lighting are drawn at random for every scene."""
    h, w = CITYSCAPES_SIZE
    horizon = int(rng.integers(int(0.45 * h), int(0.6 * h)))
    t = np.clip(np.arange(h, dtype=np.float32) / horizon, 0, 1)[:, None, None]
    sky = np.broadcast_to((1 - t) * SKY_TOP_RGB + t * np.array(SKY_LOW_RGB), (h, w, 3))
    scene = _Scene(np.clip(sky, 0, 255).astype(np.uint8), SKY)

    # buildings: a row of facades of random widths and heights with windows and signs
    x, facades = -int(rng.integers(0, 20)), []
    while x < w:
        bw = int(rng.integers(w // 9, w // 4))
        top = horizon - int(rng.integers(int(0.2 * h), int(0.42 * h)))
        if rng.random() < 0.85:  # else a gap: sky down to the trees
            brick = _shade(rng, BRICK_RGB, 20)
            scene.paint('rectangle', [x, top, x + bw - 1, horizon], BUILDING, brick)
            win, gap = int(rng.integers(3, 6)), int(rng.integers(4, 7))
            for wy in range(top + gap, horizon - win - 2, win + gap):
                for wx in range(x + gap, x + bw - win - gap, win + gap):
                    scene.paint('rectangle', [wx, wy, wx + win - 1, wy + win], BUILDING,
                                WINDOW_RGB)
            facades.append((x, top, bw))
        x += bw
    for fx, top, bw in [facades[int(i)] for i in rng.permutation(len(facades))[:2]]:
        sw, sh = int(rng.integers(18, 30)), int(rng.integers(10, 16))
        sx = fx + int(rng.integers(0, max(1, bw - sw)))
        sy = int(rng.integers(top + 2, max(top + 3, horizon - sh - 12)))
        scene.paint('rectangle', [sx, sy, sx + sw, sy + sh], SIGN, _shade(rng, SIGN_RGB, 15))
        scene.paint('rectangle', [sx + 3, sy + sh // 2 - 1, sx + sw - 3, sy + sh // 2 + 1],
                    SIGN, (60, 50, 20))  # the sign's lettering
    for _ in range(int(rng.integers(1, 4))):  # tree crowns: clusters of ellipses
        cx, cy = float(rng.uniform(0, w)), horizon - float(rng.uniform(0.05, 0.2)) * h
        for _ in range(3):
            rx, ry = rng.uniform(0.04, 0.08) * w, rng.uniform(0.08, 0.16) * h
            ox, oy = rng.normal(0, rx / 2), rng.normal(0, ry / 3)
            scene.paint('ellipse', [cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry],
                        VEGETATION, LEAF_RGB)

    # the ground: sidewalk everywhere below the horizon, the road a trapezoid towards
    # a vanishing point on the horizon
    scene.paint('rectangle', [0, horizon, w, h], SIDEWALK, SIDEWALK_RGB)
    for ty in range(horizon + 3, h, 6):  # paving joints
        scene.paint('line', [(0, ty), (w, ty)], SIDEWALK, (160, 140, 118))
    vx = float(rng.uniform(0.35, 0.65)) * w
    left, right = float(rng.uniform(-0.3, 0.1)) * w, float(rng.uniform(0.9, 1.3)) * w

    def road_edges(y: float) -> tuple[float, float]:
        s = (y - horizon) / (h - horizon)
        return vx - 10 + s * (left - vx + 10), vx + 10 + s * (right - vx - 10)

    scene.paint('polygon', [(vx - 10, horizon), (vx + 10, horizon), (right, h), (left, h)],
                ROAD, ROAD_RGB)
    hood = h - h // 14
    # cars on the road and people on the sidewalks, far ones first
    things = [('car', float(rng.uniform(0.25, 1.0))) for _ in range(int(rng.integers(1, 4)))]
    things += [('person', float(rng.uniform(0.3, 1.0))) for _ in range(int(rng.integers(1, 4)))]
    for kind, depth in sorted(things, key=lambda thing: thing[1]):
        y = horizon + depth * (hood - horizon)
        lo, hi = road_edges(y)
        if kind == 'car':
            cw = (0.1 + 0.14 * depth) * w
            _car(scene, rng, float(rng.uniform(lo, max(lo + 1, hi - cw))), y, cw)
        else:
            ph = (0.2 + 0.3 * depth) * h
            side = [(0.0, lo - ph * 0.25), (hi + ph * 0.25, float(w))][int(rng.integers(0, 2))]
            if side[1] - side[0] < ph * 0.3:  # no room on that side: step onto the road
                side = (lo, hi)
            _person(scene, rng, float(rng.uniform(side[0], side[1])), y, ph)
    scene.paint('rectangle', [0, hood, w, h], IGNORE, HOOD_RGB)  # ego-vehicle hood, ignored

    label = np.asarray(scene.label, dtype=np.uint8)
    img = np.asarray(scene.img, dtype=np.float32)
    # textures: blotchy leaves, grainy asphalt, weathered facades
    leaves = _value_noise(rng, (h, w), 3)[..., None] * np.array([18, 40, 12], np.float32)
    img += np.where((label == VEGETATION)[..., None], leaves, 0)
    img += np.where((label == ROAD)[..., None], rng.normal(0, 7, (h, w, 1)), 0)
    img += np.where((label == BUILDING)[..., None], 10 * _value_noise(rng, (h, w), 8)[..., None], 0)
    # lighting and sensor noise
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-8, 8, 3) + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), label


def _write_cityscapes(root: Path, rng: np.random.Generator) -> None:
    for split, cities in CITYSCAPES_SPLITS.items():
        for city, n in cities.items():
            img_dir = root / 'leftImg8bit' / split / city
            ann_dir = root / 'gtFine' / split / city
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(n):
                img, label = _cityscapes_scene(rng)
                counts = np.bincount(label.ravel(), minlength=256)
                while counts[list(CITYSCAPES_CLASSES)].min() < MIN_CLASS_PIXELS:
                    img, label = _cityscapes_scene(rng)  # a class hidden: draw another
                    counts = np.bincount(label.ravel(), minlength=256)
                stem = f'{city}_{i:06d}_{19 + i:06d}'
                _save_png(img_dir / f'{stem}_leftImg8bit.png', img)
                _save_png(ann_dir / f'{stem}_gtFine_labelTrainIds.png', label)


# ----------------------------------------------------------------------------- COCO keypoints
COCO_SIZE = (128, 160)  # (H, W)
COCO_SPLITS = {'train': (32, 1), 'val': (8, 400001)}  # split: (images, first image id)
KEYPOINTS = ('nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
             'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist',
             'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# the head and trunk of a person facing the camera, in a unit box (x right, y down); the
# person's left is image right. Arms and legs are posed at random by _coco_person.
HEAD_TRUNK = np.array([(.50, .10), (.56, .06), (.44, .06), (.64, .09), (.36, .09),
                       (.72, .24), (.28, .24), (.64, .56), (.36, .56)])
# 17 saturated colours, one per keypoint, spread over the hue circle in the order
# 0, 7, 14, 4, ... so that keypoints drawn close together (eyes, ears, a left/right pair)
# differ widely in hue
KEYPOINT_COLORS = [tuple(int(c) for c in Image.new('HSV', (1, 1), ((k * 7) % 17 * 15, 255, 255))
                         .convert('RGB').getpixel((0, 0))) for k in range(17)]
LIMB_RGB, TRUNK_RGB = (225, 225, 225), (150, 150, 160)


def _limb(start: np.ndarray, length: float, angle: float) -> np.ndarray:
    """The end of a limb of ``length`` from ``start`` at ``angle`` degrees from straight down
    (positive: towards image right)."""
    rad = np.deg2rad(angle)
    return start + length * np.array([np.sin(rad), np.cos(rad)])


def _coco_person(rng: np.random.Generator, draw: ImageDraw.ImageDraw,
                 xrange: tuple[float, float]) -> tuple[np.ndarray, list]:
    """Draw one person facing the camera, between x = ``xrange``: a grey trunk, white limbs
    and a disc of its own colour on each of the 17 keypoints, all visible. Return the
    keypoints (17x3: x, y, visibility 2) and the bbox (x, y, w, h)."""
    h, _ = COCO_SIZE
    ph = float(rng.uniform(0.6, 0.8)) * h
    pw = ph * 0.5
    xy = np.zeros((17, 2))
    xy[[0, 1, 2, 3, 4, 5, 6, 11, 12]] = HEAD_TRUNK * (pw, ph)
    xy[[0, 1, 2, 3, 4]] += rng.normal(0, 0.01 * ph, 2)  # the head turns a little
    upper, lower, thigh, shin = 0.17 * ph, 0.16 * ph, 0.21 * ph, 0.2 * ph
    for side, sign in ((0, 1), (1, -1)):  # the person's left (image right), then right
        shoulder, hip = xy[5 + side], xy[11 + side]
        arm = sign * float(rng.uniform(-10, 100))
        xy[7 + side] = _limb(shoulder, upper, arm)
        xy[9 + side] = _limb(xy[7 + side], lower, arm + sign * float(rng.uniform(-30, 70)))
        leg = sign * float(rng.uniform(-5, 25))
        xy[13 + side] = _limb(hip, thigh, leg)
        xy[15 + side] = _limb(xy[13 + side], shin, leg + float(rng.uniform(-15, 15)))
    # shrink the figure to fit xrange if needed, then place it inside xrange and the image
    span = xy[:, 0].max() - xy[:, 0].min() + ph / 13 + 4
    if span > xrange[1] - xrange[0]:
        xy, ph = xy * (xrange[1] - xrange[0]) / span, ph * (xrange[1] - xrange[0]) / span
    lo, hi = xy[:, 0].min() - ph / 26 - 2, xy[:, 0].max() + ph / 26 + 2
    xy += (float(rng.uniform(xrange[0] - lo, max(xrange[0] - lo, xrange[1] - hi))),
           float(rng.uniform(2, h - xy[:, 1].max() - 2)))
    line = max(2, int(ph / 30))
    draw.polygon([tuple(xy[k]) for k in (5, 6, 12, 11)], fill=TRUNK_RGB)
    for a, b in SKELETON:
        draw.line([tuple(xy[a - 1]), tuple(xy[b - 1])], fill=LIMB_RGB, width=line)
    for k in range(17):
        r = ph / 45 if k < 5 else ph / 26  # the face's keypoints sit closer together
        x, y = xy[k]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=KEYPOINT_COLORS[k])
    kpts = np.concatenate([np.round(xy, 2), np.full((17, 1), 2)], axis=1)
    lo, hi = xy.min(0) - 0.06 * ph, xy.max(0) + 0.06 * ph
    lo, hi = np.maximum(lo, 0), np.minimum(hi, (COCO_SIZE[1] - 1, h - 1))
    bbox = [round(float(lo[0]), 2), round(float(lo[1]), 2),
            round(float(hi[0] - lo[0]), 2), round(float(hi[1] - lo[1]), 2)]
    return kpts, bbox


def _write_coco(root: Path, rng: np.random.Generator) -> None:
    h, w = COCO_SIZE
    (root / 'annotations').mkdir(parents=True)
    categories = [dict(id=1, name='person', supercategory='person',
                       keypoints=list(KEYPOINTS), skeleton=SKELETON)]
    ann_id = 1
    for split, (n, first_id) in COCO_SPLITS.items():
        img_dir = root / f'{split}2017'
        img_dir.mkdir()
        images, annotations = [], []
        for img_id in range(first_id, first_id + n):
            # a plain, softly shaded background of a muted colour
            bg = rng.integers(40, 110, 3).astype(np.float32)
            shade = _value_noise(rng, (h, w), 32)[..., None] * 15
            canvas = np.clip(bg + shade + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(canvas)
            draw = ImageDraw.Draw(img)
            people = int(rng.integers(1, 3))  # one, or two side by side that do not overlap
            for p in range(people):
                kpts, bbox = _coco_person(rng, draw, (p * w / people, (p + 1) * w / people))
                x, y, bw, bh = bbox
                annotations.append(dict(
                    id=ann_id, image_id=img_id, category_id=1, iscrowd=0,
                    keypoints=[float(v) if j % 3 < 2 else int(v)
                               for j, v in enumerate(kpts.reshape(-1))],
                    num_keypoints=int((kpts[:, 2] > 0).sum()),
                    bbox=bbox, area=round(bw * bh * 0.6, 2),
                    segmentation=[[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]))
                ann_id += 1
            file_name = f'{img_id:012d}.jpg'
            buf = io.BytesIO()
            img.save(buf, format='JPEG', quality=95)
            (img_dir / file_name).write_bytes(buf.getvalue())
            images.append(dict(id=img_id, file_name=file_name, height=h, width=w))
        coco = dict(info=dict(description=f'mmattn demo COCO keypoints ({split})',
                              version=str(DEMO_VERSION)),
                    licenses=[], images=images, annotations=annotations,
                    categories=categories)
        (root / 'annotations' / f'person_keypoints_{split}2017.json').write_text(
            json.dumps(coco, indent=1))


# ----------------------------------------------------------------------------- ImageNet-style
IMAGENET_SIZE = 64
IMAGENET_CLASSES = ('circle', 'cross', 'square', 'triangle')
IMAGENET_SPLITS = {'train': 8, 'val': 2}  # images per class


def _write_imagenet(root: Path, rng: np.random.Generator) -> None:
    s = IMAGENET_SIZE
    for split, n in IMAGENET_SPLITS.items():
        for cls in IMAGENET_CLASSES:
            cls_dir = root / split / cls
            cls_dir.mkdir(parents=True)
            for i in range(n):
                bg = rng.integers(0, 256, 3).astype(np.float32)
                canvas = np.clip(bg + rng.normal(0, 15, (s, s, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(canvas)
                draw = ImageDraw.Draw(img)
                color = tuple(int(c) for c in (255 - bg + rng.integers(-40, 40, 3)) % 256)
                r = float(rng.uniform(0.2, 0.4)) * s
                cx, cy = rng.uniform(r + 1, s - r - 1, 2)
                box = [cx - r, cy - r, cx + r, cy + r]
                if cls == 'circle':
                    draw.ellipse(box, fill=color)
                elif cls == 'square':
                    draw.rectangle(box, fill=color)
                elif cls == 'triangle':
                    draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
                else:
                    t = max(2, int(r / 3))
                    draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
                    draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
                _save_png(cls_dir / f'{cls}_{i:04d}.png', np.asarray(img))


# ----------------------------------------------------------------------------- writing
GENERATORS: dict[str, Callable[[Path, np.random.Generator], None]] = {
    'cityscapes': _write_cityscapes, 'coco': _write_coco, 'imagenet': _write_imagenet}


def _save_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG', compress_level=6)
    path.write_bytes(buf.getvalue())


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the stamp, by POSIX relative path."""
    files = sorted(p for p in root.rglob('*') if p.is_file() and p.name != STAMP)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _stamp(seed: int) -> dict:
    return dict(generator='mmattn.datasets.demo', version=DEMO_VERSION, seed=seed)


def demo_data_ok(out: PathLike = DEMO_ROOT, *, seed: int = 0) -> bool:
    """Whether ``out`` holds a complete, unmodified copy of this version's demo data."""
    stamp_file = Path(out) / STAMP
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return False
    files = stamp.pop('files', None)
    return stamp == _stamp(seed) and files == _digest(Path(out))


def make_demo_data(out: PathLike = DEMO_ROOT, *, seed: int = 0, force: bool = False) -> bool:
    """Write the demo datasets into ``out``; return whether anything was written.

    Args:
        out: the directory to create (its parent is created if needed).
        seed: the random seed; the same seed gives byte-identical files.
        force: replace ``out`` even if it exists and was not written by this function.

    Returns:
        ``False`` if ``out`` already held this exact data (nothing done), else ``True``.

    Raises:
        FileExistsError: ``out`` exists, is not demo data of ours and ``force`` is false.
        ValueError: ``seed`` is not an integer >= 0 (NumPy's generators take no other).
    """
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f'make_demo_data: seed must be an integer >= 0, got {seed!r}')
    out = Path(out)
    if demo_data_ok(out, seed=seed):
        return False
    if out.exists() and not force and not (out / STAMP).is_file():
        raise FileExistsError(
            f"out: '{out}' exists and was not written by make_demo_data (no {STAMP}); "
            'remove it, choose another --out or pass --force to replace it')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    old = None
    try:
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private; `out` should not be
        for k, (name, write) in enumerate(GENERATORS.items()):
            write(tmp / name, np.random.default_rng([seed, k]))
        stamp = dict(_stamp(seed), files=_digest(tmp))
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old-', dir=out.parent))
            os.replace(out, old / out.name)  # move aside, then swap in
        try:
            os.replace(tmp, out)
        except OSError:
            if demo_data_ok(out, seed=seed):  # a concurrent run finished first
                return False
            if old is not None:
                os.replace(old / out.name, out)
            raise
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
