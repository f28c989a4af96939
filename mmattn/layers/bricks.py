"""mmcv's ``ConvModule`` in a form ``torch.jit.script`` compiles, for the blocks that build
their convolutions with it (CBAM's spatial gate, the non-local block)."""
from __future__ import annotations

import torch
from mmcv.cnn import ConvModule

from .checks import concrete_annotations

__all__ = ['ScriptableConvModule']


class ScriptableConvModule(ConvModule):
    """``mmcv.cnn.ConvModule`` (same arguments, submodules and state-dict keys) whose forward
    compiles under ``torch.jit.script``: mmcv's looks its norm layer up by a name held in an
    attribute (``getattr(self, self.norm_name)``), which TorchScript cannot compile.

    The forward applies the submodules in the order they were registered, which for
    ``order=('conv', 'norm', 'act')`` (the only order accepted) is mmcv's: explicit padding,
    conv, norm, activation. ``activate=False`` / ``norm=False`` are not supported (mmcv's
    ``efficient_conv_bn_eval`` either: the conv and the norm always run separately).
    """

    __jit_unused_properties__ = ['norm']  # mmcv's property does the dynamic getattr

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if tuple(self.order) != ('conv', 'norm', 'act'):
            raise ValueError(f"{type(self).__name__}: order must be ('conv', 'norm', 'act'), "
                             f'got {self.order!r}')

    @concrete_annotations
    def forward(self, x: torch.Tensor, activate: bool = True,
                norm: bool = True) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not (activate and norm):
                raise ValueError(f'{type(self).__name__}: activate=False / norm=False are not '
                                 f'supported, got activate={activate}, norm={norm}')
        for layer in self.children():  # registered as padding, conv, norm, activation
            x = layer(x)
        return x
