"""What runs inside a block, for tests that check how it computes (which operators, how large
their results, how many would be kernel launches on a GPU), shared by
``tests/layers/test_non_local.py``, ``tests/layers/test_danet.py`` and
``tests/ops/test_kernels_emulated.py``."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpRecorder(TorchDispatchMode):
    """Records every operator that runs: its name (``names``, e.g. ``'clone'``), its qualified
    name (``qualified``, e.g. ``'aten.clone'``), and the largest numel of any tensor one returns
    (``largest``). ``launches()`` leaves out views and dtype queries: on a GPU each of the rest is
    a kernel launch."""

    VIEWS = frozenset({
        'view', 'detach', '_unsafe_view', 't', 'transpose', 'unsqueeze', 'squeeze', 'expand',
        'select', 'slice', 'reshape', 'as_strided', 'alias', 'permute', 'split',
        'split_with_sizes', 'unbind', 'promote_types'})

    def __init__(self) -> None:
        super().__init__()
        self.qualified: list[str] = []
        self.largest = 0

    @property
    def names(self) -> list[str]:
        """The operators' names without their namespace, in the order they ran."""
        return [q.split('.', 1)[1] for q in self.qualified]

    def launches(self) -> list[str]:
        """The qualified names of the operators that are not views, in the order they ran."""
        return [q for q, n in zip(self.qualified, self.names) if n not in self.VIEWS]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.qualified.append(str(func.overloadpacket))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
