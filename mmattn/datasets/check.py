"""Check, before a run starts, that the datasets a config reads are on disk, and say in one
message what is missing, the layout the dataset needs and how to get it."""
from __future__ import annotations

import os.path as osp
from typing import Any, Iterable

from mmengine.config import Config

from .demo import DEMO_ROOT

#: dataset type -> (expected layout, how to get it)
LAYOUTS: dict[str, tuple[str, str]] = {
    'CityscapesDataset': (
        '<data_root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png\n'
        '<data_root>/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png',
        'download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from '
        'https://www.cityscapes-dataset.com, unpack them into <data_root>, then make the '
        'labelTrainIds with mmseg\'s tools/dataset_converters/cityscapes.py <data_root>'),
    'CocoDataset': (
        '<data_root>/annotations/person_keypoints_{train,val}2017.json\n'
        '<data_root>/{train,val}2017/*.jpg\n'
        '<data_root>/person_detection_results/COCO_val2017_detections_AP_H_56_person.json '
        '(val boxes; or set val_dataloader.dataset.bbox_file=None for ground-truth boxes)',
        'download train2017.zip, val2017.zip and annotations_trainval2017.zip from '
        'https://cocodataset.org/#download and the person detections from mmpose\'s '
        'dataset docs (docs/en/dataset_zoo/2d_body_keypoint.md)'),
    'ImageNet': (
        '<data_root>/train/<class>/*.JPEG, <data_root>/val/... and the meta/ label files',
        'download ILSVRC2012 from https://image-net.org and prepare it as mmpretrain\'s '
        'docs/en/user_guides/dataset_prepare.md describes'),
    'CustomDataset': (
        '<data_root>/<data_prefix>/<class>/*.png|jpg (one folder per class)',
        'put one folder of images per class under <data_root>'),
}


def _datasets(cfg: Config) -> Iterable[tuple[str, Any]]:
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset')
        while dataset is not None:
            yield loader, dataset
            dataset = dataset.get('dataset')  # wrappers (RepeatDataset, ...) nest one


def _paths(dataset: Any) -> list[str]:
    root = dataset.get('data_root') or ''
    paths = [root] if root else []
    ann = dataset.get('ann_file')
    if ann:
        paths.append(osp.join(root, ann))
    prefix = dataset.get('data_prefix') or {}
    for value in (prefix.values() if isinstance(prefix, dict) else [prefix]):
        if isinstance(value, str) and value:
            paths.append(osp.join(root, value))
    bbox = dataset.get('bbox_file')
    if bbox:
        paths.append(bbox)
    return paths


def check_datasets(cfg: Config, phases: tuple[str, ...] = ('train', 'val', 'test')) -> None:
    """Raise ``FileNotFoundError`` naming the first missing dataset path of ``cfg`` (for the
    given phases), the layout its dataset type expects and how to get it."""
    for loader, dataset in _datasets(cfg):
        if loader.split('_')[0] not in phases:
            continue
        missing = [p for p in _paths(dataset) if not osp.exists(p)]
        if not missing:
            continue
        dtype = str(dataset.get('type', 'dataset'))
        layout, how = LAYOUTS.get(dtype.split('.')[-1], ('(see the dataset type\'s docs)', ''))
        root = dataset.get('data_root') or '.'
        if osp.normpath(str(root)).startswith(osp.normpath(DEMO_ROOT)):
            how = 'run `python tools/make_demo_data.py` (writes the embedded demo data in seconds)'
        raise FileNotFoundError(
            f'{loader}: the {dtype} data is missing: {missing[0]} does not exist.\n'
            f'Expected layout (data_root={root!r}):\n  ' + layout.replace('\n', '\n  ')
            + f'\nHow to get it: {how}')
