"""Registers the plugin-capable backbones of each host library that is installed.

``mmattn.PluginHRNet`` (``hrnet.py``) needs mmseg, ``mmattn.PosePluginHRNet``
(``pose_hrnet.py``) mmpose (and so mmdet, which mmpose imports). The registry imports this
module on its first look-up (``mmattn.registry``'s ``locations``): a backbone whose library is
missing, or fails to import, is left unregistered, with the reason in
:data:`UNAVAILABLE`, so that it never stands in the way of the other.
"""
from __future__ import annotations

import importlib
import logging

from mmengine.logging import print_log

__all__ = ['HOST_BACKBONES', 'UNAVAILABLE']

#: registered backbone name -> (module that defines it, host library it needs)
HOST_BACKBONES = {
    'PluginHRNet': ('mmattn.models.hrnet', 'mmseg'),
    'PosePluginHRNet': ('mmattn.models.pose_hrnet', 'mmpose'),
}

#: backbone name -> why it is not registered (its library's import error)
UNAVAILABLE: dict[str, str] = {}

for _name, (_module, _library) in HOST_BACKBONES.items():
    try:
        importlib.import_module(_module)
    except ImportError as exc:
        UNAVAILABLE[_name] = (f'mmattn.{_name} needs {_library}, which could not be imported '
                              f'({type(exc).__name__}: {exc})')
        print_log(UNAVAILABLE[_name], logger='current', level=logging.DEBUG)
