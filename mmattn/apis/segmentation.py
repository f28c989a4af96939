"""Semantic segmentation of one image with mmseg's own API: ``init_model`` +
``inference_model``, drawn by ``show_result_pyplot`` (``SegLocalVisualizer``: the class
colours of the dataset's palette blended over the image, with the class names)."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ['segment_image']


def _dataset_meta(checkpoint: dict, num_classes: int) -> dict:
    """Classes and palette: the checkpoint's ``meta['dataset_meta']`` (mmengine's Runner
    writes it), else those of mmseg's first dataset with ``num_classes`` classes
    (Cityscapes when none has), as mmseg's ``init_model`` chooses them."""
    from mmseg.utils import dataset_aliases, get_classes, get_palette

    meta = (checkpoint.get('meta') or {}).get('dataset_meta')
    if meta and meta.get('classes') and meta.get('palette'):
        return dict(classes=meta['classes'], palette=meta['palette'])
    name = next((n for n in dataset_aliases if len(get_classes(n)) == num_classes),
                'cityscapes')
    warnings.warn(f'the checkpoint carries no classes and palette (meta.dataset_meta): '
                  f'using those of {name!r}')
    return dict(classes=get_classes(name), palette=get_palette(name))


def segment_image(cfg: Any, checkpoint: str, bgr: np.ndarray, rgb: np.ndarray, *,
                  device: str = 'cpu', opacity: float = 0.5) -> tuple[Any, np.ndarray]:
    """``(SegDataSample, RGB picture)`` of ``bgr`` (the same image as ``rgb``).

    The model is built by mmseg's ``init_model`` and the checkpoint loaded by mmengine's
    ``load_checkpoint``, as ``init_model`` does; the classes are then read here, because
    mmseg 1.2.2's ``init_model`` fails on a checkpoint without ``meta`` (``KeyError``) and,
    for cascade heads (OCR), on one without ``meta['dataset_meta']``
    (``decode_head.num_classes`` of a ``ModuleList``).
    """
    from mmengine.runner import load_checkpoint
    from mmseg.apis import inference_model, init_model, show_result_pyplot

    model = init_model(cfg, None, device=device)
    ckpt = load_checkpoint(model, checkpoint, map_location='cpu')
    head = model.decode_head[-1] if hasattr(model.decode_head, '__getitem__') \
        else model.decode_head
    model.dataset_meta = _dataset_meta(ckpt, head.num_classes)
    result = inference_model(model, bgr)
    vis = show_result_pyplot(model, rgb, result, opacity=opacity, draw_gt=False, show=False)
    return result, vis
