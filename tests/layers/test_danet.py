"""DANet's PositionAttention (Eq. 1-2), ChannelAttention (Eq. 3-4, and the release's
max-minus-energy form) and DualAttention written out in float64; the SDPA path; the official
release's state-dict keys; mmseg's PAM/CAM/DAHead weights and outputs; identity at init; fp16
Gram overflow; gradcheck; argument checks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from op_recorder import OpRecorder

from mmattn.layers import ChannelAttention, DualAttention, PositionAttention
from mmattn.layers.danet import convert_mmseg_dahead

SHAPES = [(2, 16, 5, 7), (1, 8, 1, 1), (1, 8, 3, 3), (2, 24, 4, 6), (1, 8, 1, 9)]


def conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    return (torch.einsum('oc,bchw->bohw', conv.weight[:, :, 0, 0], x)
            + conv.bias[None, :, None, None])


def pam_term(m: PositionAttention, a: torch.Tensor) -> torch.Tensor:
    """alpha sum_i s_ji D_i with s_ji = exp(B_i.C_j) / sum_i exp(B_i.C_j) (Eq. 1-2); the paper's
    B is the release's key_conv, C its query_conv (applied at the output position j)."""
    b, c, h, w = a.shape
    big_b = conv1x1(a, m.key_conv).flatten(2)
    big_c = conv1x1(a, m.query_conv).flatten(2)
    d = conv1x1(a, m.value_conv).flatten(2)
    e = torch.exp(torch.einsum('bki,bkj->bji', big_b, big_c))  # [b, j, i]
    s = e / e.sum(dim=2, keepdim=True)
    return m.gamma * torch.einsum('bji,bci->bcj', s, d).reshape(b, c, h, w)


def cam_term(m: ChannelAttention, a: torch.Tensor, release: bool = False) -> torch.Tensor:
    """beta sum_i x_ji A_i with x_ji = exp(A_i.A_j) / sum_i exp(A_i.A_j) (Eq. 3-4), or the
    release's logits max_i(A_i.A_j) - A_i.A_j."""
    b, c, h, w = a.shape
    flat = a.flatten(2)
    energy = torch.einsum('bin,bjn->bji', flat, flat)  # [b, j, i] = A_i . A_j
    if release:
        energy = energy.max(dim=2, keepdim=True).values - energy
    # exp(e - max_i e) / sum_i exp(e - max_i e) is Eq. 3 unchanged, without overflowing exp
    e = torch.exp(energy - energy.max(dim=2, keepdim=True).values)
    x = e / e.sum(dim=2, keepdim=True)
    return m.gamma * torch.einsum('bji,bin->bjn', x, flat).reshape(b, c, h, w)


