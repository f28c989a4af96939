"""A local file backend whose writes are atomic, for checkpoints.

mmengine's ``LocalBackend.put`` opens the target and writes into it, so a run killed while
saving leaves a truncated ``iter_N.pth`` behind. ``AtomicLocalBackend`` writes into a
temporary file in the same directory and renames it over the target (``os.replace``, atomic
on POSIX), so a checkpoint file is either complete or absent. Select it with
``default_hooks.checkpoint.backend_args=dict(backend='atomic_local')``; ``tools/train.py``
does so when the config leaves the checkpoint backend unset.

A process killed during a save (SIGKILL, out of memory) cannot remove its temporary file
``.{name}.XXXXXXXX.tmp`` (``XXXXXXXX``: ``tempfile``'s 8 random characters). The writer holds
an exclusive ``flock`` on it while it writes, which the kernel drops when the process dies;
:func:`remove_interrupted_saves`, run by ``tools/train.py`` when a run starts, removes the
files of exactly that pattern whose lock is free, and nothing else.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import tempfile
from pathlib import Path
from typing import Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale files are then not recognised
    fcntl = None

from mmengine.fileio import LocalBackend, register_backend

from mmattn.utils.file_mode import default_mode

ATOMIC_BACKEND = 'atomic_local'

# ``.{basename}.`` + tempfile's 8 characters from [a-z0-9_] + ``.tmp``
_TEMPORARY = re.compile(r'\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp')


def _atomic_write(data: bytes, filepath: Union[str, Path]) -> None:
    directory = osp.dirname(osp.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{osp.basename(filepath)}.', suffix='.tmp')
    try:
        if fcntl is not None:  # held until the file is closed, or the process dies
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, default_mode())  # what open() would have given (mkstemp makes it 0600)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # renamed while locked: a clean-up never sees it unlocked
                os.replace(tmp, filepath)
        if fcntl is None:  # Windows cannot rename an open file
            os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def _in_use(path: str) -> bool:
    """Whether a live process holds the write lock on ``path``."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True  # gone meanwhile, or not ours to read
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also releases the lock taken just now
    return False


def remove_interrupted_saves(directory: Union[str, Path]) -> list[str]:
    """Remove the temporary files that interrupted atomic writes left in ``directory``
    (``.{name}.XXXXXXXX.tmp``, regular files whose writer is dead) and return their paths.
    Other files, subdirectories and the temporary files of saves in progress are left alone;
    a directory that does not exist yields ``[]``."""
    if not osp.isdir(directory):
        return []
    removed = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if (_TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
                and not _in_use(entry.path)):
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.path)
    return removed


class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` with atomic ``put`` / ``put_text`` (temporary file + ``os.replace``)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        _atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        _atomic_write(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
