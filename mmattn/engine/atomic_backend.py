"""A local file backend whose writes are atomic, for checkpoints.

mmengine's ``LocalBackend.put`` opens the target and writes into it, so a run killed while
saving leaves a truncated ``iter_N.pth`` behind. ``AtomicLocalBackend`` writes into a
temporary file in the same directory and renames it over the target (``os.replace``, atomic
on POSIX), so a checkpoint file is either complete or absent. Select it with
``default_hooks.checkpoint.backend_args=dict(backend='atomic_local')``; ``tools/train.py``
does so when the config leaves the checkpoint backend unset.
"""
from __future__ import annotations

import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend

from mmattn.utils.file_mode import default_mode

ATOMIC_BACKEND = 'atomic_local'


def _atomic_write(data: bytes, filepath: Union[str, Path]) -> None:
    directory = osp.dirname(osp.abspath(filepath))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{osp.basename(filepath)}.', suffix='.tmp')
    try:
        os.fchmod(fd, default_mode())  # what open() would have given (mkstemp makes it 0600)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


class AtomicLocalBackend(LocalBackend):
    """``LocalBackend`` with atomic ``put`` / ``put_text`` (temporary file + ``os.replace``)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        _atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        _atomic_write(obj.encode(encoding), filepath)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)
