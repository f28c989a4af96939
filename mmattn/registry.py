"""mmattn's child registries of mmengine's MODELS and HOOKS (scope ``mmattn``).

Any OpenMMLab config can then name a block as ``type='mmattn.PolarizedSelfAttention'``;
mmengine imports this package on demand (``locations``) the first time it sees the scope;
the HRNet backbones are registered for the host libraries that are installed
(``mmattn.models.host_backbones``). Hooks: ``type='mmattn.WeightsOnlyCheckpointHook'``.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmattn',
                  locations=['mmattn.layers', 'mmattn.models', 'mmattn.models.host_backbones'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmattn', locations=['mmattn.engine'])
