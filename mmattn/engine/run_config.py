"""What tools/train.py and tools/test.py share: the common arguments, the config as a run
needs it, and the Runner built from it."""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import re
from pathlib import Path

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.datasets import check_datasets

from .cpu_distributed import prepare_cpu_distributed, revert_sync_bn_cfg


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--work-dir``, ``--cfg-options``, ``--launcher`` and ``--local-rank``, as mmseg's and
    mmpose's tools take them."""
    parser.add_argument('--work-dir', help='the dir to save logs, metrics and models')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value (e.g. train_cfg.max_iters=10)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_run_config(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with the common arguments applied; ``work_dir`` is
    ``--work-dir``, else the config's, else ``work_dirs/<config name>``."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
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


def build_runner(cfg: Config, phases: tuple[str, ...]) -> Runner:
    """Check the datasets of ``phases`` (``FileNotFoundError`` with the layout if missing),
    adapt the config to a machine without CUDA, and build the Runner."""
    check_datasets(cfg, phases)
    if revert_sync_bn_cfg(cfg):
        print_log('No CUDA: running with BN where the config asks for SyncBN (same '
                  'parameters and checkpoint keys).', logger='current', level=logging.WARNING)
    prepare_cpu_distributed(cfg, cfg.launcher)
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
