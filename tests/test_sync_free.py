"""mmattn.engine.sync_free: mmseg's training accuracy without a host-device synchronisation,
and what it buys: HRNet-OCR's decode heads with their losses traced by torch.compile as one
graph."""
from __future__ import annotations

import os.path as osp
import sys

import pytest
import torch

from mmattn.engine import SyncFreeAccuracyHook, seg_accuracy_without_sync, sync_free_seg_accuracy

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_accuracy_equals_mmsegs() -> None:
    """The same value as mmseg's ``accuracy``, ignored pixels or none, a whole image ignored
    too; other arguments go to mmseg's."""
    from mmseg.models.losses import accuracy
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 19, 8, 12, generator=gen)
    target = torch.randint(0, 19, (2, 8, 12), generator=gen)
    target[0, :3] = 255
    all_ignored = torch.full_like(target, 255)
    for t, ignore in ((target, 255), (target, None), (all_ignored, 255),
                      (pred.argmax(1), 255)):
        got = seg_accuracy_without_sync(pred, t, ignore_index=ignore)
        want = accuracy(pred, t, ignore_index=ignore)
        assert got.shape == want.shape == (1,)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert seg_accuracy_without_sync(pred, target, ignore_index=255).item() < 20  # random
    assert seg_accuracy_without_sync(pred, pred.argmax(1), ignore_index=255).item() == \
        pytest.approx(100.0)
    both = seg_accuracy_without_sync(pred, target, topk=(1, 2), ignore_index=255)
    for got, want in zip(both, accuracy(pred, target, topk=(1, 2), ignore_index=255)):
        torch.testing.assert_close(got, want)


def test_context_and_hook_put_it_in_mmsegs_heads_and_take_it_out() -> None:
    import importlib

    from mmengine.registry import HOOKS
    from mmseg.models.losses import accuracy

    from mmattn.engine.sync_free import MMSEG_ACCURACY_USERS
    modules = [importlib.import_module(name) for name in MMSEG_ACCURACY_USERS]
    assert all(m.accuracy is accuracy for m in modules)
    with sync_free_seg_accuracy():
        assert all(m.accuracy is seg_accuracy_without_sync for m in modules)
    assert all(m.accuracy is accuracy for m in modules)
    hook = HOOKS.build(dict(type='mmattn.SyncFreeAccuracyHook'))
    assert isinstance(hook, SyncFreeAccuracyHook)
    hook.before_run(runner=None)
    try:
        assert all(m.accuracy is seg_accuracy_without_sync for m in modules)
    finally:
        hook.after_run(runner=None)
    assert all(m.accuracy is accuracy for m in modules)


def test_hrnet_ocr_losses_are_one_graph_with_it_and_break_without() -> None:
    """``torch._dynamo.explain`` of HRNet-OCR's decode heads with their losses (the real config's
    FCN and OCR heads, from the backbone's features): one graph with the sync-free accuracy,
    a break at mmseg's boolean mask (``aten.nonzero``) without it. With
    ``tests/models/test_hrnet.py``'s PSA backbone traced whole (``fullgraph=True``), the
    forward with its losses that mmengine's ``compile`` config compiles in ``train_step`` is
    one graph."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    try:
        import benchmark_model as tool
    finally:
        sys.path.pop(0)
    device, shape = torch.device('cpu'), (1, 32, 64)
    model = tool.build('stock', '-', shape, device).model
    data = model.data_preprocessor(tool.make_batch(shape, device), True)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])

    def losses(f: list) -> dict:
        return model._decode_head_forward_train(f, data['data_samples'])

    try:
        with sync_free_seg_accuracy():
            explained = torch._dynamo.explain(losses)(feats)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        assert not explained.break_reasons, [str(b.reason)[:200] for b in explained.break_reasons]
        torch._dynamo.reset()
        explained = torch._dynamo.explain(losses)(feats)
        assert any('aten.nonzero' in str(b.reason) for b in explained.break_reasons)
    finally:
        torch._dynamo.reset()
