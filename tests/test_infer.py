"""tools/infer.py and mmattn.apis: inference on an image through mmseg's, mmpose's and
mmpretrain's own APIs, from the demo configs and a checkpoint.

The demo configs' architectures are shrunk with ``cfg_options`` (an HRNet with one module of
one block per stage and 8-64 channels, a two-stage VOLO) so that building, saving and loading
take a second; the checkpoints hold the built models' random weights plus the ``meta`` that
mmengine's Runner writes (``dataset_meta``)."""
from __future__ import annotations

import json
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmattn.analysis import load_model
from mmattn.apis import detect_task, inference, load_config, load_image
from mmattn.utils.file_mode import default_mode
from mmattn.visualization import DEMO_IMAGE

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import infer as tool  # noqa: E402

SEG_CONFIG = osp.join(ROOT, 'configs/demo/psa_hrnet_ocr_cityscapes_demo.py')
POSE_CONFIG = osp.join(ROOT, 'configs/demo/psa_udp_hrnet_w48_coco_demo.py')
CLS_CONFIG = osp.join(ROOT, 'configs/demo/volo_d1_demo.py')

_WIDTHS = (8, 16, 32, 64)
_TINY_HRNET = {
    'model.backbone.extra': dict(
        stage1=dict(num_blocks=(1,), num_channels=(16,)),
        stage2=dict(num_blocks=(1, 1), num_channels=_WIDTHS[:2]),
        stage3=dict(num_modules=1, num_blocks=(1, 1, 1), num_channels=_WIDTHS[:3]),
        stage4=dict(num_modules=1, num_blocks=(1, 1, 1, 1), num_channels=_WIDTHS))}
SEG_OPTIONS = {**_TINY_HRNET,
               'model.decode_head.0.in_channels': list(_WIDTHS),
               'model.decode_head.0.channels': sum(_WIDTHS),
               'model.decode_head.1.in_channels': list(_WIDTHS),
               'model.decode_head.1.channels': 32,
               'model.decode_head.1.ocr_channels': 16}
POSE_OPTIONS = {**_TINY_HRNET, 'model.head.in_channels': _WIDTHS[0]}
CLS_CLASSES = ['ant', 'bee', 'cat', 'dog', 'eel', 'fox']
CLS_OPTIONS = {'model.num_classes': len(CLS_CLASSES), 'data_preprocessor.num_classes':
               len(CLS_CLASSES), 'model.layers': (1, 1), 'model.embed_dims': (32, 64),
               'model.num_heads': (1, 2), 'model.outlook_attention': (True, False),
               'model.downsamples': (True, False), 'model.mlp_ratio': 2.0,
               'model.post_layers': None}
PEDESTRIAN = [340., 120., 400., 210.]  # x1, y1, x2, y2 around the person in demo/demo.png


def _demo_rgb() -> np.ndarray:
    return np.asarray(Image.open(osp.join(ROOT, DEMO_IMAGE)).convert('RGB'))


def _checkpoint(path: str, config: str, options: dict, dataset_meta: dict) -> str:
    """The built model's (random) weights with the ``meta`` a Runner writes."""
    model = load_model(config, cfg_options=options).model
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': dataset_meta}},
               path)
    return path


@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp('ckpt'))


