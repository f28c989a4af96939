"""Models built from mmattn's blocks: mm backbones and timm entrypoints."""
from . import volo, volo_backbone  # noqa: E402,F401  (timm volo_d1..d5; mmattn.VOLO backbone)
# mmattn.models.hrnet (mmattn.PluginHRNet, mmattn.PosePluginHRNet) imports mmseg's and
# mmpose's model zoos, seconds of start-up that timm users do not need: the registry
# imports it on the first look-up (mmattn.registry's `locations`).
