"""Build "a config or a model name" into a network the analysis tools can run.

``CONFIG_OR_MODEL`` is either the path of an OpenMMLab config (``*.py``; its ``model`` is built
through the registry of its ``default_scope`` - mmseg, mmpose, mmpretrain, or any registered
``type`` such as a bare ``mmattn.PluginHRNet`` backbone) or a timm model name
(``timm:volo_d1`` or plain ``volo_d1``; mmattn's models are registered by ``import mmattn``).
"""
from __future__ import annotations

import os.path as osp
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ['LoadedModel', 'load_model', 'TensorForward']


class TensorForward(nn.Module):
    """``model(x)`` as a plain tensor-in forward: OpenMMLab ``BaseModel`` s are called with
    ``mode='tensor'`` (the network without pre/post-processing), other modules directly."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        from mmengine.model import BaseModel
        self._mm = isinstance(model, BaseModel)

    def forward(self, x: torch.Tensor) -> Any:
        if self._mm:
            return self.model(x, None, mode='tensor')
        return self.model(x)


@dataclass
class LoadedModel:
    """A built network with what is needed to feed it an image.

    Attributes:
        model: the network (``eval()`` mode).
        runner: :class:`TensorForward` around ``model``: call it with a (N, 3, H, W) tensor.
        input_size: the size ``(H, W)`` it is meant for (training crop / default resolution).
        preprocess: image (H, W, 3) uint8 **RGB** -> normalised (1, 3, H, W) float tensor.
        kind: ``'mm'`` or ``'timm'``.
        name: the config path or model name.
    """

    model: nn.Module
    runner: TensorForward
    input_size: tuple[int, int]
    preprocess: Callable[[np.ndarray], torch.Tensor]
    kind: str
    name: str


def _mm_input_size(cfg: Any) -> tuple[int, int]:
    """(H, W) from an mm config: seg ``crop_size`` (H, W), pose ``codec.input_size`` (W, H),
    classification ``img_size``; 224 x 224 otherwise."""
    if cfg.get('crop_size') is not None:
        h, w = cfg.crop_size
        return int(h), int(w)
    codec = cfg.get('codec')
    if isinstance(codec, dict) and 'input_size' in codec:
        w, h = codec['input_size']
        return int(h), int(w)
    size = cfg.get('img_size')
    if isinstance(size, int):
        return size, size
    return 224, 224


def _mm_preprocess(model: nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
    dp = getattr(model, 'data_preprocessor', None)
    mean = getattr(dp, 'mean', None)
    std = getattr(dp, 'std', None)
    # mm pipelines load BGR and the preprocessor flips to RGB when ``bgr_to_rgb``; we start
    # from RGB, so the channels are flipped only when the model expects BGR.
    to_bgr = not getattr(dp, '_channel_conversion', getattr(dp, 'channel_conversion', False))
    enabled = getattr(dp, '_enable_normalize', mean is not None)

    def preprocess(rgb: np.ndarray) -> torch.Tensor:
        img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float()
        if to_bgr:
            img = img[[2, 1, 0]]
        if enabled and mean is not None:
            img = (img - mean.view(-1, 1, 1).cpu()) / std.view(-1, 1, 1).cpu()
        return img.unsqueeze(0)

    return preprocess


def _timm_preprocess(model: nn.Module) -> Callable[[np.ndarray], torch.Tensor]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    mean = torch.tensor(cfg.get('mean', (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get('std', (0.229, 0.224, 0.225))).view(3, 1, 1)

    def preprocess(rgb: np.ndarray) -> torch.Tensor:
        img = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.
        return ((img - mean) / std).unsqueeze(0)

    return preprocess


def _load_weights(model: nn.Module, checkpoint: str, strict: bool) -> None:
    """mmengine's ``load_checkpoint`` with weights-only loading that also reads checkpoints
    written without ``WeightsOnlyCheckpointHook`` (mmengine's HistoryBuffer and numpy
    objects, nothing else)."""
    from mmengine.runner import load_checkpoint

    from mmattn.utils.checkpoint import mmengine_checkpoint_globals
    with mmengine_checkpoint_globals():
        load_checkpoint(model, checkpoint, map_location='cpu', strict=strict)


def load_model(spec: str, *, checkpoint: str | None = None,
               cfg_options: dict | None = None, model_kwargs: dict | None = None,
               device: str | torch.device = 'cpu') -> LoadedModel:
    """Build ``spec`` (an mm config path, ``timm:<name>`` or a timm model name).

    Args:
        spec: config path or timm model name.
        checkpoint: optional checkpoint file, loaded with mmengine's ``load_checkpoint``
            (non-strict for mm models: missing keys are reported, e.g. plugins on a stock
            backbone; strict for timm models).
        cfg_options: overrides merged into an mm config (``Config.merge_from_dict``).
        model_kwargs: keyword arguments of ``timm.create_model`` (e.g. ``img_size=448``).
        device: where to build it.

    Raises:
        ValueError: ``spec`` is neither an existing ``.py`` config nor a timm model name, or
            ``device`` is not ``'cpu'`` or a CUDA device this process sees.
        mmattn.utils.checkpoint.CheckpointFileError: (a ValueError) ``checkpoint`` is
            missing, truncated or not a PyTorch checkpoint; the message says what to do.
    """
    import timm

    import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
    from mmattn.utils.checkpoint import check_checkpoint_file
    from mmattn.utils.device import check_device

    device = check_device(device, 'load_model: device')
    if checkpoint and '://' not in checkpoint:  # before building; URLs are mmengine's to fetch
        check_checkpoint_file(checkpoint, 'checkpoint')

    if spec.endswith('.py'):
        if '::' not in spec and not osp.isfile(spec):
            raise ValueError(f'load_model: spec must be an existing config file or a timm '
                             f'model name, got {spec!r} (no such file)')
        from mmengine.config import Config
        from mmengine.registry import MODELS, DefaultScope
        if '::' in spec:  # a config shipped by a package: mmseg::ocrnet/...py
            from mmengine.hub import get_config
            cfg = get_config(spec)
        else:
            cfg = Config.fromfile(spec)
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        model_cfg = cfg.model.copy()
        if 'data_preprocessor' not in model_cfg and cfg.get('data_preprocessor') is not None:
            model_cfg['data_preprocessor'] = cfg.data_preprocessor
        # the config's scope for this build only: a global default scope would leak into
        # every later build in the process
        with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
            model = MODELS.build(model_cfg)
        if checkpoint:
            _load_weights(model, checkpoint, strict=False)
        model.to(device).eval()
        return LoadedModel(model, TensorForward(model), _mm_input_size(cfg),
                           _mm_preprocess(model), 'mm', spec)

    name = spec[len('timm:'):] if spec.startswith('timm:') else spec
    if not timm.is_model(name):
        raise ValueError(f'load_model: spec must be an existing config file (*.py) or a timm '
                         f'model name, got {spec!r}')
    model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
    if checkpoint:
        _load_weights(model, checkpoint, strict=True)
    model.to(device).eval()
    size = (model.pretrained_cfg or {}).get('input_size', (3, 224, 224))
    return LoadedModel(model, TensorForward(model), (int(size[1]), int(size[2])),
                       _timm_preprocess(model), 'timm', name)
