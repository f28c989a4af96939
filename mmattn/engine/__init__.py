"""Small additions to mmengine's engine that our tools use: an atomic local file backend for
checkpoints (and the clean-up of what an interrupted save left), checkpoints that torch's
weights-only loader reads, CPU (gloo) support for mmengine's ``pytorch`` launcher, and mmseg's
training accuracy without a host-device synchronisation."""
from mmattn.utils.checkpoint import MMENGINE_CHECKPOINT_GLOBALS, mmengine_checkpoint_globals

from .atomic_backend import ATOMIC_BACKEND, AtomicLocalBackend, remove_interrupted_saves
from .cpu_distributed import (CPUDistributedDataParallel, prepare_cpu_distributed,
                              release_process_group)
from .hooks import WeightsOnlyCheckpointHook
from .sync_free import SyncFreeAccuracyHook, seg_accuracy_without_sync, sync_free_seg_accuracy

__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'CPUDistributedDataParallel',
           'MMENGINE_CHECKPOINT_GLOBALS', 'SyncFreeAccuracyHook', 'WeightsOnlyCheckpointHook',
           'mmengine_checkpoint_globals', 'prepare_cpu_distributed', 'release_process_group',
           'remove_interrupted_saves', 'seg_accuracy_without_sync', 'sync_free_seg_accuracy']
