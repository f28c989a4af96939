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
The pictures are simple and their labels learnable: Cityscapes scenes are bands of sky,
building and road with cars, people, trees and signs drawn in the Cityscapes palette
(plus noise), their label maps hold the train ids (255 for the ego-vehicle hood);
COCO persons are stick figures whose 17 keypoints are discs of 17 distinct colours;
the classification images are one shape (circle, cross, square, triangle) each.

Writing is deterministic (same seed, same bytes), idempotent (a complete, matching
``out`` is left alone) and atomic: everything is written into a temporary sibling
directory that is renamed to ``out`` only once complete, so an interrupted run leaves
nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import io
import json
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
DEMO_VERSION = 1
STAMP = '.demo_data.json'

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------- Cityscapes
CITYSCAPES_SIZE = (128, 256)  # (H, W): the real 1024x2048 divided by 8
CITYSCAPES_SPLITS = {'train': {'aachen': 8, 'bochum': 8}, 'val': {'frankfurt': 4}}
# train id -> colour of the Cityscapes palette (mmseg's CityscapesDataset.METAINFO)
PALETTE = {0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 5: (153, 153, 153),
           7: (220, 220, 0), 8: (107, 142, 35), 10: (70, 130, 180), 11: (220, 20, 60),
           13: (0, 0, 142)}
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 10, 11, 13
IGNORE = 255


