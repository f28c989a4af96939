"""VOLO (arXiv 2106.13112): timm entrypoints ``volo_d1``..``volo_d5``, checkpoint compatibility
with timm's ``volo_d*_224``, any input size, token-labelling outputs, features, the
``mmattn.VOLO`` backbone and the configs."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mmattn  # noqa: F401  (registers the models)
from mmattn.layers import OutlookAttention
from mmattn.models.volo import VOLO, VOLO_ARCHS
from mmattn.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
ARCHS = ('d1', 'd2', 'd3', 'd4', 'd5')
# Parameter counts at 224 (1000 classes) from the paper's Table 1 / the release README.
PAPER_PARAMS = {'d1': 26.6e6, 'd2': 58.7e6, 'd3': 86.3e6, 'd4': 193e6, 'd5': 296e6}


@pytest.fixture(scope='module')
def timm_d1():
    """timm's own VOLO-D1 (randomly initialised, no download) and its state dict."""
    torch.manual_seed(0)
    ref = timm.create_model('volo_d1_224', pretrained=False).eval()
    with torch.no_grad():  # non-trivial values everywhere (the default init zeroes biases)
        for prm in ref.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    return ref


@pytest.mark.parametrize('arch', ARCHS)
def test_keys_shapes_and_parameter_counts(arch):
    with torch.device('meta'):
        ours = timm.create_model(f'volo_{arch}')
        ref = timm.create_model(f'volo_{arch}_224')
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    count = sum(p.numel() for p in ours.parameters())
    assert abs(count / PAPER_PARAMS[arch] - 1) < 0.005, count
    outlookers = [m for m in ours.modules() if isinstance(m, OutlookAttention)]
    assert len(outlookers) == ours.network[0].__len__() > 0


TINY = dict(layers=(1, 1, 1, 1))  # D1 widths, one block per stage: fast construction


@pytest.fixture(scope='module')
def ours_d1(timm_d1, tmp_path_factory):
    """``volo_d1`` loaded from a local checkpoint in the release's layout
    (``{'state_dict': ...}`` with DataParallel's ``module.`` prefix) holding timm's weights."""
    path = tmp_path_factory.mktemp('volo') / 'd1_224.pth.tar'
    torch.save({'state_dict': {f'module.{k}': v for k, v in timm_d1.state_dict().items()}}, path)
    model = timm.create_model('volo_d1', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    return model.eval()


def test_d1_same_logits_as_timm(timm_d1, ours_d1):
    ours_d1.load_state_dict(timm_d1.state_dict(), strict=True)  # timm's keys load strictly
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours_d1(x), timm_d1(x), rtol=1e-4, atol=1e-5)


