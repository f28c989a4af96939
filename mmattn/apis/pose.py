"""Top-down pose estimation on one image with mmpose's own API: ``init_model`` +
``inference_topdown``, drawn by ``PoseLocalVisualizer``.

Top-down models need person boxes. Without a detector the whole image is one box (what
``inference_topdown`` does when given none, as mmpose's demos allow); pass ``bboxes`` from a
detector (e.g. mmdet's ``inference_detector``) for images with several people.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ['estimate_pose']

#: keys of the config's ``visualizer`` that are not drawing settings
_NOT_STYLE = ('type', 'name', 'vis_backends', 'save_dir', 'image')


def _pose_visualizer_class() -> type:
    """mmpose 1.3.2's ``PoseLocalVisualizer`` whose OpenCV ``draw_circles`` accepts the
    one-element radius array mmpose passes it: the stock one calls ``int()`` on it, which
    numpy 2 refuses ("only 0-dimensional arrays can be converted to Python scalars")."""
    from mmpose.visualization import PoseLocalVisualizer

    class _PoseLocalVisualizer(PoseLocalVisualizer):
        def draw_circles(self, center: Any, radius: Any, *args: Any, **kwargs: Any) -> Any:
            radius = np.asarray(radius)
            if radius.size == 1:
                radius = radius.reshape(()).item()
            return super().draw_circles(center, radius, *args, **kwargs)

    return _PoseLocalVisualizer


def estimate_pose(cfg: Any, checkpoint: str, bgr: np.ndarray, rgb: np.ndarray, *,
                  device: str = 'cpu', bboxes: np.ndarray | None = None,
                  kpt_thr: float = 0.3) -> tuple[Any, np.ndarray]:
    """``(PoseDataSample with one instance per box, RGB picture)`` of ``bgr`` (the same
    image as ``rgb``); ``bboxes`` (N, 4) xyxy in pixels, ``None``: the whole image.

    The keypoint names and skeleton come from the checkpoint's ``meta['dataset_meta']``,
    else from the config's dataset (mmpose's ``init_model``).
    """
    from mmpose.apis import inference_topdown, init_model
    from mmpose.structures import merge_data_samples
    model = init_model(cfg, checkpoint, device=device)
    results = inference_topdown(model, bgr, bboxes=bboxes, bbox_format='xyxy')
    merged = merge_data_samples(results)
    # the config's drawing style; a visualizer of our own rather than the config's named
    # global instance, which a Runner in the same process may already own
    style = {k: v for k, v in (cfg.get('visualizer') or {}).items()
             if k not in _NOT_STYLE and not k.startswith('_')}
    visualizer = _pose_visualizer_class()(**style)
    visualizer.set_dataset_meta(model.dataset_meta)
    visualizer.add_datasample('result', rgb, data_sample=merged, draw_gt=False,
                              draw_bbox=True, kpt_thr=kpt_thr, show=False)
    return merged, visualizer.get_image()
