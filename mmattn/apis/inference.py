"""Inference on one image with a trained model, the OpenMMLab way.

:func:`inference` reads the config, picks the task from its ``default_scope`` and hands the
work to the host library's own API: mmseg's ``init_model`` + ``inference_model`` and
``SegLocalVisualizer`` (:mod:`.segmentation`), mmpose's ``init_model`` +
``inference_topdown`` and ``PoseLocalVisualizer`` (:mod:`.pose`), mmpretrain's
``ImageClassificationInferencer`` and ``UniversalVisualizer`` (:mod:`.classification`).
Only the adapter of the task at hand is imported, so a segmentation user needs no mmpose.

The picture is written atomically (a temporary file renamed into place) as
``<out_dir>/<image name>_<seg|pose|cls>.png``, and for classification the top-k labels as
``<out_dir>/<image name>_cls.json``.
"""
from __future__ import annotations

import json
import numbers
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mmattn.layers.checks import is_number
from mmattn.utils.checkpoint import check_checkpoint_file, mmengine_checkpoint_globals
from mmattn.utils.device import check_device
from mmattn.utils.file_mode import write_atomic

__all__ = ['TASKS', 'InferenceResult', 'load_config', 'detect_task', 'load_image',
           'inference']

#: ``default_scope`` of a config -> the task it trains
TASKS = {'mmseg': 'segmentation', 'mmpose': 'pose', 'mmpretrain': 'classification'}
_SUFFIX = {'segmentation': 'seg', 'pose': 'pose', 'classification': 'cls'}


@dataclass
class InferenceResult:
    """What :func:`inference` predicted and wrote.

    Attributes:
        task: ``'segmentation'``, ``'pose'`` or ``'classification'``.
        out_file: the visualised PNG (same height and width as the input image).
        data_sample: the host library's prediction: mmseg ``SegDataSample``
            (``pred_sem_seg``), mmpose ``PoseDataSample`` (``pred_instances.keypoints``,
            one instance per box) or mmpretrain ``DataSample`` (``pred_score``).
        image_size: ``(H, W)`` of the input image.
        topk: classification only: ``[(class name, score), ...]``, highest score first.
        files: every file written, by kind (``'vis'``, and ``'topk'`` for classification).
    """

    task: str
    out_file: str
    data_sample: Any
    image_size: tuple[int, int]
    topk: list[tuple[str, float]] | None = None
    files: dict[str, str] = field(default_factory=dict)


def load_config(config: Any, cfg_options: dict | None = None) -> Any:
    """The mmengine ``Config`` of ``config`` (a path, ``pkg::path`` or a ``Config``) with
    ``cfg_options`` merged in; importing mmattn first lets ``mmattn::`` bases resolve.

    Raises:
        FileNotFoundError: ``config`` names no existing file.
    """
    import mmattn  # noqa: F401  (registers the blocks, models and the mmattn:: scope)
    from mmengine.config import Config

    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if '::' in path:
            from mmengine.hub import get_config
            cfg = get_config(path)
        elif not osp.isfile(path):
            raise FileNotFoundError(f'config: no such file {path!r} (expected an mmseg, '
                                    f'mmpose or mmpretrain config .py)')
        else:
            cfg = Config.fromfile(path)
    else:
        raise TypeError(f'config must be a path or an mmengine Config, got '
                        f'{type(config).__name__}')
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def detect_task(cfg: Any) -> str:
    """``'segmentation'``, ``'pose'`` or ``'classification'`` from ``cfg.default_scope``.

    Raises:
        ValueError: the scope is none of mmseg, mmpose, mmpretrain.
    """
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise ValueError(f"config: default_scope must be one of {sorted(TASKS)} (the task "
                         f"is chosen from it), got {scope!r}")
    return TASKS[scope]


def load_image(image: str | np.ndarray) -> tuple[np.ndarray, str]:
    """``(BGR uint8 array, name)`` of ``image``: a file path, ``'demo'`` for mmattn's demo
    picture (``demo/demo.png``; drawn by :func:`mmattn.visualization.make_demo_image` where
    the repository's copy is absent) or an (H, W, 3) BGR array (name ``'image'``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable image, or the array is not (H, W, 3) uint8
            with H, W >= 1.
        TypeError: ``image`` is neither a path nor an array.
    """
    import mmcv

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not image.size:
            raise ValueError(f'image: expected an (H, W, 3) uint8 BGR array with H, W >= 1, '
                             f'got shape {image.shape} dtype {image.dtype}')
        return image, 'image'
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"image: expected an image file path, 'demo' or an (H, W, 3) uint8 "
                        f"BGR array, got {type(image).__name__}")
    image = os.fspath(image)
    if image == 'demo':
        from mmattn.visualization import DEMO_IMAGE, make_demo_image
        root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
        path = osp.join(root, DEMO_IMAGE)
        if not osp.isfile(path):
            return np.ascontiguousarray(make_demo_image()[..., ::-1]), 'demo'
        image = path
    if not osp.isfile(image):
        raise FileNotFoundError(f"image: no such file {image!r} (give an image file or "
                                f"'demo')")
    bgr = mmcv.imread(image, channel_order='bgr')
    if bgr is None:
        raise ValueError(f'image: {image!r} is not a readable image')
    return bgr, osp.splitext(osp.basename(image))[0]


