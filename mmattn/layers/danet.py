"""Dual Attention Network (Fu et al., CVPR 2019, arXiv 1809.02983): the position attention
module (PAM), the channel attention module (CAM) and their sum."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmattn.registry import MODELS

from .checks import (check_choice, check_input, check_positive, concrete_annotations,
                     errors_named_as)
from .non_local import softmax_attention

__all__ = ['PositionAttention', 'ChannelAttention', 'DualAttention', 'convert_mmseg_dahead']

# torch.fx records these as one call each (run on the real tensors when the graph runs)
# instead of tracing them: the input check and softmax_attention branch on sizes and dtypes,
# channel_attention_term enters an autocast context for the input's device
torch.fx.wrap('check_input')
torch.fx.wrap('softmax_attention')
torch.fx.wrap('channel_attention_term')

_ENERGIES = ('paper', 'release')
# mmseg's PAM / CAM (mmseg/models/decode_heads/da_head.py) key -> ours. Its PAM is a
# SelfAttentionBlock of plain 1x1 convs; both gammas are mmcv ``Scale``s (0-d ``.scale``).
_MMSEG_PAM_KEYS = {
    'query_project.weight': 'query_conv.weight', 'query_project.bias': 'query_conv.bias',
    'key_project.weight': 'key_conv.weight', 'key_project.bias': 'key_conv.bias',
    'value_project.weight': 'value_conv.weight', 'value_project.bias': 'value_conv.bias',
    'gamma.scale': 'gamma',
}
_MMSEG_CAM_KEYS = {'gamma.scale': 'gamma'}


def _rename_mmseg_keys(state_dict: dict, prefix: str, keys: Mapping[str, str]) -> None:
    """Rename mmseg's keys under ``prefix`` to ours in place; a 0-d ``gamma`` becomes shape
    ``(1,)``. A key whose target is already present is left for ``strict`` to report."""
    for theirs, ours in keys.items():
        if prefix + theirs in state_dict and prefix + ours not in state_dict:
            value = state_dict.pop(prefix + theirs)
            if ours == 'gamma' and value.dim() == 0:
                value = value.reshape(1)
            state_dict[prefix + ours] = value


@MODELS.register_module()
class PositionAttention(nn.Module):
    r"""DANet position attention module, PAM (arXiv 1809.02983, Eq. 1-2).

    .. math::
        s_{ji} = \frac{\exp(B_i \cdot C_j)}{\sum_{i=1}^{N} \exp(B_i \cdot C_j)}, \qquad
        E_j = \alpha \sum_{i=1}^{N} s_{ji} D_i + A_j

    ``B``, ``C``: 1x1 convs to ``max(C // reduction, 1)`` channels (``C/8`` in the paper),
    ``D``: 1x1 conv to ``C`` channels, ``N = HW``, ``α`` (``gamma``) initialised to 0, so a
    fresh block is the identity. No ``1/sqrt(d)`` scaling (the paper has none).

    State-dict keys are the official release's (junfu1115/DANet ``PAM_Module``):
    ``query_conv`` is applied at the output position ``j`` (the paper's ``C``), ``key_conv`` at
    the summed position ``i`` (the paper's ``B``), ``value_conv`` is ``D``, and ``gamma`` has
    shape ``(1,)``; release weights load with ``load_state_dict`` unchanged.

    mmseg's ``PAM(channels, pam_channels)`` (``DAHead.pam``) is this block with
    ``max(channels // reduction, 1) == pam_channels`` (mmseg's configs: 512 and 64, i.e. the
    default ``reduction=8``), and its state dict loads directly: ``_load_from_state_dict``
    renames ``{query,key,value}_project`` to ``{query,key,value}_conv`` and the 0-d
    ``gamma.scale`` (mmcv ``Scale``) to ``gamma`` of shape ``(1,)``. For whole checkpoints see
    :func:`convert_mmseg_dahead`.

    Args:
        in_channels: channels of the input.
        reduction: query/key channels are ``max(in_channels // reduction, 1)``.
        efficient: compute ``Σ_i s_ji D_i`` through SDPA without storing the ``HW x HW`` map
            (:func:`mmattn.layers.non_local.softmax_attention`); ``False`` builds it explicitly.
        device, dtype: factory kwargs for every parameter.
    """

    _abbr_ = 'pam'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, reduction: int = 8, efficient: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_positive('in_channels', in_channels, name)
        check_positive('reduction', reduction, name)
        check_choice('efficient', efficient, (True, False), name)
        fk = {'device': device, 'dtype': dtype}
        self.in_channels = in_channels
        self.reduction = reduction
        self.efficient = bool(efficient)
        qk = max(in_channels // reduction, 1)
        self.query_conv = nn.Conv2d(in_channels, qk, 1, **fk)
        self.key_conv = nn.Conv2d(in_channels, qk, 1, **fk)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1, **fk)
        self.gamma = nn.Parameter(torch.zeros(1, **fk))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        _rename_mmseg_keys(state_dict, prefix, _MMSEG_PAM_KEYS)  # mmseg PAM layout
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term ``α Σ_i s_ji D_i`` (without the residual ``A_j``)."""
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)
        k = self.key_conv(x).flatten(2).transpose(1, 2)
        v = self.value_conv(x).flatten(2).transpose(1, 2)
        out = softmax_attention(q, k, v, scale=1.0, efficient=self.efficient)
        return self.gamma * out.transpose(1, 2).reshape(b, c, h, w)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        return x + self._attend(x)


@MODELS.register_module()
class ChannelAttention(nn.Module):
    r"""DANet channel attention module, CAM (arXiv 1809.02983, Eq. 3-4).

    .. math::
        x_{ji} = \frac{\exp(A_i \cdot A_j)}{\sum_{i=1}^{C} \exp(A_i \cdot A_j)}, \qquad
        E_j = \beta \sum_{i=1}^{C} x_{ji} A_i + A_j

    where ``A_i`` is channel ``i`` reshaped to ``HW`` values (no convolution before the
    channel relations, as the paper says) and ``β`` (``gamma``) is initialised to 0.

    ``energy`` picks the logits of the softmax:

    - ``'paper'`` (default): ``A_i · A_j`` as in Eq. 3.
    - ``'release'``: the official code's ``max_i(A_i · A_j) - A_i · A_j``. The row maximum is
      constant over the softmax axis, so this equals ``softmax_i(-A_i · A_j)``: the release
      weights channels by *dissimilarity*. Use it to run released DANet checkpoints as trained.

    The ``C x C`` Gram matrix sums ``HW`` products, so in fp16 it overflows on large maps; it
    is computed in at least float32 (autocast disabled for it) and the output cast back.
    State dict: ``gamma`` of shape ``(1,)``, as the release's ``CAM_Module``. mmseg's ``CAM``
    (``DAHead.cam``) is ``energy='release'``; its 0-d ``gamma.scale`` loads directly (renamed
    and reshaped by ``_load_from_state_dict``).

    Args:
        in_channels: channels of the input.
        energy: ``'paper'`` or ``'release'``, see above.
        device, dtype: factory kwargs for ``gamma``.
    """

    _abbr_ = 'cam'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, energy: str = 'paper', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_positive('in_channels', in_channels, name)
        check_choice('energy', energy, _ENERGIES, name)
        self.in_channels = in_channels
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        _rename_mmseg_keys(state_dict, prefix, _MMSEG_CAM_KEYS)  # mmseg CAM layout
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term ``β Σ_i x_ji A_i`` (without the residual ``A_j``)."""
        return self.gamma * channel_attention_term(x, self.energy == 'release')

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        return x + self._attend(x)


def _channel_attention_term(x: torch.Tensor, release: bool) -> torch.Tensor:
    b, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    a = x.flatten(2).to(torch.promote_types(x.dtype, torch.float32))
    energy = torch.bmm(a, a.transpose(1, 2))  # energy[b, j, i] = A_j . A_i
    if release:
        energy = energy.amax(dim=-1, keepdim=True) - energy
    out = torch.bmm(torch.softmax(energy, dim=-1), a)
    return out.reshape(b, c, h, w).to(x.dtype)


def channel_attention_term(x: torch.Tensor, release: bool) -> torch.Tensor:
    """``Σ_i x_ji A_i`` of the CAM (Eq. 3-4) for ``x`` (B, C, H, W), in at least float32 with
    autocast off (in eager mode; TorchScript compiles it without the autocast context, whose
    device it cannot take at run time); ``release``: the release's ``max - energy`` logits."""
    if torch.jit.is_scripting():
        return _channel_attention_term(x, release)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _channel_attention_term(x, release)


@MODELS.register_module()
class DualAttention(nn.Module):
    r"""DANet dual attention as one same-shape block (arXiv 1809.02983, Sec. 3.1, 3.4).

    .. math::
        \mathrm{DA}(A) = A + \alpha \sum_i s_{ji} D_i + \beta \sum_i x_{ji} A_i
        = \mathrm{PAM}(A) + \mathrm{CAM}(A) - A

    The paper's head feeds each module its own conv branch and sums the two outputs after
    further convs, so each branch carries its own residual. A plug-in block that keeps the
    input's shape and meaning cannot do that: ``PAM(x) + CAM(x)`` would be ``2x`` at init
    (``α = β = 0``), doubling the activations of a pretrained host network. Counting the
    residual once makes the fresh block the identity, like every other residual block here.
    Submodules ``pam`` and ``cam`` (as mmseg's ``DAHead``) hold the release's keys; mmseg's
    ``pam.*``/``cam.*`` keys load too (see :func:`convert_mmseg_dahead` for what maps).

    Args:
        in_channels: channels of the input.
        reduction: PAM query/key reduction (``C/8`` in the paper).
        energy: CAM logits, ``'paper'`` or ``'release'`` (see :class:`ChannelAttention`).
        efficient: PAM's SDPA path (see :class:`PositionAttention`).
        device, dtype: factory kwargs for every parameter.
    """

    _abbr_ = 'danet'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, reduction: int = 8, energy: str = 'paper',
                 efficient: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.block_name = type(self).__name__
        check_positive('in_channels', in_channels, self.block_name)
        self.in_channels = in_channels
        with errors_named_as(self.block_name, PositionAttention, ChannelAttention):
            self.pam = PositionAttention(in_channels, reduction=reduction, efficient=efficient,
                                         device=device, dtype=dtype)
            self.cam = ChannelAttention(in_channels, energy=energy, device=device, dtype=dtype)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        return x + self.pam._attend(x) + self.cam._attend(x)


def convert_mmseg_dahead(state_dict: Mapping[str, torch.Tensor], prefix: str = 'decode_head.',
                         *, part: str = 'dual') -> dict[str, torch.Tensor]:
    """The weights of an mmseg ``DAHead`` in the layout of :class:`DualAttention`
    (``part='dual'``), :class:`PositionAttention` (``'pam'``) or :class:`ChannelAttention`
    (``'cam'``), for a strict ``load_state_dict``.

    ``state_dict`` is a segmentor's (``prefix='decode_head.'``, e.g. the ``'state_dict'`` of
    an mmseg DANet checkpoint) or the head's own (``prefix=''``). The mapping:

    - ``{prefix}pam.{query,key,value}_project.{weight,bias}`` -> ``pam.{query,key,value}_conv.*``
    - ``{prefix}pam.gamma.scale`` (shape ``()``) -> ``pam.gamma`` (shape ``(1,)``)
    - ``{prefix}cam.gamma.scale`` (shape ``()``) -> ``cam.gamma`` (shape ``(1,)``)

    (without the ``pam.``/``cam.`` prefix for ``part='pam'``/``'cam'``). Build the target with
    ``in_channels=channels``, ``max(channels // reduction, 1) == pam_channels`` and, for the
    CAM, ``energy='release'`` (mmseg's CAM computes the release's ``max - energy`` logits).

    Dropped, having no counterpart here: ``pam_in_conv``/``cam_in_conv`` and
    ``pam_out_conv``/``cam_out_conv`` (3x3 ConvModules around each module),
    ``pam_conv_seg``/``cam_conv_seg``/``conv_seg`` (the classifiers) and every key outside
    ``{prefix}pam.``/``{prefix}cam.``. The modules map one to one, the head does not:
    ``DAHead`` runs PAM and CAM on two different conv branches and sums after its out-convs,
    while ``DualAttention(x)`` is ``PAM(x) + CAM(x) - x`` on one input.

    Raises:
        ValueError: ``part`` is not one of the three, or a needed key is missing.
    """
    name = 'convert_mmseg_dahead'
    check_choice('part', part, ('dual', 'pam', 'cam'), name)
    tables = {'pam': _MMSEG_PAM_KEYS, 'cam': _MMSEG_CAM_KEYS}
    out: dict[str, torch.Tensor] = {}
    for module in (('pam', 'cam') if part == 'dual' else (part,)):
        src = f'{prefix}{module}.'
        missing = [src + key for key in tables[module] if src + key not in state_dict]
        if missing:
            raise ValueError(f'{name}: no mmseg DAHead {module.upper()} weights under '
                             f'prefix={prefix!r}: missing {missing}')
        weights = {key: state_dict[src + key] for key in tables[module]}
        _rename_mmseg_keys(weights, '', tables[module])
        dst = f'{module}.' if part == 'dual' else ''
        out.update({dst + key: value for key, value in weights.items()})
    return out
