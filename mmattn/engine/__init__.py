"""Small additions to mmengine's engine that our tools use: an atomic local file backend for
checkpoints, weights-only loading of mmengine checkpoints, and CPU (gloo) support for
mmengine's ``pytorch`` launcher."""
from .atomic_backend import ATOMIC_BACKEND, AtomicLocalBackend
from .checkpoint_globals import MMENGINE_CHECKPOINT_GLOBALS, mmengine_checkpoint_globals
from .cpu_distributed import CPUDistributedDataParallel, prepare_cpu_distributed

__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'CPUDistributedDataParallel',
           'MMENGINE_CHECKPOINT_GLOBALS', 'mmengine_checkpoint_globals',
           'prepare_cpu_distributed']
