"""The embedded demo data: deterministic, idempotent, atomic, read by the real
mmseg / mmpose / mmpretrain datasets as their real data is, and learnable: the classes
are told apart by a per-pixel colour classifier, the keypoints are visible discs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from PIL import Image

from mmattn.datasets import demo
from mmattn.datasets.demo import make_demo_data

CITYSCAPES_COUNTS = {'train': 24, 'val': 4}


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('demo') / 'data'
    assert make_demo_data(root) is True
    return root


def test_same_seed_same_bytes_and_idempotent(demo_root: Path, tmp_path: Path) -> None:
    other = tmp_path / 'again'
    make_demo_data(other)
    files = sorted(p.relative_to(demo_root) for p in demo_root.rglob('*') if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob('*') if p.is_file())
    assert all((demo_root / f).read_bytes() == (other / f).read_bytes() for f in files)
    assert make_demo_data(other) is False  # complete copy: left alone
    (other / files[0]).write_bytes(b'damaged')
    assert make_demo_data(other) is True  # a damaged copy is rewritten
    assert (other / files[0]).read_bytes() == (demo_root / files[0]).read_bytes()


@pytest.mark.parametrize('seed', [-1, 1.5, '3', True, None])
def test_a_seed_numpy_cannot_take_is_named(seed: object, tmp_path: Path) -> None:
    """NumPy's own messages ('expected non-negative integer', 'unrecognized seed string')
    named neither the argument nor the value; nothing is written."""
    with pytest.raises(ValueError, match=f'make_demo_data: seed must be an integer >= 0, got '
                                         f'{re.escape(repr(seed))}$'):
        make_demo_data(tmp_path / 'data', seed=seed)
    assert list(tmp_path.iterdir()) == []


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(root: Path, rng: np.random.Generator) -> None:
        (root / 'partial.txt').parent.mkdir(parents=True)
        (root / 'partial.txt').write_text('half')
        raise RuntimeError('disk full')

    monkeypatch.setitem(demo.GENERATORS, 'imagenet', broken)
    with pytest.raises(RuntimeError, match='disk full'):
        make_demo_data(tmp_path / 'out')
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match="out: .*was not written by make_demo_data"):
        make_demo_data(tmp_path / 'mine')
    assert (tmp_path / 'mine' / 'keep.txt').read_text() == 'x'


def test_cityscapes_is_read_by_mmseg(demo_root: Path) -> None:
    from mmseg.datasets import CityscapesDataset
    for split, count in CITYSCAPES_COUNTS.items():
        ds = CityscapesDataset(
            data_root=str(demo_root / 'cityscapes'),
            data_prefix=dict(img_path=f'leftImg8bit/{split}', seg_map_path=f'gtFine/{split}'),
            pipeline=[dict(type='LoadImageFromFile'), dict(type='mmseg.LoadAnnotations')])
        assert len(ds) == count
    item = ds[0]
    labels = np.unique(item['gt_seg_map'])
    assert item['img'].shape[:2] == item['gt_seg_map'].shape == (128, 256)
    assert set(labels.tolist()) <= set(range(19)) | {255} and len(labels) >= 3


def test_coco_keypoints_are_read_by_mmpose_and_scored_by_xtcocotools(demo_root: Path) -> None:
    from mmpose.datasets import CocoDataset
    from xtcocotools.coco import COCO
    from xtcocotools.cocoeval import COCOeval
    root = demo_root / 'coco'
    ds = CocoDataset(data_root=str(root), data_mode='topdown',
                     ann_file='annotations/person_keypoints_val2017.json',
                     data_prefix=dict(img='val2017/'), test_mode=True, pipeline=[])
    n_persons = len(json.loads((root / 'annotations/person_keypoints_val2017.json')
                               .read_text())['annotations'])
    assert len(ds) == n_persons >= 8
    sample = ds[0]
    assert sample['keypoints'].shape == (1, 17, 2) and sample['keypoints_visible'].max() > 0
    # the ground truth scored against itself with the evaluator CocoMetric uses: AP 1.0
    gt = COCO(str(root / 'annotations/person_keypoints_val2017.json'))
    dets = [dict(image_id=a['image_id'], category_id=1, keypoints=a['keypoints'], score=1.0)
            for a in gt.loadAnns(gt.getAnnIds()) if a['num_keypoints'] > 0]
    evaluator = COCOeval(gt, gt.loadRes(dets), 'keypoints', np.array(
        [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_imagenet_folders_are_read_by_mmpretrain(demo_root: Path) -> None:
    from mmpretrain.datasets import CustomDataset
    ds = CustomDataset(data_root=str(demo_root / 'imagenet'), data_prefix='train', pipeline=[])
    assert len(ds) == 32 and len(ds.CLASSES) == 4


def _cityscapes_pixels(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All (RGB, train id) pixels of a split, the ignored ones (255) left out."""
    colors, labels = [], []
    for img in sorted((root / 'leftImg8bit' / split).rglob('*_leftImg8bit.png')):
        ann = Path(str(img).replace('leftImg8bit', 'gtFine', 1).replace(
            '_leftImg8bit.png', '_gtFine_labelTrainIds.png'))
        label = np.asarray(Image.open(ann))
        keep = label != 255
        colors.append(np.asarray(Image.open(img).convert('RGB'))[keep].astype(np.float64))
        labels.append(label[keep])
    return np.concatenate(colors), np.concatenate(labels)


