"""Evaluate a checkpoint of any mmattn config (mmseg, mmpose or mmpretrain based) with
mmengine's Runner and the config's evaluator (mIoU, COCO AP, top-1, ...).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
                         [--launcher none|pytorch|slurm|mpi]
"""
import argparse
import os
import os.path as osp
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmattn.datasets import check_datasets
from mmattn.engine import mmengine_checkpoint_globals, prepare_cpu_distributed
from mmattn.engine.cpu_distributed import revert_sync_bn_cfg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save logs and metrics')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def main() -> int:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        print(f'tools/test.py: checkpoint {args.checkpoint!r} does not exist', file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint

    try:
        check_datasets(cfg, phases=('test',))
    except FileNotFoundError as exc:
        print(f'tools/test.py: {exc}', file=sys.stderr)
        return 2
    revert_sync_bn_cfg(cfg)
    prepare_cpu_distributed(cfg, args.launcher)

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    with mmengine_checkpoint_globals():  # resume / load_from under torch's weights-only load
        runner.test()
    return 0


if __name__ == '__main__':
    sys.exit(main())
