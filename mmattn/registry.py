"""mmattn's child registry of mmengine's MODELS (scope ``mmattn``).

Any OpenMMLab config can then name a block as ``type='mmattn.PolarizedSelfAttention'``;
mmengine imports this package on demand (``locations``) the first time it sees the scope.
"""
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmattn',
                  locations=['mmattn.layers', 'mmattn.models', 'mmattn.models.hrnet'])
