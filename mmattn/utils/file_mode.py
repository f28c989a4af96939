"""Files written whole: made through ``tempfile`` and renamed into place (``write_atomic``),
with the mode ``open()`` would have given them (``default_mode``)."""
from __future__ import annotations

import os
import os.path as osp
import tempfile
from typing import Callable


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` / ``os.mkdir()`` would give under the current umask
    (``tempfile.mkstemp``/``mkdtemp`` make 0600/0700, which a renamed result should not keep)."""
    umask = os.umask(0)  # reading the umask means setting it
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomic(path: str, write: Callable[[str], object]) -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it onto ``path``
    (its directory is created if needed); where ``write`` fails, or the process is
    interrupted, no file is left behind, and ``path`` keeps what it held. Returns ``path``."""
    out_dir = osp.dirname(osp.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix='.' + osp.basename(path) + '.',
                               suffix=osp.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())  # mkstemp's 0600 is not what open() would give
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    return path
