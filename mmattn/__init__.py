"""mmattn: attention blocks for OpenMMLab and timm.

``import mmattn`` checks that the dependency stack can work (torch with torchvision,
mmcv with its compiled ops) and fails with one message naming the fix if not; then it
registers the blocks in ``mmattn.registry.MODELS`` (scope ``mmattn``) and the models in
timm's model registry.
"""
from .version import __version__, version_info
from .utils.stack import require_stack

require_stack()

from .utils.config_scope import register_config_scope  # noqa: E402

register_config_scope()

from . import layers  # noqa: E402  (registers the blocks)
from . import models  # noqa: E402  (registers backbones and timm models)

__all__ = ['__version__', 'version_info', 'layers', 'models']
