"""mmseg's training accuracy metric without a host-device synchronisation.

mmseg's decode heads add ``acc_seg`` to their losses with ``mmseg.models.losses.accuracy``,
which indexes with a boolean mask (``correct[:, target != ignore_index]``): on a GPU a wait
for the device in every training step, which a CUDA-graph capture refuses and at which
``torch.compile`` breaks the graph (``aten.nonzero``'s output shape depends on the data). The
same value computed with masked sums needs neither. :func:`sync_free_seg_accuracy` puts it in
mmseg's heads for a while (``tools/benchmark_model.py --cuda-graph``),
:class:`SyncFreeAccuracyHook` for a whole run: with it, the forward of a training step with
its losses is one graph for ``torch.compile``, as mmengine's
``compile=dict(mode='reduce-overhead')`` compiles ``train_step`` (HRNet-OCR's decode heads
with their losses: ``tests/test_sync_free.py``; its PSA backbone:
``tests/models/test_hrnet.py``).
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator, Optional, Union

import torch
from mmengine.hooks import Hook

from mmattn.registry import HOOKS

#: mmseg's modules that call ``accuracy`` by the name they imported
MMSEG_ACCURACY_USERS = ('mmseg.models.decode_heads.decode_head',
                        'mmseg.models.decode_heads.point_head',
                        'mmseg.models.decode_heads.pid_head',
                        'mmseg.models.decode_heads.ddr_head')


def seg_accuracy_without_sync(pred: torch.Tensor, target: torch.Tensor,
                              topk: Union[int, tuple] = 1, thresh: Optional[float] = None,
                              ignore_index: Optional[int] = None):
    """mmseg's ``accuracy`` for one ``topk`` without a threshold, computed without boolean-mask
    indexing: the share of the non-ignored pixels whose top class is the target, in percent,
    with mmseg's epsilons, as a (1,) tensor on ``pred``'s device. Other arguments go to
    mmseg's own."""
    from mmseg.models.losses import accuracy
    if topk != 1 or thresh is not None or pred.size(0) == 0:
        return accuracy(pred, target, topk, thresh, ignore_index)
    eps = torch.finfo(torch.float32).eps
    correct = pred.topk(1, dim=1)[1].squeeze(1).eq(target)
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(correct)
    hits = (correct & valid).reshape(-1).float().sum(0, keepdim=True) + eps
    return hits.mul_(100.0 / (valid.sum() + eps))


@contextlib.contextmanager
def sync_free_seg_accuracy() -> Iterator[None]:
    """Within the block, mmseg's decode heads compute their accuracy with
    :func:`seg_accuracy_without_sync`; their own function is back afterwards."""
    replaced = []
    for name in MMSEG_ACCURACY_USERS:
        module = importlib.import_module(name)
        replaced.append((module, module.accuracy))
        module.accuracy = seg_accuracy_without_sync
    try:
        yield
    finally:
        for module, original in reversed(replaced):
            module.accuracy = original


@HOOKS.register_module()
class SyncFreeAccuracyHook(Hook):
    """For the whole run, mmseg's decode heads compute their training accuracy
    (``acc_seg``, logged) without waiting for the GPU (:func:`seg_accuracy_without_sync`), so
    that a training step holds no host-device synchronisation of mmseg's: compiled with
    mmengine's ``compile=dict(mode='reduce-overhead')``, the forward with its losses is one
    graph (AOTAutograd compiles its backward with it), which that mode replays as CUDA graphs
    (not yet measured on a GPU). In a config::

        custom_hooks = [dict(type='mmattn.SyncFreeAccuracyHook')]
        compile = dict(mode='reduce-overhead')
    """

    def __init__(self) -> None:
        self._context: Optional[contextlib.ExitStack] = None

    def before_run(self, runner: Any) -> None:
        self._context = contextlib.ExitStack()
        self._context.enter_context(sync_free_seg_accuracy())

    def after_run(self, runner: Any) -> None:
        if self._context is not None:
            self._context.close()
            self._context = None
