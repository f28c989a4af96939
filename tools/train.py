"""Train any mmattn config (mmseg, mmpose or mmpretrain based) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The config's ``default_scope`` (set by the mmseg/mmpose/mmpretrain base it inherits) picks
the registries. Many GPUs or machines: tools/dist_train.sh (torchrun) or
tools/slurm_train.sh (srun).
"""
import argparse
import logging
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
from mmengine.logging import print_log

from mmattn.engine import ATOMIC_BACKEND, mmengine_checkpoint_globals
from mmattn.engine.run_config import (add_common_args, build_runner, latest_checkpoint,
                                      load_run_config)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from the given checkpoint; without a path, from the latest checkpoint '
        'in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    add_common_args(parser)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    cfg = load_run_config(args)

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

    if args.resume is not None:
        # 'auto': the latest complete checkpoint in the work dir; none there: start afresh
        cfg.load_from = latest_checkpoint(cfg.work_dir) if args.resume == 'auto' else args.resume
        cfg.resume = cfg.load_from is not None

    # checkpoints are written atomically unless the config chose a storage backend
    checkpoint_hook = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint_hook is not None and not checkpoint_hook.get('backend_args'):
        checkpoint_hook.backend_args = dict(backend=ATOMIC_BACKEND)

    try:
        runner = build_runner(cfg, phases=('train', 'val'))
    except FileNotFoundError as exc:
        print(f'tools/train.py: {exc}', file=sys.stderr)
        return 2
    with mmengine_checkpoint_globals():  # resume / load_from under torch's weights-only load
        runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
