"""Recurrent criss-cross attention (CCNet, Huang et al., ICCV 2019, arXiv 1811.11721), on
mmcv's ``mmcv.ops.CrissCrossAttention``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmattn.ops.dispatch import fx_tracing
from mmattn.registry import MODELS

from .checks import check_input, check_positive, concrete_annotations

try:  # mmcv.ops loads mmcv's compiled extension; mmcv-lite has none.
    from mmcv.ops import CrissCrossAttention as _MMCVCrissCrossAttention
    _MMCV_OPS_ERROR: str | None = None
except ImportError as err:  # pragma: no cover - depends on the installed mmcv build
    _MMCVCrissCrossAttention = None
    _MMCV_OPS_ERROR = f'{type(err).__name__}: {err}'

__all__ = ['RecurrentCrissCrossAttention']

# torch.fx records the input check as one call (run on the real tensor when the graph runs)
# instead of tracing its size checks
torch.fx.wrap('check_input')


@MODELS.register_module()
class RecurrentCrissCrossAttention(nn.Module):
    r"""Recurrent criss-cross attention, RCCA (arXiv 1811.11721, Sec. 3.2-3.3).

    One criss-cross attention module (mmcv's op, kept as ``self.cca``) applied ``recurrence``
    times with shared weights (Sec. 3.3, ``R = 2``). One application (Eq. 1-2):

    .. math::
        d_{i,u} = Q_u \Omega_{i,u}^T, \qquad A = \mathrm{softmax}(D), \qquad
        H'_u = \gamma \sum_{i} A_{i,u} \Phi_{i,u} + H_u

    where ``Ω_u`` / ``Φ_u`` are the keys / values on the row and column of ``u``: ``H + W - 1``
    positions, the pixel ``u`` itself counted once (mmcv masks it out of the column energies
    with ``-inf`` on the diagonal). ``Q`` and ``K`` are 1x1 convs to ``C // 8`` channels, ``V``
    keeps ``C``. Eq. 2 of the paper has no ``γ``; the released code and mmcv scale the
    aggregation by a learnable ``γ`` initialised to 0, so a fresh block is the identity.

    Half-precision modules (``.half()``/``.bfloat16()``) run the op under autocast in the
    input's dtype: mmcv's float32 ``-inf`` mask otherwise mixes dtypes in its einsum.

    TorchScript and torch.fx: mmcv's op is plain PyTorch, so ``torch.jit.script`` compiles
    the block and ``torch.fx.symbolic_trace`` traces through it (no leaf module needed); both
    record the float32 path: the autocast above is eager-only, so a scripted or traced
    half-precision block must run under the caller's ``torch.autocast`` (float32 blocks are
    unaffected).

    ONNX: export with ``torch.onnx.export(..., dynamo=True)``. The TorchScript exporter
    (``dynamo=False``) fails: mmcv builds the mask with ``torch.diag``, for which it has no
    symbolic (``aten::diag``, opset 17).

    State-dict keys are mmcv's module under ``cca.`` (``cca.query_conv``, ``cca.key_conv``,
    ``cca.value_conv``, ``cca.gamma.scale``), matching mmseg's ``CCHead`` (``decode_head.cca``).

    Args:
        in_channels: channels of the input, at least 8 (query/key have ``C // 8``).
        recurrence: number of loops ``R`` (2 in the paper: full-image context).
        device, dtype: factory kwargs for every parameter.

    Raises:
        ValueError: ``in_channels < 8`` or ``recurrence < 1``.
        ImportError: mmcv was installed without its ops (``mmcv.ops`` does not import).
    """

    _abbr_ = 'rcca'
    __constants__ = ['block_name']  # torch.jit.script: the name in the errors

    def __init__(self, in_channels: int, *, recurrence: int = 2, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        name = self.block_name = type(self).__name__
        check_positive('in_channels', in_channels, name, minimum=8)
        check_positive('recurrence', recurrence, name)
        if _MMCVCrissCrossAttention is None:
            raise ImportError(f'{name} needs mmcv.ops.CrissCrossAttention, which failed to '
                              f'import ({_MMCV_OPS_ERROR}); install the full mmcv '
                              f'(`mim install mmcv`), not mmcv-lite')
        self.in_channels = in_channels
        self.recurrence = recurrence
        self.cca = _MMCVCrissCrossAttention(in_channels)
        if device is not None or dtype is not None:
            self.cca.to(device=device, dtype=dtype)

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels, self.block_name)
        # mmcv's op adds a float32 -inf mask to the energies, which promotes them to float32
        # and makes its last einsum mix dtypes; autocast re-casts the operands. Only in eager
        # mode: TorchScript has no autocast context with a run-time device, and torch.fx
        # cannot branch on a traced dtype (see the class docstring).
        if not torch.jit.is_scripting():
            if not fx_tracing() and x.dtype in (torch.float16, torch.bfloat16):
                with torch.autocast(device_type=x.device.type, dtype=x.dtype):
                    return self._recur(x)
        return self._recur(x)

    def _recur(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x
