"""Train any mmattn config (mmseg, mmpose or mmpretrain based) with mmengine's Runner.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                          [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The config's ``default_scope`` (set by the mmseg/mmpose/mmpretrain base it inherits) picks
the registries. Many GPUs or machines: tools/dist_train.sh (torchrun) or
tools/slurm_train.sh (srun). Checkpoints are written atomically, hold only what
``torch.load(..., weights_only=True)`` reads (``mmattn.engine.WeightsOnlyCheckpointHook``),
and what an interrupted save left in the work dir is removed when the next run starts.
"""
import argparse
import logging
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
from mmengine.logging import print_log

from mmattn.engine import mmengine_checkpoint_globals, release_process_group
from mmattn.engine.run_config import (USER_ERRORS, RunConfigError, add_common_args,
                                      build_runner, check_amp, clean_interrupted_saves,
                                      is_local_path, load_run_config, resolve_resume,
                                      set_atomic_checkpoints)
from mmattn.utils.checkpoint import check_checkpoint_file
from mmattn.utils.quiet import filter_tool_warnings, quiet_runner_logger

EXAMPLES = """examples:
  python tools/make_demo_data.py
  python tools/train.py configs/demo/psa_hrnet_ocr_cityscapes_demo.py      # CPU, minutes
  python tools/train.py configs/psa_hrnet_ocr_cityscapes.py --work-dir work_dirs/psa --amp
  python tools/train.py CONFIG --resume                  # continue from the latest checkpoint
  python tools/train.py CONFIG --resume work_dirs/x/iter_8000.pth
  python tools/train.py CONFIG --cfg-options train_cfg.max_iters=1000 train_dataloader.batch_size=4
  tools/dist_train.sh CONFIG 4                            # 4 GPUs (torchrun)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train the model of an mmattn config (mmseg, mmpose or mmpretrain based).\n'
        'Logs, metrics and checkpoints go to the work dir.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the config file, e.g. configs/psa_hrnet_ocr_cityscapes.py')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto', metavar='CKPT',
        help='continue a run (weights, optimizer, schedule, iteration) from CKPT; without '
        'CKPT, from the latest checkpoint in the work dir, or from scratch when there is none')
    parser.add_argument(
        '--amp', action='store_true',
        help='automatic mixed precision (AmpOptimWrapper, dynamic loss scale; needs a GPU)')
    add_common_args(parser)
    return parser.parse_args()


def prepare(args: argparse.Namespace) -> tuple:
    """The config, ready to build, and the lines to log once the run's logger exists."""
    cfg = load_run_config(args)
    check_amp(cfg, args.amp)
    if args.amp:
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log('AMP is already enabled in the config.', logger='current',
                      level=logging.WARNING)
        elif optim_wrapper == 'OptimWrapper':
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            raise RunConfigError(f'--amp turns optim_wrapper.type=OptimWrapper into '
                                 f'AmpOptimWrapper; this config has '
                                 f'optim_wrapper.type={optim_wrapper!r}: set its AMP options '
                                 'in the config instead of passing --amp')

    notes = []
    if args.resume is not None:
        checkpoint, note = resolve_resume(args.resume, cfg.work_dir)
        notes.append(note)
        cfg.load_from = checkpoint
        cfg.resume = checkpoint is not None
    elif cfg.get('load_from') and is_local_path(cfg.load_from):
        check_checkpoint_file(cfg.load_from, "the config's load_from")

    set_atomic_checkpoints(cfg)
    for path in clean_interrupted_saves(cfg):
        notes.append(f'removed {path}, left by a checkpoint save that was interrupted')
    return cfg, notes


def main() -> int:
    args = parse_args()
    filter_tool_warnings()
    try:
        cfg, notes = prepare(args)
        runner = build_runner(cfg, phases=('train', 'val'))
    except USER_ERRORS as exc:
        print(f'tools/train.py: {exc}', file=sys.stderr)
        return 2
    quiet_runner_logger(runner.logger)
    for note in notes:
        runner.logger.info(note)
    # checkpoints written before WeightsOnlyCheckpointHook hold mmengine's own objects
    with mmengine_checkpoint_globals():
        runner.train()
    del runner  # what holds the process group, through its reference cycles
    release_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
