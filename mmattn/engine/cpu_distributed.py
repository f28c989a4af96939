"""Let mmengine's ``pytorch`` launcher (torchrun, ``tools/dist_train.sh``) run on CPUs.

mmengine 0.10.7 assumes a GPU per process twice: ``init_dist('pytorch')`` calls
``torch.cuda.set_device(LOCAL_RANK)``, and ``Runner.wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to DistributedDataParallel, which PyTorch rejects for a CPU
module. On a machine without CUDA, :func:`prepare_cpu_distributed` initialises the process
group itself (gloo, from torchrun's environment; the Runner then skips ``init_dist``) and
selects :class:`CPUDistributedDataParallel`, which drops ``device_ids`` for CPU modules.
With a GPU nothing changes. After a run, :func:`release_process_group` ends the process group
before the interpreter's exit (any launcher, any backend).
"""
from __future__ import annotations

import datetime
import gc
from typing import Any

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper that accepts the ``device_ids`` the Runner passes and drops
    them when the module lives on the CPU (PyTorch requires ``device_ids=None`` there)."""

    def __init__(self, module: torch.nn.Module, device_ids: Any = None, **kwargs: Any) -> None:
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        super().__init__(module=module, device_ids=None if on_cpu else device_ids, **kwargs)


def _to_bn(node: Any) -> int:
    """Replace ``SyncBN`` norm configs by ``BN`` in place; return how many were replaced."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _to_bn(value)
    return count


def revert_sync_bn_cfg(cfg: Config) -> int:
    """On a machine without CUDA, train with ``BN`` where the config asks for ``SyncBN``
    (PyTorch's SyncBatchNorm is CUDA-only; the parameters and checkpoint keys are the same).
    Returns the number of norm configs changed."""
    if torch.cuda.is_available():
        return 0
    model = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
    count = _to_bn(model)
    if count:
        cfg.model = model
    return count


def prepare_cpu_distributed(cfg: Config, launcher: str) -> bool:
    """For ``launcher='pytorch'`` without CUDA: start the gloo process group and choose the
    CPU DDP wrapper. Returns whether it did."""
    if launcher != 'pytorch' or torch.cuda.is_available():
        return False
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    timeout = dist_cfg.get('timeout')
    if not torch_dist.is_initialized():
        kwargs = {'timeout': datetime.timedelta(seconds=timeout)} if timeout else {}
        torch_dist.init_process_group(backend='gloo', **kwargs)
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper['type'] = 'CPUDistributedDataParallel'
    # what the Runner passes to its default wrapper
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    return True


def release_process_group() -> None:
    """End the default process group, if one was started, while the interpreter is still whole;
    call it once the caller holds no Runner (``del runner`` first).

    destroy_process_group() alone only unregisters the group: mmengine's Runner keeps the
    DistributedDataParallel wrapper through reference cycles, and DDP's reducer keeps the group,
    so gloo's worker threads lived on into the interpreter's exit. A worker that was still
    releasing a finished collective's tensors (mmengine's last broadcast of the metrics) then
    needed the GIL during finalization, where Python 3.11 ends such a thread with pthread_exit,
    whose unwinding through a noexcept destructor aborts the process ("terminate called without
    an active exception", CPython gh-87135): a rank of a two-process CPU run failed that way in
    about one run in four. Collecting those cycles first leaves the group's last owner to
    destroy_process_group(), and the group's destructor joins its threads (with the GIL released)
    before the function returns. ``tools/train.py`` and ``tools/test.py`` call it after a run
    that ended normally."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()
