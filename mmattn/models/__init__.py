"""Models built from mmattn's blocks: mm backbones and timm entrypoints."""
from . import volo, volo_backbone  # noqa: E402,F401  (timm volo_d1..d5; mmattn.VOLO backbone)
# mmattn.models.hrnet (mmattn.PluginHRNet, mmseg) and mmattn.models.pose_hrnet
# (mmattn.PosePluginHRNet, mmpose) import their libraries' model zoos, seconds of start-up
# that timm users do not need: the registry imports them on the first look-up, each only
# where its library imports (mmattn.registry's `locations`, mmattn.models.host_backbones).