def test_segmentation_overlay(ckpt_dir: str, tmp_path: pytest.TempPathFactory) -> None:
    from mmseg.datasets import CityscapesDataset
    meta = dict(classes=CityscapesDataset.METAINFO['classes'],
                palette=CityscapesDataset.METAINFO['palette'])
    ckpt = _checkpoint(osp.join(ckpt_dir, 'seg.pth'), SEG_CONFIG, SEG_OPTIONS, meta)
    result = inference(SEG_CONFIG, ckpt, 'demo', str(tmp_path), cfg_options=SEG_OPTIONS,
                       opacity=0.5)
    rgb = _demo_rgb()
    assert result.task == 'segmentation' and result.image_size == rgb.shape[:2]
    assert result.out_file == osp.join(str(tmp_path), 'demo_seg.png')
    vis = np.asarray(Image.open(result.out_file).convert('RGB')).astype(np.float64)
    assert vis.shape == rgb.shape
    mask = result.data_sample.pred_sem_seg.data[0].numpy()
    assert mask.shape == rgb.shape[:2]
    # an overlay with opacity a: (1 - a) * image + a * palette[class], except where the
    # class names are written
    palette = np.asarray(meta['palette'], dtype=np.float64)
    expected = 0.5 * rgb + 0.5 * palette[mask]
    close = np.abs(vis - expected).max(-1) <= 1.5
    assert close.mean() > 0.9
    changed = np.abs(vis - rgb).max(-1) > 0
    differs_by_class = np.abs(palette[mask] - rgb).max(-1) >= 4
    assert changed[differs_by_class].mean() > 0.9
    assert sorted(osp.basename(f) for f in tmp_path.iterdir()) == ['demo_seg.png']
    assert os.stat(result.out_file).st_mode & 0o777 == default_mode()  # not mkstemp's 0600


def test_pose_keypoints(ckpt_dir: str, tmp_path: pytest.TempPathFactory) -> None:
    from mmpose.datasets import CocoDataset
    from mmpose.datasets.datasets.utils import parse_pose_metainfo
    # as lists: numpy arrays in a checkpoint need more than torch's weights-only load
    meta = {k: v.tolist() if isinstance(v, np.ndarray) else v
            for k, v in parse_pose_metainfo(CocoDataset.METAINFO).items()}
    ckpt = _checkpoint(osp.join(ckpt_dir, 'pose.pth'), POSE_CONFIG, POSE_OPTIONS, meta)
    rgb = _demo_rgb()
    height, width = rgb.shape[:2]

    whole = inference(POSE_CONFIG, ckpt, 'demo', str(tmp_path / 'whole'),
                      cfg_options=POSE_OPTIONS)
    assert whole.task == 'pose'
    # no detector: the whole image is the person box
    np.testing.assert_allclose(whole.data_sample.pred_instances.bboxes,
                               [[0, 0, width, height]])

    boxed = inference(POSE_CONFIG, ckpt, 'demo', str(tmp_path / 'box'),
                      cfg_options=POSE_OPTIONS, bboxes=[PEDESTRIAN], kpt_thr=0.0)
    inst = boxed.data_sample.pred_instances
    assert inst.keypoints.shape == (1, meta['num_keypoints'], 2) == (1, 17, 2)
    assert inst.keypoint_scores.shape == (1, 17)
    vis = np.asarray(Image.open(boxed.out_file).convert('RGB')).astype(int)
    assert vis.shape == rgb.shape
    # every keypoint inside the image scored >= kpt_thr is drawn: the picture changed there
    drawn = 0
    for (x, y), score in zip(inst.keypoints[0], inst.keypoint_scores[0]):
        if score >= 0 and 0 <= x < width and 0 <= y < height:
            assert np.abs(vis[int(y), int(x)] - rgb[int(y), int(x)]).max() > 0, (x, y)
            drawn += 1
    assert drawn > 0
    # the box (green by default) is drawn on its edge
    x1, y1 = int(PEDESTRIAN[0]), int(PEDESTRIAN[1])
    assert np.abs(vis[y1, x1 + 10] - rgb[y1, x1 + 10]).max() > 0


