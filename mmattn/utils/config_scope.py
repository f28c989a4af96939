"""Let mmengine configs inherit mmattn's configs as ``_base_ = ['mmattn::demo/x.py']``.

mmengine resolves ``pkg::path`` only for the packages in its ``MODULE2PACKAGE`` table, and
finds the package directory through ``pkg_resources``, which for a PEP 660 editable install
(``pip install -e .``) names site-packages instead of the source tree. Importing mmattn
adds mmattn to the table and resolves its directory from the imported module itself; the
configs then come from ``mmattn/.mim/configs`` (links to ``configs/`` in an editable install,
copies in a wheel). A tool must therefore ``import mmattn`` before it loads a config that
inherits ``mmattn::`` (our ``tools/train.py`` and ``tools/test.py`` do); mmengine reads
``custom_imports`` only after it has resolved ``_base_``.
"""
from __future__ import annotations

import os.path as osp
from typing import Callable

PACKAGE = 'mmattn'


def _package_dir() -> str:
    return osp.dirname(osp.dirname(osp.abspath(__file__)))


def register_config_scope() -> None:
    """Make ``mmattn::`` resolvable by mmengine's Config (idempotent)."""
    import mmengine.config.config as config_module
    from mmengine.config.utils import MODULE2PACKAGE

    MODULE2PACKAGE.setdefault(PACKAGE, PACKAGE)
    original: Callable[[str], str] = config_module.get_installed_path
    if getattr(original, '_mmattn_wrapped', False):
        return

    def get_installed_path(package: str) -> str:
        if package == PACKAGE:
            return _package_dir()
        return original(package)

    get_installed_path._mmattn_wrapped = True  # type: ignore[attr-defined]
    config_module.get_installed_path = get_installed_path
