"""VOLO (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", arXiv 2106.13112) in
timm's model registry: ``volo_d1`` ... ``volo_d5``.

The architecture is timm's ``timm.models.volo.VOLO`` (itself adapted from the official
sail-sg/volo release) with four changes:

* the Outlooker blocks run mmattn's :class:`~mmattn.layers.OutlookAttention` (so the shared
  outlook aggregation, and a fused kernel where one is available, is used);
* any input size: the absolute position embedding, stored at the training grid, is resampled
  (bicubic) when the token grid differs (timm's VOLO rejects other sizes);
* ``return_dense=True`` makes the training-mode forward return the token-labelling outputs of
  the release ``(class logits, per-token aux logits, MixToken box)``; off by default, so that
  the forward is a plain classifier (mmpretrain's ``TimmClassifier``);
* on CUDA the convolutional stem runs channels-last (:meth:`VOLO.embed`): the same
  convolutions on cuDNN's NHWC kernels instead of NCHW ones with layout transposes around
  them, the BatchNorms on PyTorch's channels-last kernels, and the channels-last tokens the
  stages take come out of it without a copy (timm's stem at batch 128 bf16 on an H100:
  forward + backward 25.0 ms NCHW, 10.5 ms channels-last; the whole VOLO-D1 training step
  63.4 ms against timm's 98.7; docs/benchmarks.md).

State-dict keys are those of timm's ``volo_d*_224``/``_384``/``_448``/``_512`` models and of
the official release (``patch_embed``, ``pos_embed``, ``network``, ``post_network``,
``cls_token``, ``aux_head``, ``norm``, ``head``); both load strictly.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, resample_abs_pos_embed_nhwc
from timm.models import (build_model_with_cfg, checkpoint, generate_default_cfgs, register_model,
                          resolve_pretrained_cfg)
from timm.models import volo as timm_volo
from timm.models._features import feature_take_indices
from torch import nn

from mmattn.layers.checks import (check_divisible, check_input, check_positive,
                                  check_probability, concrete_annotations, shape_str)
from mmattn.layers.outlook import OutlookAttention

from .dense_layers import use_column_sum_layers

__all__ = ['VOLO', 'Outlooker', 'VOLO_ARCHS', 'checkpoint_filter_fn']

# torch.fx records the position-embedding resampling as one call (it returns the embedding
# unchanged when the grid matches) instead of tracing its size comparison; timm's tracers
# already treat it so (timm registers it with register_notrace_function), plain
# torch.fx.symbolic_trace needs this
torch.fx.wrap('resample_abs_pos_embed_nhwc')

# Table 1 of the paper / the release: stage depths, widths, heads, MLP ratio, stem width.
VOLO_ARCHS: dict[str, dict[str, Any]] = {
    'd1': dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
    'd2': dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    'd3': dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)),
    'd4': dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)),
    'd5': dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768),
               num_heads=(12, 16, 16, 16), mlp_ratio=4, stem_hidden_dim=128),
}


_TIMM_SIGNATURE = inspect.signature(timm_volo.VOLO)


def timm_argument(kwargs: dict[str, Any], key: str) -> Any:
    """``kwargs[key]``, else the default of timm's ``VOLO`` for it (the one value it builds
    with)."""
    return kwargs.get(key, _TIMM_SIGNATURE.parameters[key].default)


def check_architecture(block: str, layers: Sequence[int], kwargs: dict[str, Any]) -> None:
    """Refuse a stage layout that timm's VOLO builds but cannot run (its forward would fail
    in a reshape or an addition deep inside a block): ``embed_dims``, ``num_heads`` (and a
    per-stage ``mlp_ratio``) with one entry per stage, ``downsamples``/``outlook_attention``
    with at least one, every width divisible by its heads, the width changing only across a
    downsampling layer (none after the last stage), and the position embedding
    (``embed_dims[-1]`` channels, added where the first stage and its downsampling end)
    as wide as the tokens it is added to; and dropout rates in [0, 1]."""
    for key in ('drop_rate', 'pos_drop_rate', 'attn_drop_rate', 'drop_path_rate'):
        check_probability(key, timm_argument(kwargs, key), block)
    n = len(layers)
    where = f'{n} for layers={tuple(layers)!r}'
    for key in ('embed_dims', 'num_heads'):
        value = kwargs.get(key)
        if not isinstance(value, Sequence) or len(value) != n:
            raise ValueError(f'{block}: {key} must give one value per stage ({where}), '
                             f'got {key}={value!r}')
    mlp_ratio = timm_argument(kwargs, 'mlp_ratio')
    if isinstance(mlp_ratio, Sequence) and len(mlp_ratio) != n:
        raise ValueError(f'{block}: mlp_ratio must be a number or one value per stage '
                         f'({where}), got mlp_ratio={mlp_ratio!r}')
    flags = {}
    for key in ('downsamples', 'outlook_attention'):
        flags[key] = tuple(timm_argument(kwargs, key))
        if len(flags[key]) < n:
            raise ValueError(f'{block}: {key} must give a value for every stage ({where}), '
                             f'got {key}={flags[key]!r}'
                             + ('' if key in kwargs else ' (timm\'s default)'))
    dims, heads, down = tuple(kwargs['embed_dims']), kwargs['num_heads'], flags['downsamples']
    if down[n - 1]:
        raise ValueError(f'{block}: downsamples[{n - 1}] must be False (there is no stage after '
                         f'the last one to downsample to), got downsamples={down!r}')
    widths = []  # the width of the tokens each entry of VOLO.network outputs
    for i in range(n):
        check_positive(f'embed_dims[{i}]', dims[i], block)
        check_positive(f'num_heads[{i}]', heads[i], block)
        check_divisible(f'embed_dims[{i}]', dims[i], f'num_heads[{i}]', heads[i], block)
        widths.append(dims[i])
        if down[i]:
            widths.append(dims[i + 1])
        elif i + 1 < n and dims[i + 1] != dims[i]:
            raise ValueError(f'{block}: embed_dims[{i + 1}]={dims[i + 1]} differs from '
                             f'embed_dims[{i}]={dims[i]} with downsamples[{i}]=False (only a '
                             f'downsampling layer changes the width), got embed_dims={dims!r}')
    if len(widths) > 2 and widths[1] != dims[-1]:
        raise ValueError(f'{block}: the position embedding has embed_dims[-1]={dims[-1]} '
                         f'channels, but the tokens it is added to (after the first stage and '
                         f'its downsampling) have {widths[1]}; got embed_dims={dims!r}, '
                         f'downsamples={down!r}')


def smallest_input(convs: Sequence[nn.Conv2d]) -> tuple[int, int]:
    """The smallest (H, W) that every convolution of ``convs``, applied in turn, leaves at
    least one pixel of (VOLO's stem, patch projection and downsampling: 15 x 15 for the
    default ``patch_size=8``)."""
    def fits(n: int, axis: int) -> bool:
        for conv in convs:
            if conv.padding == 'same':
                continue
            pad = 0 if conv.padding == 'valid' else conv.padding[axis]
            reach = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
            n = (n + 2 * pad - reach) // conv.stride[axis] + 1
            if n < 1:
                return False
        return True
    sizes = []
    for axis in (0, 1):
        n = 1
        while not fits(n, axis):
            n += 1
        sizes.append(n)
    return sizes[0], sizes[1]


@concrete_annotations
def check_images(x: torch.Tensor, in_chans: int, min_size: Tuple[int, int], model: str) -> None:
    """``x`` is a floating-point (B, ``in_chans``, H, W) batch of images with H, W at least
    ``min_size`` (see :func:`smallest_input`)."""
    check_input(x, None, model)
    if x.shape[1] != in_chans:
        raise ValueError(f'{model}: the input has {x.shape[1]} channels (shape {shape_str(x)}), '
                         f'but the model was built for {in_chans} input channels')
    if x.shape[2] < min_size[0] or x.shape[3] < min_size[1]:
        raise ValueError(f'{model}: expected images of at least {min_size[0]} x {min_size[1]} '
                         f'pixels (its convolutions - stem, patch embedding, downsampling - '
                         f'leave no token of a smaller one), got {x.shape[2]} x {x.shape[3]} '
                         f'(shape {shape_str(x)})')


# torch.fx records the check as one call (run when the graph runs) instead of tracing its
# size comparisons
torch.fx.wrap('check_images')


def stem_layout(x: torch.Tensor) -> torch.Tensor:
    """The images in the memory format the stem runs in: channels-last on CUDA, else as
    given (see :meth:`VOLO.embed`)."""
    if x.is_cuda:
        return x.contiguous(memory_format=torch.channels_last)
    return x


# a torch.fx graph records the layout choice as one call (made when the graph runs) instead of
# tracing the device test
torch.fx.wrap('stem_layout')


class Outlooker(nn.Module):
    """Outlooker block (arXiv 2106.13112, Eq. 1-2), channels-last (B, H, W, C)::

        X~ = OutlookAtt(LN(X)) + X,    Z = MLP(LN(X~)) + X~

    Same submodule names as timm's / the release's ``Outlooker`` (``norm1``, ``attn``,
    ``norm2``, ``mlp``); ``attn`` is mmattn's :class:`OutlookAttention`.
    """

    def __init__(self, dim: int, kernel_size: int, padding: int, stride: int = 1,
                 num_heads: int = 1, mlp_ratio: float = 3., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer: Callable[..., nn.Module] = nn.GELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 qkv_bias: bool = False, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = OutlookAttention(dim, num_heads=num_heads, kernel_size=kernel_size,
                                     padding=padding, stride=stride, qkv_bias=qkv_bias,
                                     attn_drop=attn_drop, data_format='NHWC', **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                       **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VOLO(timm_volo.VOLO):
    """Vision Outlooker (arXiv 2106.13112): Outlooker stage at stride 8, then Transformer
    stages at stride 16, two class-attention blocks, class head + token-labelling aux head.

    Takes every argument of ``timm.models.volo.VOLO`` (``layers``, ``img_size`` - the size the
    position embedding is stored for -, ``embed_dims``, ``num_heads``, ``mlp_ratio``,
    ``drop_path_rate``, ``use_aux_head``, ``use_mix_token``, ...), plus:

    Args:
        return_dense: In training mode, return ``(cls_logits, aux_logits, bbox)`` as the
            release does for token labelling (``aux_logits``: (B, N, classes), one per token,
            with the MixToken box already un-mixed; ``bbox``: the MixToken box in token units).
            Off by default: the forward then returns ``cls + 0.5 * max_tokens(aux)`` in
            training and evaluation, as timm's VOLO does.
        pos_embed_interp: Interpolation mode used to resample the position embedding for
            another token grid.
        column_sum_grads: Make the linear layers and LayerNorms
            :mod:`mmattn.models.dense_layers`' (same parameters and state dict): on CUDA, with
            the kernels built, their parameters' gradients are column sums on mmattn's kernels
            instead of PyTorch's. On an H200 (2026-11-27, VOLO-D1, batch 128, bf16) they took
            4.2 ms of kernels off a training step (39.3 against 43.5 ms) and the step from
            45.9 to 44.2 ms with ``torch.backends.cudnn.benchmark`` (as mmattn's configs and
            timm's training script set it), 44.0 to 39.7 ms replayed from a CUDA graph; where
            the host paces the step and cuDNN picks its algorithms per call, their custom ops'
            host cost shows (53.9 against 55.6 ms). ``False`` keeps torch's layers.

    ``use_mix_token=True`` (MixToken, CutMix on the patch tokens) needs ``return_dense``.
    """

    def __init__(self, layers: tuple[int, ...], *, return_dense: bool = False,
                 pos_embed_interp: str = 'bicubic', column_sum_grads: bool = True,
                 **kwargs: Any) -> None:
        name = type(self).__name__
        if timm_argument(kwargs, 'use_mix_token') and not return_dense:
            raise ValueError(f'{name}: use_mix_token=True needs return_dense=True (the mixed '
                             'tokens are only un-mixed in the dense outputs), got '
                             'return_dense=False')
        if return_dense and not timm_argument(kwargs, 'use_aux_head'):
            raise ValueError(f'{name}: return_dense=True needs use_aux_head=True, got '
                             'use_aux_head=False')
        check_architecture(name, layers, kwargs)
        super().__init__(layers, **kwargs)
        self.return_dense = return_dense
        self.pos_embed_interp = pos_embed_interp
        # rebuild the Outlooker stages with mmattn's OutlookAttention (same keys, same init)
        num_layers = len(layers)
        outlook = timm_argument(kwargs, 'outlook_attention')
        embed_dims, num_heads = kwargs['embed_dims'], kwargs['num_heads']
        mlp_ratio = timm_argument(kwargs, 'mlp_ratio')
        mlp_ratio = tuple(mlp_ratio) if isinstance(mlp_ratio, (tuple, list)) else (mlp_ratio,) * num_layers
        for stage, net_idx in enumerate(self.stage_ends):
            if outlook[stage]:
                blocks = timm_volo.outlooker_blocks(
                    Outlooker, stage, embed_dims[stage], layers, num_heads[stage],
                    mlp_ratio=mlp_ratio[stage], qkv_bias=timm_argument(kwargs, 'qkv_bias'),
                    attn_drop=timm_argument(kwargs, 'attn_drop_rate'),
                    norm_layer=timm_argument(kwargs, 'norm_layer'),
                    device=kwargs.get('device'), dtype=kwargs.get('dtype'))
                blocks.apply(self._init_weights)
                self.network[net_idx] = blocks
        if column_sum_grads:
            use_column_sum_layers(self)
        self.model_name = type(self).__name__
        self.min_input_size = self._smallest_input()

    def _smallest_input(self) -> tuple[int, int]:
        """The smallest image the stem and the kept stages take (:func:`smallest_input`)."""
        convs = [m for m in self.patch_embed.modules() if isinstance(m, nn.Conv2d)]
        convs += [m.proj for m in self.network if isinstance(m, timm_volo.Downsample)]
        return smallest_input(convs)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's pruning; the smallest input is then that of the stages kept."""
        kept = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        self.min_input_size = self._smallest_input()
        return kept

    def __prepare_scriptable__(self) -> VOLO:
        """``torch.jit.script`` compiles the logits path: refuse ``return_dense``, whose
        training forward (MixToken) cannot be compiled."""
        if self.return_dense:
            raise RuntimeError(f'{type(self).__name__}: return_dense=True cannot be scripted (the '
                               'token-labelling forward samples MixToken boxes in Python); '
                               'script a model built with return_dense=False (same weights)')
        return self

    def add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add the position embedding to tokens ``x`` (B, H, W, C), resampled to (H, W)."""
        pos = self.pos_embed
        if pos is None:  # pruned (features of the outlooker stage only)
            return x
        # returns pos itself when the grid is already (H, W)
        pos = resample_abs_pos_embed_nhwc(pos, [x.shape[1], x.shape[2]],
                                          interpolation=self.pos_embed_interp, antialias=False)
        return self.pos_drop(x + pos)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding of images ``x`` (B, C, H, W) as (B, H/8, W/8, D) tokens.

        On CUDA the stem (three convolutions with BatchNorm and ReLU, then the patch
        projection) runs on a channels-last copy of the images: a convolution takes its memory
        format from its input, so every stem layer runs NHWC (the convolutions on cuDNN's
        NHWC kernels) and the permute to tokens is a view of a contiguous tensor. The weights
        keep their layout (the state dict is unchanged). Elsewhere the stem runs NCHW, as
        timm's does: on CPU, PyTorch's channels-last BatchNorm backward sums less precisely
        (float32 input gradients of a [4, 64, 112, 112] map ~30x further from float64 than
        NCHW's) for little gain (timm's VOLO-D1 step with channels-last weights, batch 2 on 2
        cores: 764 against 775 ms).
        """
        check_images(x, self.in_chans, self.min_input_size, self.model_name)
        return self.patch_embed(stem_layout(x)).permute(0, 2, 3, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the stages, the class-attention blocks and the final norm,
        (B, 1 + N, C) (timm's ``forward_features``, with :meth:`embed`)."""
        x = self.forward_tokens(self.embed(x))
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stages of the network on (B, H, W, C) patch tokens; returns (B, N, C)."""
        for idx, block in enumerate(self.network):
            if idx == 2:  # the position embedding is added after the outlooker stage
                x = self.add_pos_embed(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
        return x.flatten(1, 2)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as NCHW maps (timm's ``forward_intermediates`` contract).

        Stage 0 is the Outlooker stage (stride 8, ``embed_dims[0]`` channels), stages 1-3 the
        Transformer stages (stride 16). ``norm=True`` applies the final LayerNorm to the
        stride-16 stages (its width is ``embed_dims[-1]``).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'{type(self).__name__}: output_fmt must be "NCHW", got {output_fmt!r}')
        take_indices, max_index = feature_take_indices(len(self.stage_ends), indices)
        take_indices = [self.stage_ends[i] for i in take_indices]
        max_index = self.stage_ends[max_index]
        x = self.embed(x)
        network = self.network if torch.jit.is_scripting() or not stop_early \
            else self.network[:max_index + 1]
        intermediates = []
        idx = 0
        for idx, block in enumerate(network):
            if idx == 2:
                x = self.add_pos_embed(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if idx in take_indices:
                inter = self.norm(x) if norm and idx >= 2 else x
                intermediates.append(inter.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        if idx == len(self.network) - 1:  # class attention and norm follow the last block
            x = x.flatten(1, 2)
            if self.post_network is not None:
                x = self.forward_cls(x)
            x = self.norm(x)
        return x, intermediates

    def forward_train(self, x: torch.Tensor) -> Any:
        """Token-labelling forward of the release (``VOLO.forward`` in sail-sg/volo).

        In training mode returns ``(head(cls), aux_head(tokens), bbox)``: with
        ``use_mix_token`` a random box of patch tokens (``bbox``, in units of the stride-16
        token grid) is swapped with the flipped batch after the patch embedding, and the
        per-token aux logits of the box are swapped back, so that they align with the
        (un-mixed) dense targets. In evaluation mode returns the plain logits.
        """
        x = self.embed(x)
        bbox = (0, 0, 0, 0)
        if self.mix_token and self.training:
            lam = torch.distributions.Beta(self.beta, self.beta).sample()
            bbox = timm_volo.rand_bbox(x.size(), lam, scale=self.pooling_scale)
            s = self.pooling_scale
            rows, cols = slice(s * bbox[0], s * bbox[2]), slice(s * bbox[1], s * bbox[3])
            mixed = x.clone()
            mixed[:, rows, cols, :] = x.flip(0)[:, rows, cols, :]
            x = mixed
        grid = (x.shape[1] // self.pooling_scale, x.shape[2] // self.pooling_scale)
        x = self.forward_tokens(x)
        if self.post_network is not None:
            x = self.forward_cls(x)
        x = self.norm(x)
        x_cls = self.head(x.mean(dim=1) if self.global_pool == 'avg' else x[:, 0])
        if self.aux_head is None:
            return x_cls
        x_aux = self.aux_head(x[:, 1:])
        if not self.training:
            return x_cls + 0.5 * x_aux.max(1)[0]
        if self.mix_token:
            x_aux = x_aux.reshape(x_aux.shape[0], grid[0], grid[1], x_aux.shape[-1])
            rows, cols = slice(bbox[0], bbox[2]), slice(bbox[1], bbox[3])
            unmixed = x_aux.clone()
            unmixed[:, rows, cols, :] = x_aux.flip(0)[:, rows, cols, :]
            x_aux = unmixed.flatten(1, 2)
        return x_cls, x_aux, bbox

    @concrete_annotations
    def forward(self, x: torch.Tensor) -> Any:
        """Logits ``head(cls) + 0.5 * max_tokens(aux_head(tokens))``; with ``return_dense``
        in training mode the token-labelling triple (see the class docstring; not under
        ``torch.jit.script``, see :meth:`__prepare_scriptable__`)."""
        if not torch.jit.is_scripting():
            if self.return_dense and self.training:
                return self.forward_train(x)
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VOLO
                         ) -> dict[str, torch.Tensor]:
    """Accept timm / sail-sg checkpoints: unwrap ``state_dict``/``model``, strip ``module.``,
    and resample the position embedding to the model's grid (e.g. a 384 checkpoint in a 224
    model)."""
    for key in ('state_dict_ema', 'state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key == 'pos_embed' and value.shape != model.pos_embed.shape:
            value = resample_abs_pos_embed_nhwc(value, list(model.pos_embed.shape[1:3]),
                                                interpolation=model.pos_embed_interp,
                                                antialias=False)
        out[key] = value
    return out


def _create_volo(variant: str, pretrained: bool = False, **kwargs: Any) -> VOLO:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_model_with_cfg(VOLO, variant, pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
                                **kwargs)


def _cfg(url: str, hub: str, **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url, 'hf_hub_id': f'timm/{hub}',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .96, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.conv.0', 'classifier': ('head', 'aux_head'),
        'paper_ids': 'arXiv:2106.13112', 'license': 'apache-2.0',
        **kwargs,
    }


_URL = 'https://github.com/sail-sg/volo/releases/download/volo_1/'
# Official sail-sg weights (the release README), with timm's hub copies of the same weights.
default_cfgs = generate_default_cfgs({
    'volo_d1.sail_in1k_224': _cfg(_URL + 'd1_224_84.2.pth.tar', 'volo_d1_224.sail_in1k'),
    'volo_d1.sail_in1k_384': _cfg(_URL + 'd1_384_85.2.pth.tar', 'volo_d1_384.sail_in1k',
                                  crop_pct=1.0, input_size=(3, 384, 384)),
    'volo_d2.sail_in1k_224': _cfg(_URL + 'd2_224_85.2.pth.tar', 'volo_d2_224.sail_in1k'),
    'volo_d2.sail_in1k_384': _cfg(_URL + 'd2_384_86.0.pth.tar', 'volo_d2_384.sail_in1k',
                                  crop_pct=1.0, input_size=(3, 384, 384)),
    'volo_d3.sail_in1k_224': _cfg(_URL + 'd3_224_85.4.pth.tar', 'volo_d3_224.sail_in1k'),
    'volo_d3.sail_in1k_448': _cfg(_URL + 'd3_448_86.3.pth.tar', 'volo_d3_448.sail_in1k',
                                  crop_pct=1.0, input_size=(3, 448, 448)),
    'volo_d4.sail_in1k_224': _cfg(_URL + 'd4_224_85.7.pth.tar', 'volo_d4_224.sail_in1k'),
    'volo_d4.sail_in1k_448': _cfg(_URL + 'd4_448_86.79.pth.tar', 'volo_d4_448.sail_in1k',
                                  crop_pct=1.15, input_size=(3, 448, 448)),
    'volo_d5.sail_in1k_224': _cfg(_URL + 'd5_224_86.10.pth.tar', 'volo_d5_224.sail_in1k'),
    'volo_d5.sail_in1k_448': _cfg(_URL + 'd5_448_87.0.pth.tar', 'volo_d5_448.sail_in1k',
                                  crop_pct=1.15, input_size=(3, 448, 448)),
    'volo_d5.sail_in1k_512': _cfg(_URL + 'd5_512_87.07.pth.tar', 'volo_d5_512.sail_in1k',
                                  crop_pct=1.15, input_size=(3, 512, 512)),
})


def _volo(arch: str, pretrained: bool, kwargs: dict[str, Any]) -> VOLO:
    variant = f'volo_{arch}'
    if 'img_size' not in kwargs:  # store the position embedding at the weights' resolution
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        kwargs['img_size'] = tuple(cfg.input_size[-2:])
    return _create_volo(variant, pretrained=pretrained, **{**VOLO_ARCHS[arch], **kwargs})


@register_model
def volo_d1(pretrained: bool = False, **kwargs: Any) -> VOLO:
    """VOLO-D1 (26.6M parameters at 224, 84.2% top-1 in the paper)."""
    return _volo('d1', pretrained, kwargs)


@register_model
def volo_d2(pretrained: bool = False, **kwargs: Any) -> VOLO:
    """VOLO-D2 (58.7M parameters at 224, 85.2% top-1 in the paper)."""
    return _volo('d2', pretrained, kwargs)


@register_model
def volo_d3(pretrained: bool = False, **kwargs: Any) -> VOLO:
    """VOLO-D3 (86.3M parameters at 224, 85.4% top-1 in the paper)."""
    return _volo('d3', pretrained, kwargs)


@register_model
def volo_d4(pretrained: bool = False, **kwargs: Any) -> VOLO:
    """VOLO-D4 (193M parameters at 224, 85.7% top-1 in the paper)."""
    return _volo('d4', pretrained, kwargs)


@register_model
def volo_d5(pretrained: bool = False, **kwargs: Any) -> VOLO:
    """VOLO-D5 (296M parameters at 224, 86.1% top-1 in the paper; stem width 128, MLP ratio 4)."""
    return _volo('d5', pretrained, kwargs)