def _cityscapes_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (RGB uint8 HxWx3, train-id uint8 HxW)."""
    h, w = CITYSCAPES_SIZE
    label = Image.new('L', (w, h), SKY)
    draw = ImageDraw.Draw(label)
    skyline = int(rng.integers(h // 6, h // 3))
    horizon = int(rng.integers(h // 2, 2 * h // 3))
    # buildings of random heights between the skyline and the horizon
    x = 0
    while x < w:
        bw = int(rng.integers(w // 10, w // 4))
        top = skyline + int(rng.integers(-h // 10, h // 10))
        draw.rectangle([x, max(top, 0), x + bw, horizon], fill=BUILDING)
        x += bw
    draw.rectangle([0, horizon, w, h], fill=ROAD)
    # sidewalks: a wedge on each side of the road
    draw.polygon([(0, horizon), (w // 5, horizon), (0, h * 4 // 5)], fill=SIDEWALK)
    draw.polygon([(w, horizon), (w - w // 5, horizon), (w, h * 4 // 5)], fill=SIDEWALK)
    for _ in range(int(rng.integers(1, 3))):  # trees
        cx, r = int(rng.integers(0, w)), int(rng.integers(h // 12, h // 6))
        cy = horizon - r - int(rng.integers(0, h // 8))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=VEGETATION)
    for _ in range(int(rng.integers(0, 2))):  # a pole with a sign
        px = int(rng.integers(w // 8, w - w // 8))
        draw.rectangle([px, skyline, px + 2, horizon + h // 16], fill=POLE)
        draw.polygon([(px - 6, skyline), (px + 8, skyline), (px + 1, skyline + 12)], fill=SIGN)
    for _ in range(int(rng.integers(1, 4))):  # cars on the road
        cw, ch = int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 10, h // 5))
        cx = int(rng.integers(0, w - cw))
        cy = horizon + int(rng.integers(0, max(1, h - horizon - ch - h // 8)))
        draw.rounded_rectangle([cx, cy, cx + cw, cy + ch], radius=3, fill=CAR)
    for _ in range(int(rng.integers(1, 4))):  # people
        pw, ph = int(rng.integers(5, 10)), int(rng.integers(h // 6, h // 3))
        px = int(rng.integers(0, w - pw))
        py = horizon - ph // 2 + int(rng.integers(0, h // 8))
        draw.ellipse([px, py, px + pw, py + ph], fill=PERSON)
    draw.rectangle([0, h - h // 12, w, h], fill=IGNORE)  # ego-vehicle hood, ignored
    label_np = np.asarray(label, dtype=np.uint8)

    lut = np.zeros((256, 3), np.float32)
    for train_id, color in PALETTE.items():
        lut[train_id] = color
    lut[IGNORE] = (20, 20, 20)
    img = lut[label_np] * rng.uniform(0.8, 1.2) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), label_np


def _write_cityscapes(root: Path, rng: np.random.Generator) -> None:
    for split, cities in CITYSCAPES_SPLITS.items():
        for city, n in cities.items():
            img_dir = root / 'leftImg8bit' / split / city
            ann_dir = root / 'gtFine' / split / city
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(n):
                img, label = _cityscapes_scene(rng)
                stem = f'{city}_{i:06d}_{19 + i:06d}'
                _save_png(img_dir / f'{stem}_leftImg8bit.png', img)
                _save_png(ann_dir / f'{stem}_gtFine_labelTrainIds.png', label)


# ----------------------------------------------------------------------------- COCO keypoints
COCO_SIZE = (128, 160)  # (H, W)
COCO_SPLITS = {'train': (16, 1), 'val': (8, 400001)}  # split: (images, first image id)
KEYPOINTS = ('nose', 'left_eye', 'right_eye', 'left_ear', 'right_ear', 'left_shoulder',
             'right_shoulder', 'left_elbow', 'right_elbow', 'left_wrist', 'right_wrist',
             'left_hip', 'right_hip', 'left_knee', 'right_knee', 'left_ankle', 'right_ankle')
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
# a person facing the camera, in a unit box (x right, y down); the person's left is image right
TEMPLATE = np.array([(.50, .08), (.54, .05), (.46, .05), (.58, .07), (.42, .07), (.68, .22),
                     (.32, .22), (.75, .40), (.25, .40), (.78, .56), (.22, .56), (.62, .55),
                     (.38, .55), (.63, .76), (.37, .76), (.64, .96), (.36, .96)])
# 17 well separated colours (hue wheel), one per keypoint
KEYPOINT_COLORS = [tuple(int(c) for c in Image.new('HSV', (1, 1), (k * 15, 255, 255))
                         .convert('RGB').getpixel((0, 0))) for k in range(17)]


def _coco_person(rng: np.random.Generator, draw: ImageDraw.ImageDraw) -> tuple[np.ndarray, list]:
    """Draw one stick figure; return its keypoints (17x3: x, y, visibility) and bbox."""
    h, w = COCO_SIZE
    ph = float(rng.uniform(0.55, 0.9)) * h
    pw = ph * float(rng.uniform(0.45, 0.65))
    x0 = float(rng.uniform(2, w - pw - 2))
    y0 = float(rng.uniform(2, h - ph - 2))
    xy = TEMPLATE * (pw, ph) + (x0, y0) + rng.normal(0, 0.015 * ph, TEMPLATE.shape)
    if rng.random() < 0.5:  # some people face away: left and right swap sides in the image
        xy[:, 0] = 2 * x0 + pw - xy[:, 0]
    vis = np.where(rng.random(17) < 0.1, 1, 2)  # 1: labelled but occluded
    for a, b in SKELETON:
        draw.line([tuple(xy[a - 1]), tuple(xy[b - 1])], fill=(235, 235, 235), width=2)
    r = max(2.0, ph / 30)
    for k in range(17):
        if vis[k] == 2:
            x, y = xy[k]
            draw.ellipse([x - r, y - r, x + r, y + r], fill=KEYPOINT_COLORS[k])
    kpts = np.concatenate([np.round(xy, 2), vis[:, None]], axis=1)
    lo, hi = xy.min(0) - 0.08 * ph, xy.max(0) + 0.08 * ph
    lo, hi = np.maximum(lo, 0), np.minimum(hi, (w - 1, h - 1))
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
            bg = rng.integers(40, 110, 3).astype(np.float32)
            canvas = np.clip(bg + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(canvas)
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 3))):
                kpts, bbox = _coco_person(rng, draw)
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
    """
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