def test_classification_topk(ckpt_dir: str, tmp_path: pytest.TempPathFactory) -> None:
    ckpt = _checkpoint(osp.join(ckpt_dir, 'cls.pth'), CLS_CONFIG, CLS_OPTIONS,
                       dict(classes=CLS_CLASSES))
    result = inference(CLS_CONFIG, ckpt, 'demo', str(tmp_path), cfg_options=CLS_OPTIONS)
    assert result.task == 'classification'
    labels = [label for label, _ in result.topk]
    scores = [score for _, score in result.topk]
    assert len(labels) == 5 and len(set(labels)) == 5 and set(labels) <= set(CLS_CLASSES)
    assert scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
    assert all(s > 0 for s in scores)
    pred = result.data_sample.pred_score
    torch.testing.assert_close(pred.sum(), torch.tensor(1.), rtol=0, atol=1e-5)  # softmax
    ref = torch.topk(pred, 5)
    assert labels == [CLS_CLASSES[i] for i in ref.indices.tolist()]
    np.testing.assert_allclose(scores, ref.values.numpy(), rtol=1e-6)
    with open(result.files['topk'], encoding='utf-8') as f:
        assert json.load(f) == [dict(label=a, score=b) for a, b in result.topk]
    rgb = _demo_rgb()
    vis = np.asarray(Image.open(result.out_file).convert('RGB'))
    assert vis.shape == rgb.shape and np.abs(vis.astype(int) - rgb).max() > 0


# ------------------------------------------------------------------ the task, the errors
@pytest.mark.parametrize('config,task', [
    ('configs/psa_hrnet_ocr_cityscapes.py', 'segmentation'),
    ('configs/psa-s_udp_hrnet_w48_coco_384x288.py', 'pose'),
    ('configs/volo_d3_imagenet.py', 'classification'),
    ('configs/demo/volo_d1_demo.py', 'classification')])
def test_task_from_default_scope(config: str, task: str) -> None:
    assert detect_task(load_config(osp.join(ROOT, config))) == task


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = tool.main(argv)
    return code, capsys.readouterr().err


