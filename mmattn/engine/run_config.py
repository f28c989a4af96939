"""What tools/train.py and tools/test.py share: the common arguments, the config as a run
needs it, the checks that turn bad input into one message before anything is built, and
the Runner built from it."""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import re
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import MODELS, RUNNERS
from mmengine.runner import Runner

from mmattn.datasets import check_datasets
from mmattn.utils.checkpoint import CheckpointFileError, check_checkpoint_file
from mmattn.utils.registry_names import UnknownTypeError, check_plugin_types

from .atomic_backend import ATOMIC_BACKEND, remove_interrupted_saves
from .cpu_distributed import prepare_cpu_distributed, revert_sync_bn_cfg

WEIGHTS_ONLY_HOOK = 'mmattn.WeightsOnlyCheckpointHook'


class RunConfigError(ValueError):
    """A command line or config that cannot run; the message says why and what to do."""


#: the errors a tool reports as one message (exit code 2) instead of a traceback
USER_ERRORS = (FileNotFoundError, CheckpointFileError, UnknownTypeError, RunConfigError)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``, as mmseg's and
    mmpose's tools take them."""
    parser.add_argument(
        '--work-dir', metavar='DIR',
        help='directory for logs and metrics, and checkpoints when training (default: the '
        "config's work_dir, else work_dirs/<config name>)")
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
        help='override config keys, e.g. train_cfg.max_iters=10 '
        'train_dataloader.batch_size=4 (lists: key="[a,b]")')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
        help='how the processes were started: none (one process), pytorch (torchrun, '
        'tools/dist_*.sh), slurm (srun, tools/slurm_*.sh), mpi')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help=argparse.SUPPRESS)


#: launcher -> (the variables mmengine's init_dist reads, what sets them)
LAUNCHER_ENVIRONMENT = {
    'pytorch': (('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'),
                'torchrun (tools/dist_train.sh, tools/dist_test.sh)'),
    'slurm': (('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'),
              'srun (tools/slurm_train.sh, tools/slurm_test.sh)'),
    'mpi': (('OMPI_COMM_WORLD_LOCAL_RANK', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE',
             'MASTER_ADDR'), "Open MPI's mpirun (with MASTER_ADDR exported)"),
}


def check_launcher_environment(launcher: str) -> None:
    """RunConfigError where ``--launcher`` names a launcher whose variables this process lacks
    (started by hand, not by the launcher): mmengine failed with a bare ``KeyError:
    'SLURM_PROCID'`` or torch's env:// rendezvous error."""
    if launcher not in LAUNCHER_ENVIRONMENT:
        return
    names, starter = LAUNCHER_ENVIRONMENT[launcher]
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise RunConfigError(
            f'--launcher {launcher} runs in processes that {starter} starts, with '
            f'{", ".join(names)} set; this process lacks {", ".join(missing)}: start it that '
            f'way, or leave out --launcher for one process')


