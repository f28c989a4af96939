"""The embedded demo data: deterministic, idempotent, atomic, and read by the real
mmseg / mmpose / mmpretrain datasets as their real data is."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmattn.datasets import demo
from mmattn.datasets.demo import make_demo_data


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
    for split, count in (('train', 16), ('val', 4)):
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
    assert len(ds) == 10
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