def test_cli_errors(tmp_path: pytest.TempPathFactory, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    code, err = _run([CLS_CONFIG, str(tmp_path / 'missing.pth'), 'demo'], capsys)
    assert code == 2 and 'checkpoint' in err and 'missing.pth' in err
    code, err = _run([str(tmp_path / 'nope.py'), str(ckpt), 'demo'], capsys)
    assert code == 2 and 'config' in err and 'nope.py' in err
    code, err = _run([CLS_CONFIG, str(ckpt), str(tmp_path / 'no.png')], capsys)
    assert code == 2 and 'image' in err and 'no.png' in err
    (tmp_path / 'not_an_image.png').write_text('text')
    code, err = _run([CLS_CONFIG, str(ckpt), str(tmp_path / 'not_an_image.png')], capsys)
    assert code == 2 and 'not a readable image' in err
    det = tmp_path / 'det.py'
    det.write_text("default_scope = 'mmdet'\nmodel = dict(type='RetinaNet')\n")
    code, err = _run([str(det), str(ckpt), 'demo'], capsys)
    assert code == 2 and 'default_scope' in err and "'mmdet'" in err
    with pytest.raises(ValueError, match='opacity'):
        inference(SEG_CONFIG, str(ckpt), 'demo', str(tmp_path), opacity=0)
    with pytest.raises(ValueError, match='bboxes'):
        inference(POSE_CONFIG, str(ckpt), 'demo', str(tmp_path), bboxes=[[5, 5, 1, 1]])
    assert not any(p.suffix == '.png' for p in tmp_path.iterdir() if p.name != 'not_an_image.png')


@pytest.mark.parametrize('kwargs, message', [
    (dict(opacity='0.5'), "opacity must be a number in (0, 1], got '0.5'"),
    (dict(opacity=True), 'opacity must be a number in (0, 1], got True'),
    (dict(kpt_thr=-0.1), 'kpt_thr must be a number >= 0, got -0.1'),
    (dict(kpt_thr=None), 'kpt_thr must be a number >= 0, got None'),
    (dict(topk=True), 'topk must be a positive int, got True'),
    (dict(topk=2.0), 'topk must be a positive int, got 2.0'),
    (dict(bboxes=[[1, 2, 3]]), 'bboxes must be non-empty [[x1, y1, x2, y2], ...] of finite '
                               'numbers with x2 > x1 and y2 > y1, got [[1, 2, 3]]'),
    (dict(bboxes=[[0, 0, float('nan'), 4]]), 'got [[0, 0, nan, 4]]'),
    (dict(bboxes=[[0, 0, 'x', 4]]), "got [[0, 0, 'x', 4]]"),
    (dict(bboxes=[[0, 0], [4, 4, 9]]), 'got [[0, 0], [4, 4, 9]]'),
])
def test_api_arguments_are_checked_before_any_work(kwargs: dict, message: str,
                                                   tmp_path: pytest.TempPathFactory) -> None:
    """Each bad value is named before the config is read (the config given does not exist):
    a string opacity failed on a comparison, True passed as 1, a three-value box failed in
    NumPy's reshape and a NaN box reached mmpose."""
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    with pytest.raises(ValueError) as info:
        inference(str(tmp_path / 'unread.py'), str(ckpt), 'demo', str(tmp_path / 'out'),
                  **kwargs)
    assert message in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_api_checkpoint_and_image_types(tmp_path: pytest.TempPathFactory) -> None:
    """What names no file is a TypeError naming the argument and the type it got; a NumPy
    number is a number; an empty array is not an image."""
    with pytest.raises(TypeError, match='checkpoint: expected a checkpoint file path, got '
                                        'NoneType'):
        inference(SEG_CONFIG, None, 'demo', str(tmp_path))
    with pytest.raises(TypeError, match="image: expected an image file path, 'demo' or an "
                                        r"\(H, W, 3\) uint8 BGR array, got int"):
        load_image(3)
    with pytest.raises(ValueError, match=r'with H, W >= 1, got shape \(0, 4, 3\)'):
        load_image(np.zeros((0, 4, 3), np.uint8))
    path = tmp_path / 'one.png'
    Image.fromarray(np.full((5, 7, 3), 200, np.uint8)).save(path)
    bgr, name = load_image(path)   # a pathlib.Path
    assert bgr.shape == (5, 7, 3) and name == 'one'
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N'"):
        inference(SEG_CONFIG, str(ckpt), 'demo', str(tmp_path), opacity=np.float32(0.5),
                  topk=np.int64(2), kpt_thr=np.float64(0.2), device='gpu')


def test_cli_classification(ckpt_dir: str, tmp_path: pytest.TempPathFactory,
                            capsys: pytest.CaptureFixture) -> None:
    ckpt = osp.join(ckpt_dir, 'cls.pth')
    if not osp.isfile(ckpt):
        _checkpoint(ckpt, CLS_CONFIG, CLS_OPTIONS, dict(classes=CLS_CLASSES))
    options = [f'{k}={v}'.replace(' ', '') for k, v in CLS_OPTIONS.items()]
    code = tool.main([CLS_CONFIG, ckpt, 'demo', '--out-dir', str(tmp_path), '--device', 'cpu',
                      '--topk', '3', '--cfg-options', *options])
    out = capsys.readouterr().out
    assert code == 0
    tops = [line for line in out.splitlines() if line.startswith('top-')]
    assert len(tops) == 3 and all(line.split(': ')[1].split(' (')[0] in CLS_CLASSES
                                  for line in tops)
    assert osp.isfile(tmp_path / 'demo_cls.png') and osp.isfile(tmp_path / 'demo_cls.json')


def test_truncated_checkpoint_is_named(tmp_path: pytest.TempPathFactory) -> None:
    """A checkpoint cut short (a copy interrupted, a full disk) fails before any model is
    built, with one message naming the file."""
    from mmattn.utils.checkpoint import CheckpointFileError
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': {'w': torch.zeros(1000)}}, whole)
    cut = tmp_path / 'iter_40.pth'
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    with pytest.raises(CheckpointFileError, match='truncated') as info:
        inference(SEG_CONFIG, str(cut), 'demo', str(tmp_path / 'out'))
    assert str(cut) in str(info.value)
    assert not (tmp_path / 'out').exists()
