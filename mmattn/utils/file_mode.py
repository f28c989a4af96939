"""File modes for files and directories made through ``tempfile`` and renamed into place."""
from __future__ import annotations

import os


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``os.mkdir()`` would give under the current umask
    (``tempfile.mkstemp``/``mkdtemp`` make 0600/0700, which a renamed result should not keep)."""
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