def test_stem_layout_on_cpu_is_timms(timm_d1, ours_d1):
    """Off CUDA the stem runs NCHW, exactly timm's (channels-last is a CUDA-only choice, see
    ``VOLO.embed``; the CUDA test below checks that path), and the weights keep their
    layout."""
    ours_d1.load_state_dict(timm_d1.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens = ours_d1.embed(x)
        torch.testing.assert_close(tokens, timm_d1.patch_embed(x).permute(0, 2, 3, 1),
                                   rtol=0, atol=0)
    assert tokens.shape == (2, 8, 12, 192)
    assert all(p.is_contiguous() for p in ours_d1.state_dict().values())


def _relative_errors(model: torch.nn.Module, x: torch.Tensor, y64: torch.Tensor,
                     grads64: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """``model``'s training forward + backward (loss: mean of squared logits) against a
    float64 run: ``|a - a64| / |a64|`` for the logits and each parameter's gradient."""
    model.zero_grad()
    y = model(x)
    y.pow(2).mean().backward()
    rel = (lambda a, ref: ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item())
    return rel(y.detach(), y64), {n: rel(p.grad, grads64[n]) for n, p in
                                  model.named_parameters()}


@pytest.mark.cuda
def test_d1_training_step_on_cuda_matches_timm(timm_d1):
    """On a GPU, a training forward + backward of ``volo_d1`` (the channels-last stem on
    cuDNN, the outlook kernels where they are built) is as close to a float64 run of timm's
    model as timm's own float32 run is (TF32 off), logits and every parameter gradient: the
    stem's BatchNorms make its weight gradients sensitive to summation order, so the bound is
    10x timm's error or 2e-3, whichever is larger; a wrong layout is off by O(1)."""
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA GPU')
    ref64 = copy.deepcopy(timm_d1).cuda().double().train()
    ref = copy.deepcopy(timm_d1).cuda().train()
    ours = timm.create_model('volo_d1').cuda().train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, 224, 224, device='cuda')
    convs = [m for m in ours.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    layouts = []
    hooks = [m.register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
        for m in convs]
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            y64 = ref64(x.double())
            y64.pow(2).mean().backward()
            grads64 = {n: p.grad for n, p in ref64.named_parameters()}
            y64 = y64.detach()
            err_ref, grad_err_ref = _relative_errors(ref, x, y64, grads64)
            err_ours, grad_err_ours = _relative_errors(ours, x, y64, grads64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        for hook in hooks:
            hook.remove()
    assert layouts == [True] * len(convs) == [True] * 4   # every stem layer ran NHWC
    assert err_ours <= max(10 * err_ref, 1e-5), (err_ours, err_ref)
    assert grad_err_ours.keys() == grad_err_ref.keys()
    for name, err in grad_err_ours.items():
        assert err <= max(10 * grad_err_ref[name], 2e-3), (name, err, grad_err_ref[name])


def test_pretrained_cfgs():
    cfg = timm.models.get_pretrained_cfg('volo_d1')
    assert cfg.url == 'https://github.com/sail-sg/volo/releases/download/volo_1/d1_224_84.2.pth.tar'
    assert cfg.input_size == (3, 224, 224) and not cfg.fixed_input_size
    cfg = timm.models.get_pretrained_cfg('volo_d5.sail_in1k_512')
    assert cfg.url.endswith('d5_512_87.07.pth.tar') and cfg.input_size == (3, 512, 512)
    assert set(timm.list_models('volo_d?')) == {f'volo_{a}' for a in ARCHS}
    with torch.device('meta'):  # the position embedding is stored at the weights' resolution
        assert timm.create_model('volo_d3.sail_in1k_448').pos_embed.shape == (1, 28, 28, 512)


def test_any_input_size(timm_d1, ours_d1):
    with torch.no_grad():
        assert ours_d1(torch.randn(1, 3, 256, 320)).shape == (1, 1000)
        with pytest.raises(RuntimeError):  # timm's VOLO has a fixed position-embedding grid
            timm_d1(torch.randn(1, 3, 64, 64))


def test_position_embedding_resampling(ours_d1):
    pos = ours_d1.pos_embed.detach()
    assert pos.shape == (1, 14, 14, 384)
    torch.testing.assert_close(ours_d1.add_pos_embed(torch.zeros(1, 14, 14, 384)), pos)
    resized = ours_d1.add_pos_embed(torch.zeros(1, 16, 20, 384))
    expected = torch.nn.functional.interpolate(pos.permute(0, 3, 1, 2), size=(16, 20),
                                               mode='bicubic', align_corners=False)
    torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1))


def test_token_labelling_outputs():
    torch.manual_seed(0)
    model = timm.create_model('volo_d1', img_size=64, num_classes=5, return_dense=True,
                              use_mix_token=True, **TINY).train()
    x = torch.randn(2, 3, 64, 64)
    cls, aux, bbox = model(x)
    assert cls.shape == (2, 5) and aux.shape == (2, 16, 5) and len(bbox) == 4
    assert all(0 <= b <= 4 for b in bbox) and bbox[0] <= bbox[2] and bbox[1] <= bbox[3]
    # without a box the class logits are head(cls token) and the aux logits are per token
    model.mix_token = False
    torch.manual_seed(1)
    cls, aux, bbox = model(x)
    torch.manual_seed(1)
    feats = model.forward_features(x)
    torch.testing.assert_close(cls, model.head(feats[:, 0]))
    torch.testing.assert_close(aux, model.aux_head(feats[:, 1:]))
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    plain = timm.create_model('volo_d1', img_size=64, num_classes=5, **TINY).train()
    assert plain(x).shape == (2, 5)
    with pytest.raises(ValueError, match='use_mix_token=True needs return_dense=True'):
        timm.create_model('volo_d1', use_mix_token=True, **TINY)


def test_features_only_and_intermediates():
    model = timm.create_model('volo_d1', features_only=True, img_size=64, **TINY)
    assert model.feature_info.channels() == [192, 384, 384, 384]
    assert model.feature_info.reduction() == [8, 16, 16, 16]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 8, 12)] + [(1, 384, 4, 6)] * 3
    full = timm.create_model('volo_d1', img_size=64, **TINY).eval()
    with torch.no_grad():
        final, inter = full.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[0, 3])
    assert final.shape == (1, 17, 384) and [f.shape[1] for f in inter] == [192, 384]


