"""Dual Attention Network (Fu et al., CVPR 2019, arXiv 1809.02983): the position attention
module (PAM), the channel attention module (CAM) and their sum."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmattn.registry import MODELS

from .checks import check_choice, check_input, check_positive
from .non_local import softmax_attention

__all__ = ['PositionAttention', 'ChannelAttention', 'DualAttention']

_ENERGIES = ('paper', 'release')


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

    Args:
        in_channels: channels of the input.
        reduction: query/key channels are ``max(in_channels // reduction, 1)``.
        efficient: compute ``Σ_i s_ji D_i`` through SDPA without storing the ``HW x HW`` map
            (:func:`mmattn.layers.non_local.softmax_attention`); ``False`` builds it explicitly.
        device, dtype: factory kwargs for every parameter.
    """

    _abbr_ = 'pam'

    def __init__(self, in_channels: int, *, reduction: int = 8, efficient: bool = True,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
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

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term ``α Σ_i s_ji D_i`` (without the residual ``A_j``)."""
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)
        k = self.key_conv(x).flatten(2).transpose(1, 2)
        v = self.value_conv(x).flatten(2).transpose(1, 2)
        out = softmax_attention(q, k, v, scale=1.0, efficient=self.efficient)
        return self.gamma * out.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
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
    State dict: ``gamma`` of shape ``(1,)``, as the release's ``CAM_Module``.

    Args:
        in_channels: channels of the input.
        energy: ``'paper'`` or ``'release'``, see above.
        device, dtype: factory kwargs for ``gamma``.
    """

    _abbr_ = 'cam'

    def __init__(self, in_channels: int, *, energy: str = 'paper', device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
        check_positive('in_channels', in_channels, name)
        check_choice('energy', energy, _ENERGIES, name)
        self.in_channels = in_channels
        self.energy = energy
        self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term ``β Σ_i x_ji A_i`` (without the residual ``A_j``)."""
        b, c, h, w = x.shape
        work = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = x.flatten(2).to(work)
            energy = torch.bmm(a, a.transpose(1, 2))  # energy[b, j, i] = A_j . A_i
            if self.energy == 'release':
                energy = energy.amax(dim=-1, keepdim=True) - energy
            out = torch.bmm(torch.softmax(energy, dim=-1), a)
        return self.gamma * out.reshape(b, c, h, w).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        return x + self._attend(x)


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
    Submodules ``pam`` and ``cam`` (as mmseg's ``DAHead``) hold the release's keys.

    Args:
        in_channels: channels of the input.
        reduction: PAM query/key reduction (``C/8`` in the paper).
        energy: CAM logits, ``'paper'`` or ``'release'`` (see :class:`ChannelAttention`).
        efficient: PAM's SDPA path (see :class:`PositionAttention`).
        device, dtype: factory kwargs for every parameter.
    """

    _abbr_ = 'danet'

    def __init__(self, in_channels: int, *, reduction: int = 8, energy: str = 'paper',
                 efficient: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        check_positive('in_channels', in_channels, type(self).__name__)
        self.in_channels = in_channels
        self.pam = PositionAttention(in_channels, reduction=reduction, efficient=efficient,
                                     device=device, dtype=dtype)
        self.cam = ChannelAttention(in_channels, energy=energy, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, type(self).__name__)
        return x + self.pam._attend(x) + self.cam._attend(x)