def randomise(m: nn.Module) -> nn.Module:
    """Non-zero alpha/beta (zero at init)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith('gamma'):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('efficient', [False, True])
def test_position_attention_matches_paper(shape: tuple, efficient: bool) -> None:
    m = randomise(PositionAttention(shape[1], efficient=efficient, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), pam_term(m, x) + x, rtol=0, atol=1e-10)


@pytest.mark.parametrize('shape', SHAPES)
def test_position_attention_paths_agree(shape: tuple) -> None:
    fast = randomise(PositionAttention(shape[1], dtype=torch.float64))
    slow = PositionAttention(shape[1], efficient=False, dtype=torch.float64)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), slow(x), rtol=0, atol=1e-10)


def test_position_attention_efficient_never_builds_hw_by_hw() -> None:
    """Forward and backward of the SDPA path stay far below (HW)^2 elements; the explicit
    path (the control) builds the map."""
    x = torch.randn(1, 16, 16, 24, requires_grad=True)
    hw2 = (16 * 24) ** 2
    for efficient in (True, False):
        m = randomise(PositionAttention(16, efficient=efficient))
        with OpRecorder() as probe:
            m(x).sum().backward()
        assert (probe.largest < hw2 // 16) if efficient else (probe.largest >= hw2)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('energy', ['paper', 'release'])
def test_channel_attention_matches_paper_and_release(shape: tuple, energy: str) -> None:
    m = randomise(ChannelAttention(shape[1], energy=energy, dtype=torch.float64))
    x = 0.5 * torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), cam_term(m, x, energy == 'release') + x, rtol=0, atol=1e-10)


def test_release_energy_is_softmax_of_negative_energy() -> None:
    """The documented reading of the release: softmax(max - e) = softmax(-e), which differs
    from the paper's softmax(e)."""
    x = 0.5 * torch.randn(2, 8, 4, 5, dtype=torch.float64)
    paper = randomise(ChannelAttention(8, dtype=torch.float64))
    release = ChannelAttention(8, energy='release', dtype=torch.float64)
    release.load_state_dict(paper.state_dict())
    flat = x.flatten(2)
    neg = torch.softmax(-torch.einsum('bin,bjn->bji', flat, flat), dim=2)
    expected = paper.gamma * torch.einsum('bji,bin->bjn', neg, flat).reshape(x.shape) + x
    torch.testing.assert_close(release(x), expected, rtol=0, atol=1e-10)
    assert (release(x) - paper(x)).abs().max() > 1e-3


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('energy', ['paper', 'release'])
def test_dual_attention_matches_paper(shape: tuple, energy: str) -> None:
    """DA(x) = x + alpha PAM-term + beta CAM-term = PAM(x) + CAM(x) - x."""
    m = randomise(DualAttention(shape[1], energy=energy, dtype=torch.float64))
    m.cam.gamma.data.fill_(0.7)
    x = 0.5 * torch.randn(shape, dtype=torch.float64)
    expected = x + pam_term(m.pam, x) + cam_term(m.cam, x, energy == 'release')
    out = m(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(out, m.pam(x) + m.cam(x) - x, rtol=0, atol=1e-10)


@pytest.mark.parametrize('cls', [PositionAttention, ChannelAttention, DualAttention])
def test_identity_at_init(cls: type) -> None:
    m = cls(16)
    assert all(not p.any() for n, p in m.named_parameters() if n.endswith('gamma'))
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(m(x), x)


def test_official_release_keys_load() -> None:
    """junfu1115/DANet PAM_Module / CAM_Module keys and shapes load unchanged."""
    c = 32
    pam_release = {
        'query_conv.weight': torch.randn(c // 8, c, 1, 1), 'query_conv.bias': torch.randn(c // 8),
        'key_conv.weight': torch.randn(c // 8, c, 1, 1), 'key_conv.bias': torch.randn(c // 8),
        'value_conv.weight': torch.randn(c, c, 1, 1), 'value_conv.bias': torch.randn(c),
        'gamma': torch.randn(1),
    }
    pam = PositionAttention(c)
    pam.load_state_dict(pam_release)  # strict
    assert torch.equal(pam.key_conv.weight, pam_release['key_conv.weight'])
    ChannelAttention(c).load_state_dict({'gamma': torch.randn(1)})
    dual = DualAttention(c)
    dual.load_state_dict({**{f'pam.{k}': v for k, v in pam_release.items()},
                          'cam.gamma': torch.randn(1)})


def randomise_mmseg(m: nn.Module) -> nn.Module:
    """Non-zero gammas (mmcv Scale, 0 at init) in mmseg's PAM/CAM; the convs keep their
    random init."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith('gamma.scale'):
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize('channels, pam_channels, reduction', [(16, 2, 8), (12, 3, 4), (8, 1, 8)])
@pytest.mark.parametrize('efficient', [False, True])
def test_mmseg_pam_and_cam_load_and_match(channels: int, pam_channels: int, reduction: int,
                                          efficient: bool) -> None:
    """mmseg's PAM / CAM state dicts (``*_project`` keys, 0-d ``gamma.scale``) load strictly
    into PositionAttention / ChannelAttention(energy='release'), which then give mmseg's
    outputs."""
    from mmseg.models.decode_heads.da_head import CAM, PAM
    theirs_pam = randomise_mmseg(PAM(channels, pam_channels)).double()
    theirs_cam = randomise_mmseg(CAM()).double()
    assert theirs_pam.gamma.scale.shape == ()  # the mismatch the load hook absorbs
    pam = PositionAttention(channels, reduction=reduction, efficient=efficient,
                            dtype=torch.float64)
    cam = ChannelAttention(channels, energy='release', dtype=torch.float64)
    pam.load_state_dict(theirs_pam.state_dict())  # strict
    cam.load_state_dict(theirs_cam.state_dict())
    x = 0.5 * torch.randn(2, channels, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(pam(x), theirs_pam(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(cam(x), theirs_cam(x), rtol=0, atol=1e-10)


def mmseg_dahead(channels: int = 16, pam_channels: int = 2) -> nn.Module:
    from mmseg.models.decode_heads.da_head import DAHead
    with warnings.catch_warnings():  # mmseg's own deprecation notes on building its loss
        warnings.simplefilter('ignore', UserWarning)
        head = DAHead(in_channels=8, channels=channels, pam_channels=pam_channels,
                      num_classes=3, norm_cfg=dict(type='BN'))
    return randomise_mmseg(head).double().eval()


def test_convert_mmseg_dahead() -> None:
    """A segmentor's DAHead weights (decode_head. prefix, with backbone and head-only keys
    around them) convert to exactly DualAttention's / PositionAttention's /
    ChannelAttention's keys, load strictly, and reproduce the head's own PAM and CAM:
    DualAttention(x) = PAM(x) + CAM(x) - x."""
    head = mmseg_dahead()
    segmentor = {'backbone.conv1.weight': torch.randn(4, 3, 3, 3),
                 **{f'decode_head.{k}': v for k, v in head.state_dict().items()}}
    x = 0.5 * torch.randn(2, 16, 5, 7, dtype=torch.float64)
    pam_ref, cam_ref = head.pam(x), head.cam(x)

    dual = DualAttention(16, energy='release', dtype=torch.float64)
    converted = convert_mmseg_dahead(segmentor)
    assert sorted(converted) == sorted(dual.state_dict())
    dual.load_state_dict(converted)  # strict
    torch.testing.assert_close(dual(x), pam_ref + cam_ref - x, rtol=0, atol=1e-10)

    pam = PositionAttention(16, dtype=torch.float64)
    pam.load_state_dict(convert_mmseg_dahead(head.state_dict(), prefix='', part='pam'))
    torch.testing.assert_close(pam(x), pam_ref, rtol=0, atol=1e-10)
    cam = ChannelAttention(16, energy='release', dtype=torch.float64)
    cam.load_state_dict(convert_mmseg_dahead(segmentor, part='cam'))
    torch.testing.assert_close(cam(x), cam_ref, rtol=0, atol=1e-10)


def test_mmseg_dahead_keys_load_through_dual_attention() -> None:
    """The load hooks also take mmseg's pam.*/cam.* keys under DualAttention directly; the
    head-only keys (in/out convs, classifiers) have no counterpart and fail a strict load."""
    head = mmseg_dahead()
    sub = {k: v for k, v in head.state_dict().items() if k.startswith(('pam.', 'cam.'))}
    dual = DualAttention(16, energy='release', dtype=torch.float64)
    dual.load_state_dict(sub)  # strict
    x = 0.5 * torch.randn(1, 16, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(dual(x), head.pam(x) + head.cam(x) - x, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match='pam_in_conv'):
        dual.load_state_dict(head.state_dict())


def test_convert_mmseg_dahead_errors() -> None:
    head = mmseg_dahead()
    with pytest.raises(ValueError, match="part must be one of.*'both'"):
        convert_mmseg_dahead(head.state_dict(), prefix='', part='both')
    with pytest.raises(ValueError, match="prefix='decode_head.'.*decode_head.pam.gamma.scale"):
        convert_mmseg_dahead(head.state_dict())  # the head's own keys have no prefix
    with pytest.raises(RuntimeError, match='size mismatch'):  # pam_channels 2 != 16 // 4
        PositionAttention(16, reduction=4).load_state_dict(
            convert_mmseg_dahead(head.state_dict(), prefix='', part='pam'))


def test_channel_attention_fp16_gram_does_not_overflow() -> None:
    """A 16x16 map of magnitude 30 has Gram entries ~2.3e5 > fp16's 65504."""
    m = randomise(ChannelAttention(8))
    x = 30 + torch.rand(1, 8, 16, 16, dtype=torch.float64)
    out = m.half()(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = cam_term(m.double(), x) + x
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=0)


@pytest.mark.parametrize('cls', [PositionAttention, ChannelAttention, DualAttention])
def test_gradcheck(cls: type) -> None:
    # PAM covers the SDPA path; DualAttention runs the explicit one (SDPA's CPU backward has a
    # fixed cost per call that gradcheck's many calls multiply)
    kw = {'efficient': False} if cls is DualAttention else {}
    m = randomise(cls(8, dtype=torch.float64, **kw))
    x = torch.randn(1, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_reduction_and_small_channels() -> None:
    assert PositionAttention(32).query_conv.out_channels == 4
    assert PositionAttention(32, reduction=2).key_conv.out_channels == 16
    m = randomise(PositionAttention(4, dtype=torch.float64))  # 4 // 8 -> 1 channel
    assert m.query_conv.out_channels == 1
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(m(x), pam_term(m, x) + x, rtol=0, atol=1e-10)


def test_channels_last() -> None:
    m = randomise(DualAttention(16, dtype=torch.float64))
    x = 0.5 * torch.randn(2, 16, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), rtol=0,
                               atol=1e-12)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match='energy'):
        ChannelAttention(8, energy='max')
    with pytest.raises(ValueError, match='reduction'):
        PositionAttention(8, reduction=0)
    with pytest.raises(ValueError, match='efficient'):
        PositionAttention(8, efficient='yes')
    # DualAttention passes these to its PAM and CAM, and its errors name DualAttention
    for kwargs, match in ((dict(energy='max'), r"energy must be one of .*got 'max'"),
                          (dict(reduction=0), 'reduction must be an integer >= 1, got 0'),
                          (dict(efficient='yes'), r"efficient must be one of .*got 'yes'")):
        with pytest.raises(ValueError, match='^DualAttention: ' + match):
            DualAttention(8, **kwargs)
    for cls in (PositionAttention, ChannelAttention, DualAttention):
        with pytest.raises(ValueError, match='in_channels'):
            cls(0)
        with pytest.raises(ValueError, match=f'{cls.__name__}.*in_channels=8'):
            cls(8)(torch.randn(1, 4, 3, 3))