def test_backbone_pyramid_512():
    backbone = MODELS.build(dict(type='mmattn.VOLO', arch=dict(VOLO_ARCHS['d1'], **TINY)))
    with torch.no_grad():
        outs = backbone.eval()(torch.randn(1, 3, 512, 512))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 128, 128), (1, 384, 64, 64),
                                              (1, 384, 32, 32), (1, 384, 16, 16)]
    assert backbone.out_strides == (4, 8, 16, 32)


def test_backbone_pretrained_matches_timm(timm_d1, ours_d1, tmp_path):
    path = tmp_path / 'd1.pth'
    torch.save(timm_d1.state_dict(), path)
    backbone = MODELS.build(dict(type='mmattn.VOLO', arch='d1', pyramid=False,
                                 out_indices=(0, 2),
                                 init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    backbone.init_weights()
    backbone.eval()
    assert len(backbone.network) == 4  # the last Transformer stage is pruned
    assert backbone.out_strides == (8, 16)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = backbone(x)
        # the Outlooker stage needs no position embedding: timm's own model runs at 64x96
        expected = timm_d1.forward_intermediates(x, indices=[0], stop_early=True,
                                                 intermediates_only=True)
        expected += ours_d1.forward_intermediates(x, indices=[2], stop_early=True,
                                                  intermediates_only=True)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(backbone.pos_embed, timm_d1.pos_embed)


def test_backbone_fx_trace():
    """Detection/segmentation graphs: torch.fx traces the mm backbone (pyramid necks, position
    embedding resampled for the input grid) and gives the eager outputs exactly."""
    backbone = MODELS.build(dict(type='mmattn.VOLO', arch=dict(VOLO_ARCHS['d1'], **TINY),
                                 img_size=64)).eval()
    graph = torch.fx.symbolic_trace(backbone)
    x = torch.randn(1, 3, 96, 64)  # another grid than the stored embedding's
    with torch.no_grad():
        outs, expected = graph(x), backbone(x)
    assert len(outs) == len(expected) == 4
    assert all(torch.equal(out, exp) for out, exp in zip(outs, expected))


# a four-stage VOLO small enough to run in a test
TINY_LAYOUT = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(2, 4, 4, 4),
                   stem_hidden_dim=8, img_size=32, num_classes=3)


@pytest.mark.parametrize('change, match', [
    (dict(num_heads=(2, 3, 4, 4)), r'embed_dims\[1\]=16 is not divisible by num_heads\[1\]=3'),
    (dict(embed_dims=(8, 16, 12, 12)),
     r'embed_dims\[2\]=12 differs from embed_dims\[1\]=16 with downsamples\[1\]=False'),
    (dict(embed_dims=(8, 16, 32, 32), downsamples=(True, True, False, False)),
     r'the position embedding has embed_dims\[-1\]=32 channels, but the tokens it is added '
     r'to \(after the first stage and its downsampling\) have 16'),
    (dict(num_heads=(2, 4, 4)),
     r'num_heads must give one value per stage \(4 for layers=\(1, 1, 1, 1\)\), got '
     r'num_heads=\(2, 4, 4\)'),
    (dict(mlp_ratio=(3., 3.)), r'mlp_ratio must be a number or one value per stage'),
    (dict(outlook_attention=(True, False)),
     r'outlook_attention must give a value for every stage .*got outlook_attention='),
    (dict(downsamples=(True, False, False, True)),
     r'downsamples\[3\] must be False \(there is no stage after the last one'),
])
def test_layouts_timm_cannot_run_are_refused_by_name(change, match):
    """Each layout makes timm's own VOLO fail, in its constructor or its forward, with an
    IndexError or a size mismatch deep inside a block; ours refuses it when built, naming the
    arguments."""
    kwargs = {**TINY_LAYOUT, **change}
    with pytest.raises((IndexError, RuntimeError)):
        timm.models.volo.VOLO(**kwargs)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match='^VOLO: ' + match):
        VOLO(**kwargs)
    with pytest.raises(ValueError, match='^VOLO: ' + match):
        timm.create_model('volo_d1', **kwargs)


