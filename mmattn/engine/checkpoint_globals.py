"""Let torch >= 2.6's weights-only ``torch.load`` read mmengine's own checkpoints.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch 2.6 turned on by
default, and its checkpoints hold more than tensors: the message hub's ``HistoryBuffer`` and
numpy arrays, dtypes and scalars (numpy 2 pickles dtypes through ``getattr``). Resuming or
testing then fails with "Weights only load failed". :func:`mmengine_checkpoint_globals`
allows exactly those globals while a run loads checkpoints, rather than turning weights-only
loading off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), which would run any pickle it is given.
"""
from __future__ import annotations

import builtins
import contextlib
from typing import Iterator

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
    return [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct,
            *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType'))]


#: what mmengine's CheckpointHook writes besides tensors (see the module docstring)
MMENGINE_CHECKPOINT_GLOBALS = [HistoryBuffer, builtins.getattr, *_numpy_globals()]


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Within the block, weights-only loading accepts mmengine's checkpoint contents."""
    with torch.serialization.safe_globals(MMENGINE_CHECKPOINT_GLOBALS):
        yield
