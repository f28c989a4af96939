"""Image classification of one image with mmpretrain's own API:
``ImageClassificationInferencer`` for the scores, ``UniversalVisualizer.visualize_cls`` for
the picture (the top-k labels with their scores written over the image)."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ['classify_image']


def classify_image(cfg: Any, checkpoint: str, bgr: np.ndarray, rgb: np.ndarray, *,
                   device: str = 'cpu', topk: int = 5
                   ) -> tuple[Any, list[tuple[str, float]], np.ndarray]:
    """``(DataSample, [(label, score)] * min(topk, classes), RGB picture)`` of ``bgr`` (the
    same image as ``rgb``); scores are the model's softmax, highest first.

    The class names come from the checkpoint's ``meta['dataset_meta']``, else from the
    config's test dataset class (ImageNet's 1000 names for the ImageNet configs); without
    either the labels are the class indices.
    """
    import torch
    from mmengine.logging import print_log
    from mmpretrain.apis import ImageClassificationInferencer
    from mmpretrain.visualization import UniversalVisualizer

    inferencer = ImageClassificationInferencer(model=cfg, pretrained=checkpoint,
                                               device=device)
    # the inferencer's own stages, without its ``__call__``'s progress bar (which, for one
    # image, ends without a newline and runs into whatever is printed next)
    with torch.no_grad():
        preds = [pred for batch in inferencer.preprocess([bgr], batch_size=1)
                 for pred in inferencer.forward(batch)]
    (sample,) = inferencer.postprocess(preds, None, return_datasamples=True)
    scores = sample.pred_score.detach().float().cpu()
    values, indices = torch.topk(scores, min(topk, scores.numel()))
    classes = inferencer.classes
    if classes is None:
        print_log('No class names in the checkpoint meta or the config\'s dataset: the '
                  'labels are class indices.', logger='current')
        labels = [str(i) for i in indices.tolist()]
    else:
        labels = [str(classes[i]) for i in indices.tolist()]
    ranked = [(label, float(v)) for label, v in zip(labels, values.tolist())]
    shown = sample.clone()
    shown.set_pred_label(indices)  # visualize_cls writes every label of pred_label
    vis = UniversalVisualizer().visualize_cls(rgb, shown, classes=classes, draw_gt=False,
                                              draw_pred=True, draw_score=True)
    return sample, ranked, vis