@pytest.mark.parametrize('key', ['drop_rate', 'pos_drop_rate', 'attn_drop_rate',
                                 'drop_path_rate'])
def test_dropout_rates_outside_0_1_are_refused_by_name(key):
    with pytest.raises(ValueError, match=rf'^VOLO: {key} must be a probability, a number in '
                                         r'\[0, 1\], got 1.5'):
        VOLO(**TINY_LAYOUT, **{key: 1.5})


def test_tiny_layout_runs():
    """The layout the test above changes is a valid one (so each refusal is the change's)."""
    with torch.no_grad():
        assert VOLO(**TINY_LAYOUT)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        assert timm.models.volo.VOLO(**TINY_LAYOUT)(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize('x, match', [
    (torch.randn(3, 32, 32), r'^VOLO: expected a 4-D NCHW input, got a 3-D tensor of shape '
                             r'\(3, 32, 32\)'),
    (torch.randn(1, 1, 32, 32), r'^VOLO: the input has 1 channels \(shape \(1, 1, 32, 32\)\), '
                                r'but the model was built for 3 input channels'),
    (torch.randn(1, 3, 14, 32), r'^VOLO: expected images of at least 15 x 15 pixels .*, got '
                                r'14 x 32 \(shape \(1, 3, 14, 32\)\)'),
    (torch.randn(1, 3, 32, 9), r'^VOLO: expected images of at least 15 x 15 pixels'),
])
def test_bad_images_are_named(x, match):
    """Where torch's convolutions failed ('Kernel size can't be greater than actual input
    size', 'expected input[1, 1, 32, 32] to have 3 channels')."""
    with pytest.raises(ValueError, match=match):
        VOLO(**TINY_LAYOUT)(x)
    with pytest.raises(TypeError, match=r'^VOLO: expected a floating-point input'):
        VOLO(**TINY_LAYOUT)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize('patch_size, smallest', [(8, 15), (16, 31)])
def test_smallest_input_is_the_one_the_convolutions_leave_a_token_of(patch_size, smallest):
    """By hand: the stem (7x7, stride 2, padding 3) leaves ceil(n/2) pixels, the patch
    projection (patch_size/2, same stride) floor(ceil(n/2) / (patch_size/2)) tokens and the
    downsampling (2x2, stride 2) needs 2 of them: n >= 2 * patch_size - 1. One pixel fewer
    leaves the downsampling no token (shown on the modules themselves, without the check);
    that size runs."""
    model = VOLO(**TINY_LAYOUT, patch_size=patch_size).eval()
    assert model.min_input_size == (smallest, smallest)
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 3)
        tokens = model.patch_embed(torch.randn(1, 3, smallest - 1, smallest - 1))
        with pytest.raises(RuntimeError, match="Kernel size can't be greater"):
            model.network[1](tokens.permute(0, 2, 3, 1))
    # the backbone of the first stage alone has no downsampling: half that size works
    first = MODELS.build(dict(type='mmattn.VOLO', arch=dict(
        {k: v for k, v in TINY_LAYOUT.items() if k not in ('num_classes', 'img_size')},
        patch_size=patch_size), img_size=32, out_indices=(0,), pyramid=False))
    assert first.min_input_size == (patch_size - 1, patch_size - 1)
    with torch.no_grad():
        assert first(torch.randn(1, 3, patch_size - 1, patch_size - 1))[0].shape[-1] == 1


