"""The attention blocks, one paper per file, all registered in ``mmattn.registry.MODELS``.

Every block takes NCHW input and ``in_channels`` as its first argument, so it serves as
an OpenMMLab plugin (``build_plugin_layer(cfg, in_channels=C)``), as timm's
``attn_layer`` (``attn_layer(C)``) and as a plain ``nn.Module``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from mmattn.registry import MODELS

from . import cbam, coord_attn, criss_cross, danet, eca, non_local, outlook, psa, squeeze_excite
from .cbam import *  # noqa: F401,F403
from .coord_attn import *  # noqa: F401,F403
from .criss_cross import *  # noqa: F401,F403
from .danet import *  # noqa: F401,F403
from .eca import *  # noqa: F401,F403
from .non_local import *  # noqa: F401,F403
from .outlook import *  # noqa: F401,F403
from .psa import *  # noqa: F401,F403
from .squeeze_excite import *  # noqa: F401,F403

_MODULES = (cbam, coord_attn, criss_cross, danet, eca, non_local, outlook, psa, squeeze_excite)


def attention_blocks() -> dict[str, type[nn.Module]]:
    """Every registered attention block, by its registered name."""
    return {name: cls for name, cls in MODELS.module_dict.items()
            if cls.__module__.startswith('mmattn.layers.')}


def create_attn(name: str | type[nn.Module], channels: int, **kwargs: Any) -> nn.Module:
    """Build a block from its registered name (or class) the way timm's ``create_attn`` does."""
    if isinstance(name, str):
        blocks = attention_blocks()
        key = name.split('.', 1)[1] if name.startswith('mmattn.') else name
        if key not in blocks:
            raise ValueError(f'create_attn: unknown block name {name!r}; expected one of '
                             f'{sorted(blocks)}')
        name = blocks[key]
    return name(channels, **kwargs)


__all__ = ['attention_blocks', 'create_attn'] + [n for m in _MODULES for n in getattr(m, '__all__', [])]