def _save_png(rgb: np.ndarray, path: str) -> str:
    from PIL import Image
    return write_atomic(path, lambda tmp: Image.fromarray(
        np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format='PNG'))


def _boxes(bboxes: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    """``bboxes`` as an (n, 4) float32 array, or ValueError naming them: none, not numbers,
    a count of values that is not a multiple of 4, NaN/inf, or x2 <= x1 / y2 <= y1."""
    if bboxes is None:
        return None
    try:
        boxes = np.asarray(bboxes, dtype=np.float32)
    except (TypeError, ValueError):  # ragged lists, strings
        boxes = np.empty(0, dtype=np.float32)
    fits = boxes.size and not boxes.size % 4 and np.isfinite(boxes).all()
    boxes = boxes.reshape(-1, 4) if fits else boxes
    if not fits or np.any(boxes[:, 2:] <= boxes[:, :2]):
        raise ValueError(f'bboxes must be non-empty [[x1, y1, x2, y2], ...] of finite numbers '
                         f'with x2 > x1 and y2 > y1, got {bboxes!r}')
    return boxes


def inference(config: Any, checkpoint: str, image: str | np.ndarray, out_dir: str, *,
              device: str = 'cpu', cfg_options: dict | None = None, opacity: float = 0.5,
              kpt_thr: float = 0.3, bboxes: Sequence[Sequence[float]] | None = None,
              topk: int = 5) -> InferenceResult:
    """Predict on ``image`` with the model of ``config`` and ``checkpoint``, and write the
    host library's visualisation into ``out_dir``.

    Args:
        config: config path / ``Config``; its ``default_scope`` picks the task.
        checkpoint: checkpoint file, loaded by the host library's ``init_model`` /
            inferencer (``meta['dataset_meta']`` gives the class / keypoint names).
        image: image file, ``'demo'`` or a BGR array (see :func:`load_image`).
        out_dir: where the PNG (and the top-k JSON) go; created if needed.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ...
        cfg_options: overrides merged into the config.
        opacity: segmentation: opacity of the class colours over the image, in (0, 1].
        kpt_thr: pose: keypoints scored below it are not drawn.
        bboxes: pose: person boxes ``[[x1, y1, x2, y2], ...]`` in image pixels; ``None``:
            the whole image is one box (mmpose's behaviour without a detector).
        topk: classification: how many labels to report (at most the number of classes).

    Raises:
        FileNotFoundError: missing config, checkpoint or image.
        ValueError: unknown ``default_scope`` or a bad argument value.
        TypeError: ``checkpoint`` or ``image`` of a type that names no file.
    """
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f'checkpoint: expected a checkpoint file path, got '
                        f'{type(checkpoint).__name__}')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint: no such file {checkpoint!r}')
    check_checkpoint_file(os.fspath(checkpoint), 'checkpoint')  # truncated / not a checkpoint
    if not is_number(opacity) or not 0 < opacity <= 1:
        raise ValueError(f'opacity must be a number in (0, 1], got {opacity!r}')
    if not is_number(kpt_thr) or not kpt_thr >= 0:
        raise ValueError(f'kpt_thr must be a number >= 0, got {kpt_thr!r}')
    if not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f'topk must be a positive int, got {topk!r}')
    boxes = _boxes(bboxes)
    check_device(device)
    cfg = load_config(config, cfg_options)
    task = detect_task(cfg)
    bgr, name = load_image(image)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    out_file = osp.join(out_dir, f'{name}_{_SUFFIX[task]}.png')
    files: dict[str, str] = {}
    ranked = None
    # checkpoints of tools/train.py load with weights only as they are; the allow-list of
    # mmengine's own objects (nothing else) also opens checkpoints written before that
    with mmengine_checkpoint_globals():
        if task == 'segmentation':
            from .segmentation import segment_image
            sample, vis = segment_image(cfg, checkpoint, bgr, rgb, device=device,
                                        opacity=opacity)
        elif task == 'pose':
            from .pose import estimate_pose
            sample, vis = estimate_pose(cfg, checkpoint, bgr, rgb, device=device,
                                        bboxes=boxes, kpt_thr=kpt_thr)
        else:
            from .classification import classify_image
            sample, ranked, vis = classify_image(cfg, checkpoint, bgr, rgb, device=device,
                                                 topk=topk)
    files['vis'] = _save_png(vis, out_file)
    if ranked is not None:
        text = json.dumps([dict(label=label, score=score) for label, score in ranked],
                          indent=1) + '\n'

        def write_json(tmp: str) -> None:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(text)
        files['topk'] = write_atomic(osp.join(out_dir, f'{name}_cls.json'),
                                      write_json)
    return InferenceResult(task, out_file, sample, (int(bgr.shape[0]), int(bgr.shape[1])),
                           ranked, files)