def test_backbone_bad_arguments():
    with pytest.raises(ValueError, match='arch must be one of'):
        MODELS.build(dict(type='mmattn.VOLO', arch='d9'))
    with pytest.raises(ValueError, match='out_indices'):
        MODELS.build(dict(type='mmattn.VOLO', out_indices=(4, )))
    with pytest.raises(ValueError, match=r'^VOLOBackbone: num_heads must give one value per '
                                         r'stage \(4 for layers=\(1, 1, 1, 1\)\), got '
                                         r'num_heads=None'):
        MODELS.build(dict(type='mmattn.VOLO', arch=dict(layers=(1, 1, 1, 1),
                                                        embed_dims=(8, 16, 16, 16))))
    # a layout VOLO runs, but at strides the backbone does not report or rescale for
    tiny = {k: v for k, v in TINY_LAYOUT.items() if k not in ('num_classes', 'img_size')}
    for downsamples in ((True, True, False, False), (False, False, False, False)):
        with pytest.raises(ValueError, match=r'^VOLOBackbone: downsamples must be True after the '
                                             r'first stage and False after the others'):
            MODELS.build(dict(type='mmattn.VOLO', arch=dict(tiny, downsamples=downsamples)))
    backbone = MODELS.build(dict(type='mmattn.VOLO', arch=tiny, img_size=32, pyramid=False))
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 32, 32))
    assert [out.shape[-1] for out in outs] == [32 // s for s in backbone.out_strides]


CONFIGS = sorted((REPO / 'configs').glob('volo_d?_imagenet.py')) + \
    [REPO / 'configs' / 'demo' / 'volo_d1_demo.py']


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_configs_build(path):
    from mmengine.config import Config
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    cfg = Config.fromfile(str(path))
    assert cfg.model.type == 'TimmClassifier' and cfg.model.model_name.startswith('volo_d')
    assert cfg.custom_imports['imports'] == ['mmattn']
    arch = cfg.model.model_name[-2:]
    from mmengine.registry import DefaultScope
    with torch.device('cpu' if 'demo' in path.name else 'meta'), \
            DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = PRETRAIN_MODELS.build(cfg.model)
    count = sum(p.numel() for p in model.parameters())
    if 'demo' not in path.name:
        assert abs(count / PAPER_PARAMS[arch] - 1) < 0.005
        assert cfg.train_dataloader.batch_size == 128 and cfg.auto_scale_lr.base_batch_size == 1024
        # the release's cudnn.benchmark, the default runtime's other settings kept
        assert cfg.env_cfg.cudnn_benchmark and cfg.env_cfg.dist_cfg.backend == 'nccl'
    if 'demo' in path.name:
        size = cfg.model.img_size
        model.eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, cfg.model.num_classes)


@pytest.mark.slow
def test_demo_training_runs(tmp_path):
    from mmattn.datasets import DEMO_ROOT, make_demo_data
    make_demo_data(REPO / DEMO_ROOT)  # idempotent: a complete copy is left alone
    result = subprocess.run(
        [sys.executable, 'tools/train.py', 'configs/demo/volo_d1_demo.py',
         '--work-dir', str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.glob('*.pth'))
    assert 'accuracy/top1' in result.stdout + result.stderr
