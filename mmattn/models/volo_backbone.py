"""VOLO as an OpenMMLab backbone (``type='mmattn.VOLO'``) for mmseg / mmdet / mmpose configs.

VOLO has one stride-8 Outlooker stage and three stride-16 Transformer stages. Dense
prediction heads expect a pyramid, so (as ViT backbones do in mmseg's BEiT/MAE configs with
``Feature2Pyramid``, and ViTDet's simple feature pyramid) the four stage outputs are rescaled
by (2, 2, 1, 1/2):

====== ================= ======= ===================================== =======
output stage             stride  rescale                               stride
====== ================= ======= ===================================== =======
0      Outlooker         8       ``ConvTranspose2d(k=2, s=2)``         4
1      Transformer 1     16      ``ConvTranspose2d(k=2, s=2)``         8
2      Transformer 2     16      identity                              16
3      Transformer 3     16      ``MaxPool2d(2)``                      32
====== ================= ======= ===================================== =======

``pyramid=False`` returns the stage outputs unchanged (strides 8, 16, 16, 16).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from mmengine.model import BaseModule
from torch import nn

from mmattn.registry import MODELS

from .volo import VOLO_ARCHS, VOLO, timm_argument

__all__ = ['VOLOBackbone']


@MODELS.register_module(name='VOLO')
class VOLOBackbone(VOLO, BaseModule):
    """VOLO backbone (arXiv 2106.13112), registered as ``mmattn.VOLO``.

    Parameter names are those of timm's / sail-sg's VOLO checkpoints (``patch_embed``,
    ``pos_embed``, ``network``), so ``init_cfg=dict(type='Pretrained', checkpoint=...)``
    loads a classification checkpoint directly (the classification-only keys - heads,
    class-attention blocks, final norm - are reported as unexpected and skipped).

    Args:
        arch: ``'d1'`` ... ``'d5'`` or a dict with ``layers``, ``embed_dims``, ``num_heads``
            (and optionally ``mlp_ratio``, ``stem_hidden_dim``).
        img_size: Size the position embedding is stored for: the pretraining resolution of
            the checkpoint (224, 384, 448 or 512). Inputs of any size work (the embedding
            is resampled); H and W should be multiples of 16 for ``pyramid=True``.
        in_channels: Input channels.
        out_indices: Which outputs (0-3, see the module docstring) to return.
        pyramid: Rescale the outputs to strides 4, 8, 16, 32.
        drop_path_rate: Stochastic depth of the Transformer stages.
        with_cp: Gradient checkpointing of the blocks.
        init_cfg: mmengine initialisation config (e.g. ``Pretrained``).
    """

    STRIDES = (8, 16, 16, 16)
    RESCALES = (2, 2, 1, 0.5)

    def __init__(self, arch: str | dict = 'd1', *, img_size: int | Sequence[int] = 224,
                 in_channels: int = 3, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pyramid: bool = True, drop_path_rate: float = 0., with_cp: bool = False,
                 init_cfg: dict | list | None = None, **kwargs: Any) -> None:
        name = type(self).__name__
        if isinstance(arch, str):
            if arch.lower() not in VOLO_ARCHS:
                raise ValueError(f'{name}: arch must be one of {tuple(VOLO_ARCHS)} or a dict, '
                                 f'got {arch!r}')
            arch = VOLO_ARCHS[arch.lower()]
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f'{name}: out_indices must be a non-empty subset of (0, 1, 2, 3), '
                             f'got {out_indices!r}')
        arch = {**arch, **kwargs}
        downsamples = tuple(timm_argument(arch, 'downsamples'))
        if not downsamples or not downsamples[0] or any(downsamples[1:]):
            raise ValueError(f'{name}: downsamples must be True after the first stage and False '
                             f'after the others (the layout STRIDES={self.STRIDES} and the '
                             f'pyramid rescaling are for), got downsamples={downsamples!r}')
        super().__init__(img_size=img_size, in_chans=in_channels, num_classes=0,
                         global_pool='', post_layers=None, use_aux_head=False,
                         drop_path_rate=drop_path_rate, **arch)
        self.init_cfg = init_cfg  # BaseModule.__init__ ran inside VOLO's with init_cfg=None
        self.out_indices = out_indices
        self.pyramid = pyramid
        self.set_grad_checkpointing(with_cp)
        # keep only the stages that feed an output; the classification norm/head are unused
        self.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.post_network = None
        dims = arch['embed_dims']
        rescale = []
        for i in range(4):
            if not pyramid or self.RESCALES[i] == 1:
                rescale.append(nn.Identity())
            elif self.RESCALES[i] == 2:
                rescale.append(nn.ConvTranspose2d(dims[i], dims[i], kernel_size=2, stride=2))
            else:
                rescale.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.rescale = nn.ModuleList(rescale)

    @property
    def out_strides(self) -> tuple[int, ...]:
        """Stride of each returned map."""
        return tuple(int(self.STRIDES[i] / (self.RESCALES[i] if self.pyramid else 1))
                     for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """Feature maps (NCHW) of ``x`` (N, C, H, W), one per ``out_indices`` entry."""
        feats = self.forward_intermediates(x, indices=list(self.out_indices), stop_early=True,
                                           intermediates_only=True)
        return tuple(self.rescale[i](f) for i, f in zip(self.out_indices, feats))
