"""Train any mmattn config (mmseg, mmpose or mmpretrain based) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The config's ``default_scope`` (set by the mmseg/mmpose/mmpretrain base it inherits) picks
the registries. Many GPUs or machines: tools/dist_train.sh (torchrun) or
tools/slurm_train.sh (srun).
"""
import argparse
import logging
import os
import os.path as osp
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.datasets import check_datasets
from mmattn.engine import ATOMIC_BACKEND, mmengine_checkpoint_globals, prepare_cpu_distributed
from mmattn.engine.cpu_distributed import revert_sync_bn_cfg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the latest checkpoint '
        'in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value (e.g. train_cfg.max_iters=10)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main() -> int:
    args = parse_args()
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)

    # work_dir: --work-dir > the config's > work_dirs/<config name>
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])

    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP is already enabled in the config.', logger='current',
                      level=logging.WARNING)
        else:
            assert optim_wrapper == 'OptimWrapper', (
                f'--amp needs an OptimWrapper config, got optim_wrapper.type={optim_wrapper!r}')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume

    # checkpoints are written atomically unless the config chose a storage backend
    checkpoint_hook = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint_hook is not None and not checkpoint_hook.get('backend_args'):
        checkpoint_hook.backend_args = dict(backend=ATOMIC_BACKEND)

    try:
        check_datasets(cfg)
    except FileNotFoundError as exc:
        print(f'tools/train.py: {exc}', file=sys.stderr)
        return 2

    if revert_sync_bn_cfg(cfg):
        print_log('No CUDA: training with BN where the config asks for SyncBN (same '
                  'parameters and checkpoint keys).', logger='current', level=logging.WARNING)
    prepare_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    with mmengine_checkpoint_globals():  # resume / load_from under torch's weights-only load
        runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