def test_cityscapes_classes_are_learnable(demo_root: Path) -> None:
    """A nearest-centroid classifier on the colour of single pixels, fitted on the train
    images, labels the val images well: the classes differ in colour, the way a network
    can pick up within a few hundred CPU iterations (and the textures and layout add more)."""
    root = demo_root / 'cityscapes'
    x_train, y_train = _cityscapes_pixels(root, 'train')
    x_val, y_val = _cityscapes_pixels(root, 'val')
    classes = np.unique(y_train)
    assert len(classes) >= 8 and set(np.unique(y_val)) == set(classes)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in classes])
    distances = ((x_val[:, None, :] - centroids[None]) ** 2).sum(-1)
    pred = classes[distances.argmin(1)]
    assert (pred == y_val).mean() > 0.85  # one class everywhere would get at most ~0.3
    for c in classes:
        iou = ((pred == c) & (y_val == c)).sum() / ((pred == c) | (y_val == c)).sum()
        assert iou > 0.5, f'class {c}: IoU {iou:.2f}'
    # no class dominates: predicting the most frequent one would be far from the above
    assert np.bincount(y_val).max() / len(y_val) < 0.35


def _keypoint_colors(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colour under each labelled-visible keypoint, its index (0-16), and the median
    colour of its image (the background)."""
    coco = json.loads((root / 'annotations' / f'person_keypoints_{split}2017.json').read_text())
    images = {im['id']: im for im in coco['images']}
    colors, index, background = [], [], []
    for ann in coco['annotations']:
        info = images[ann['image_id']]
        img = np.asarray(Image.open(root / f'{split}2017' / info['file_name']).convert('RGB'))
        assert img.shape[:2] == (info['height'], info['width'])
        kpts = np.array(ann['keypoints'], dtype=np.float64).reshape(17, 3)
        assert ann['num_keypoints'] == int((kpts[:, 2] > 0).sum())
        x, y, w, h = ann['bbox']
        assert w > 0 and h > 0 and ann['area'] > 0
        for k, (kx, ky, v) in enumerate(kpts):
            if v != 2:
                continue
            assert x <= kx <= x + w and y <= ky <= y + h  # inside its box
            colors.append(img[int(round(ky)), int(round(kx))].astype(np.float64))
            index.append(k)
            background.append(np.median(img.reshape(-1, 3), axis=0))
    return np.array(colors), np.array(index), np.array(background)


def test_coco_keypoints_are_visible_and_told_apart_by_colour(demo_root: Path) -> None:
    """Every keypoint labelled visible is marked in its image: its pixel stands out from
    the background, and the colour says which of the 17 keypoints it is (a nearest-
    centroid classifier fitted on the train keypoints names the val keypoints)."""
    root = demo_root / 'coco'
    x_train, k_train, _ = _keypoint_colors(root, 'train')
    x_val, k_val, bg_val = _keypoint_colors(root, 'val')
    assert set(k_train) == set(k_val) == set(range(17))
    assert np.linalg.norm(x_val - bg_val, axis=1).min() > 60
    centroids = np.stack([x_train[k_train == k].mean(0) for k in range(17)])
    pred = ((x_val[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == k_val).mean() > 0.95


def test_seg_demo_trains_on_what_it_is_evaluated_on(demo_root: Path) -> None:
    """The seg demo config feeds the network whole scenes of one size in training and at
    test (with crops of the full-size scenes, the BN running statistics gathered in training
    did not fit the whole images of the evaluation: 13 mIoU instead of 67), while the metric
    still compares against the full-resolution labels."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    cfg = Config.fromfile(str(Path(__file__).parents[1] / 'configs' / 'demo' /
                              'psa_hrnet_ocr_cityscapes_demo.py'))
    init_default_scope('mmseg')
    sizes = {}
    for split in ('train', 'val'):
        ds_cfg = cfg[f'{split}_dataloader'].dataset.copy()
        ds_cfg.data_root = str(demo_root / 'cityscapes')
        ds = DATASETS.build(ds_cfg)
        for i in range(2):
            item = ds[i]
            sizes.setdefault(split, set()).add(tuple(item['inputs'].shape[1:]))
            # the whole scene, halved (a crop would keep the full scale)
            assert tuple(item['data_samples'].scale_factor) == (0.5, 0.5)
            if split == 'val':   # the labels stay at full size, the prediction is resized
                assert tuple(item['data_samples'].gt_sem_seg.shape) == (128, 256)
                assert tuple(item['data_samples'].ori_shape) == (128, 256)
            else:
                assert tuple(item['data_samples'].gt_sem_seg.shape) == tuple(cfg.crop_size)
    assert sizes == {'train': {tuple(cfg.crop_size)}, 'val': {tuple(cfg.crop_size)}}
    assert tuple(cfg.crop_size) == (64, 128)
    assert tuple(cfg.model.data_preprocessor.size) == tuple(cfg.crop_size)
