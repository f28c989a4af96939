"""Evaluate a checkpoint of any mmattn config (mmseg, mmpose or mmpretrain based) with
mmengine's Runner and the config's evaluator (mIoU, COCO AP, top-1, ...).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
                         [--launcher none|pytorch|slurm|mpi]
"""
import argparse
import os.path as osp
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)

from mmattn.engine import mmengine_checkpoint_globals
from mmattn.engine.run_config import add_common_args, build_runner, load_run_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_common_args(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        print(f'tools/test.py: checkpoint {args.checkpoint!r} does not exist', file=sys.stderr)
        return 2
    cfg = load_run_config(args)
    cfg.load_from = args.checkpoint
    try:
        runner = build_runner(cfg, phases=('test',))
    except FileNotFoundError as exc:
        print(f'tools/test.py: {exc}', file=sys.stderr)
        return 2
    with mmengine_checkpoint_globals():  # load_from under torch's weights-only load
        runner.test()
    return 0


if __name__ == '__main__':
    sys.exit(main())