def check_work_dir(cfg: Config, flag: bool) -> None:
    """RunConfigError where the work dir is an existing file (``os.makedirs`` failed with
    ``FileExistsError`` after the model was built)."""
    if osp.exists(cfg.work_dir) and not osp.isdir(cfg.work_dir):
        where = '--work-dir' if flag else "the config's work_dir"
        raise RunConfigError(f'{where} {cfg.work_dir!r} is a file, not a directory: give a '
                             f'directory (logs, metrics and checkpoints go there)')


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the common arguments applied; ``work_dir`` is
    ``--work-dir``, else the config's, else ``work_dirs/<config name>``.

    Raises:
        RunConfigError: ``--launcher`` without its environment, or a work dir that is a
            file.
    """
    check_launcher_environment(args.launcher)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    check_work_dir(cfg, args.work_dir is not None)
    return cfg


def latest_checkpoint(work_dir: str) -> str | None:
    """The checkpoint ``--resume`` without a path continues from.

    mmengine reads the ``last_checkpoint`` pointer, which its CheckpointHook rewrites in place
    after each save (``open(..., 'w')``): a run killed inside that write leaves it empty, and
    mmengine would then try to load ``''``. Here a pointer naming an existing file wins;
    otherwise the highest-numbered ``iter_N.pth`` / ``epoch_N.pth`` in ``work_dir`` (complete
    ones: tools/train.py writes checkpoints atomically); None when there is none.
    """
    pointer = Path(work_dir) / 'last_checkpoint'
    if pointer.is_file():
        named = pointer.read_text().strip()
        if named and osp.isfile(named):
            return named
    numbered = []
    for path in Path(work_dir).glob('*.pth'):
        match = re.fullmatch(r'(?:iter|epoch)_(\d+)\.pth', path.name)
        if match:
            numbered.append((int(match.group(1)), str(path)))
    return max(numbered)[1] if numbered else None


def is_local_path(path: str) -> bool:
    """Whether mmengine loads ``path`` from the local disk (not ``https://``, ``s3://``,
    ``open-mmlab://``, ``torchvision://`` ...)."""
    return '://' not in str(path)


def resolve_resume(resume: str | None, work_dir: str) -> tuple[str | None, str | None]:
    """The checkpoint ``--resume`` continues from, and a line for the log.

    Args:
        resume: None (no ``--resume``), ``'auto'`` (``--resume`` without a path: the latest
            checkpoint in ``work_dir``) or a path.
        work_dir: the run's work dir.

    Returns:
        ``(checkpoint or None, message or None)``; ``--resume`` with nothing to resume gives
        ``(None, 'starting from scratch ...')``.

    Raises:
        CheckpointFileError: the checkpoint is missing, truncated or not a checkpoint.
    """
    if resume is None:
        return None, None
    if resume == 'auto':
        found = latest_checkpoint(work_dir)
        if found is None:
            return None, (f'--resume: no checkpoint in {work_dir} to resume from; starting '
                          'from scratch')
        check_checkpoint_file(found, '--resume (the latest checkpoint of the work dir)')
        return found, f'--resume: resuming from {found}, the latest checkpoint in {work_dir}'
    if is_local_path(resume):
        check_checkpoint_file(resume, '--resume')
    return resume, f'--resume: resuming from {resume}'


def set_atomic_checkpoints(cfg: Config) -> None:
    """Write checkpoints atomically unless the config chose a storage backend."""
    checkpoint_hook = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint_hook is not None and not checkpoint_hook.get('backend_args'):
        checkpoint_hook.backend_args = dict(backend=ATOMIC_BACKEND)


def checkpoint_dirs(cfg: Config) -> list[str]:
    """The local directories the run's CheckpointHook saves into: the work dir, and
    ``out_dir/<work dir name>`` when ``default_hooks.checkpoint.out_dir`` is set (mmengine's
    rule)."""
    work_dir = osp.abspath(cfg.work_dir)
    dirs = [work_dir]
    out_dir = cfg.get('default_hooks', {}).get('checkpoint', {}).get('out_dir')
    if out_dir and is_local_path(out_dir):
        dirs.append(osp.join(osp.abspath(out_dir), osp.basename(work_dir.rstrip(osp.sep))))
    return dirs


def clean_interrupted_saves(cfg: Config) -> list[str]:
    """Remove what interrupted checkpoint saves left in the run's checkpoint directories
    (:func:`mmattn.engine.remove_interrupted_saves`); returns the removed paths."""
    removed: list[str] = []
    for directory in checkpoint_dirs(cfg):
        removed += remove_interrupted_saves(directory)
    return removed


def check_amp(cfg: Config, amp_flag: bool) -> None:
    """mmengine's ``AmpOptimWrapper`` asserts a GPU (CUDA, NPU, MLU or MUSA) deep inside the
    build; say so before anything is built.

    Raises:
        RunConfigError: AMP is asked for (``--amp`` or the config) and there is no GPU.
    """
    from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                                 is_npu_available)
    wrapper = cfg.get('optim_wrapper', {}).get('type', 'OptimWrapper')
    if not (amp_flag or wrapper == 'AmpOptimWrapper'):
        return
    if (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available()):
        return
    if amp_flag:
        raise RunConfigError('--amp needs a GPU (mixed precision runs on CUDA, NPU, MLU or '
                             'MUSA devices) and none is available; run without --amp to '
                             'train in float32 on the CPU')
    raise RunConfigError("the config's optim_wrapper.type='AmpOptimWrapper' (mixed precision) "
                         'needs a GPU and none is available; train in float32 on the CPU '
                         'with --cfg-options optim_wrapper.type=OptimWrapper')


def add_weights_only_hook(cfg: Config) -> None:
    """Add :class:`mmattn.engine.WeightsOnlyCheckpointHook` to ``custom_hooks`` (once)."""
    hooks = list(cfg.get('custom_hooks', None) or [])
    names = {WEIGHTS_ONLY_HOOK, WEIGHTS_ONLY_HOOK.split('.', 1)[1]}
    if not any(isinstance(h, dict) and h.get('type') in names for h in hooks):
        hooks.append(dict(type=WEIGHTS_ONLY_HOOK))
    cfg.custom_hooks = hooks


def check_model_names(cfg: Config) -> None:
    """Check the ``type`` of every ``plugins`` entry of ``cfg.model`` in the registry of the
    config's scope (:func:`mmattn.utils.registry_names.check_plugin_types`)."""
    with MODELS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
        check_plugin_types(cfg.get('model', {}), registry, owner='model')


def build_runner(cfg: Config, phases: tuple[str, ...]) -> Runner:
    """Check the model's plugin names and the datasets of ``phases`` (``FileNotFoundError``
    with the layout if missing), add the weights-only checkpoint hook, adapt the config to a
    machine without CUDA, and build the Runner."""
    check_model_names(cfg)
    check_datasets(cfg, phases)
    add_weights_only_hook(cfg)
    if revert_sync_bn_cfg(cfg):
        print_log('No CUDA: running with BN where the config asks for SyncBN (same '
                  'parameters and checkpoint keys).', logger='current', level=logging.WARNING)
    prepare_cpu_distributed(cfg, cfg.launcher)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
