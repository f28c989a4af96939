"""What ATen runs inside a block, for tests that check how it computes (which operators, how
large their results), shared by ``tests/layers/test_non_local.py`` and
``tests/layers/test_danet.py``."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten operator that runs (``names``, e.g. ``'clone'``) and the
    largest numel of any tensor one returns (``largest``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
