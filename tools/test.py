"""Evaluate a checkpoint of any mmattn config (mmseg, mmpose or mmpretrain based) with
mmengine's Runner and the config's evaluator (mIoU, COCO AP, top-1, ...).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out OUT]
                         [--dump FILE.pkl] [--cfg-options k=v ...]
                         [--launcher none|pytorch|slurm|mpi]

``--show-dir``, ``--out`` and ``--dump`` do what the host library's own tools/test.py does with
them (mmseg 1.2.2, mmpose 1.3.2, mmpretrain 1.2.0); a flag the library's tool does not have is
refused with the one to use instead.
"""
from __future__ import annotations

import argparse
import os.path as osp
import sys

import mmattn  # noqa: F401  (registers blocks, models and the mmattn:: config scope)
from mmengine.config import Config

from mmattn.engine import mmengine_checkpoint_globals, release_process_group
from mmattn.engine.run_config import (USER_ERRORS, RunConfigError, add_common_args,
                                      build_runner, is_local_path, load_run_config)
from mmattn.utils.checkpoint import check_checkpoint_file
from mmattn.utils.quiet import filter_tool_warnings, quiet_runner_logger

EXAMPLES = """what --show-dir, --out and --dump do, by the config's library (default_scope):
  mmseg       --show-dir DIR   painted predictions in DIR/vis_data/vis_image/
              --out DIR        the predicted label maps as PNG files in DIR (IoUMetric output_dir)
  mmpose      --show-dir DIR   painted keypoints in DIR
              --out FILE       the metrics (COCO AP, ...) as FILE (.json, .yaml or .pkl)
              --dump FILE.pkl  the predictions, pickled (mmengine's DumpResults)
  mmpretrain  --show-dir DIR   painted predictions in DIR
              --out FILE.pkl   the predictions, pickled (DumpResults); with --out-item metrics:
                               the metrics as FILE (.json, .yaml or .pkl)

examples:
  python tools/test.py configs/demo/psa_hrnet_ocr_cityscapes_demo.py \\
      work_dirs/psa_hrnet_ocr_cityscapes_demo/iter_40.pth --show-dir vis --out preds
  python tools/test.py configs/psa_udp_hrnet_w48_coco_256x192.py CKPT --dump preds.pkl
  tools/dist_test.sh CONFIG CKPT 4                        # 4 GPUs (torchrun)
"""

FAMILIES = ('mmseg', 'mmpose', 'mmpretrain')
METRIC_FORMATS = ('.json', '.yaml', '.yml', '.pkl', '.pickle')
PICKLE = ('.pkl', '.pickle')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Evaluate a checkpoint on the test set of an mmattn config (mmseg, mmpose\n'
        "or mmpretrain based) with the config's metrics; optionally save images with the\n"
        'predictions painted on them, and the predictions themselves.',
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='the config file, e.g. configs/psa_hrnet_ocr_cityscapes.py')
    parser.add_argument(
        'checkpoint', help='the checkpoint to evaluate (a file written by tools/train.py, '
        'e.g. work_dirs/<config name>/iter_N.pth, or a URL)')
    parser.add_argument(
        '--show-dir', metavar='DIR',
        help='save images with the predictions painted on them (see below for where)')
    parser.add_argument(
        '--interval', type=int, default=1, metavar='N',
        help='with --show-dir: paint every N-th test sample (default 1: all)')
    parser.add_argument(
        '--out', metavar='OUT',
        help='mmseg: directory for the predicted label maps (PNG); mmpose: file for the '
        'metrics; mmpretrain: pickle file for the predictions (see below)')
    parser.add_argument(
        '--out-item', choices=['pred', 'metrics'],
        help="mmpretrain only: what --out saves (default 'pred')")
    parser.add_argument(
        '--dump', metavar='FILE.pkl',
        help='mmpose only: pickle the predictions for offline evaluation')
    add_common_args(parser)
    return parser.parse_args(argv)


def family(cfg: Config) -> str | None:
    """The host library of the config (its ``default_scope``), if one of :data:`FAMILIES`."""
    scope = cfg.get('default_scope')
    return scope if scope in FAMILIES else None


def _refuse(flag: str, lib: str | None, instead: str) -> RunConfigError:
    return RunConfigError(f'{flag} does not apply to this config (default_scope={lib!r}): '
                          f'{instead}')


def _visualization_hook(cfg: Config, hook_type: str) -> dict:
    hooks = cfg.get('default_hooks', {})
    if 'visualization' not in hooks:
        raise RunConfigError(
            f"--show-dir needs a visualization hook in the config's default_hooks; add "
            f"default_hooks = dict(visualization=dict(type='{hook_type}'))")
    return hooks['visualization']


def apply_output_args(cfg: Config, args: argparse.Namespace) -> None:
    """Translate ``--show-dir``, ``--interval``, ``--out``, ``--out-item`` and ``--dump`` into
    the config as the config's library's tools/test.py does.

    Raises:
        RunConfigError: a flag that does not apply to the config's library, or a file name
            the library's tool would refuse.
    """
    lib = family(cfg)
    asked = [flag for flag, value in (('--show-dir', args.show_dir), ('--out', args.out),
                                      ('--dump', args.dump)) if value is not None]
    if asked and lib is None:
        raise RunConfigError(f'{", ".join(asked)} need a config of mmseg, mmpose or '
                             f'mmpretrain (default_scope); this one has '
                             f'default_scope={cfg.get("default_scope")!r}')
    if args.interval < 1:
        raise RunConfigError(f'--interval must be >= 1, got {args.interval}')
    if args.out_item is not None:
        if lib != 'mmpretrain':
            raise _refuse('--out-item', lib, 'it selects what --out saves for mmpretrain '
                          'configs only')
        if args.out is None:
            raise RunConfigError('--out-item needs --out FILE (where to save it)')
    if args.dump is not None:
        if lib == 'mmseg':
            raise _refuse('--dump', lib, 'use --out DIR to save the predicted label maps')
        if lib == 'mmpretrain':
            raise _refuse('--dump', lib, 'use --out FILE.pkl to pickle the predictions')
        if not args.dump.endswith(PICKLE):
            raise RunConfigError(f'--dump must name a .pkl file, got {args.dump!r}')
        dump = dict(type='DumpResults', out_file_path=args.dump)
        evaluator = cfg.test_evaluator
        cfg.test_evaluator = ([*evaluator, dump] if isinstance(evaluator, (list, tuple))
                              else [evaluator, dump])
    if args.out is not None:
        if lib == 'mmseg':
            evaluators = cfg.test_evaluator
            if isinstance(evaluators, (list, tuple)):
                raise RunConfigError('--out sets output_dir of the test evaluator, and this '
                                     'config has several; set output_dir on the IoUMetric in '
                                     'the config instead')
            cfg.test_evaluator['output_dir'] = args.out
        elif lib == 'mmpose' or args.out_item == 'metrics':
            if not args.out.endswith(METRIC_FORMATS):
                raise RunConfigError(f'--out must name a .json, .yaml or .pkl file for the '
                                     f'metrics, got {args.out!r}')
        elif not args.out.endswith(PICKLE):  # mmpretrain predictions
            raise RunConfigError(f'--out must name a .pkl file for the predictions, got '
                                 f'{args.out!r} (or add --out-item metrics)')
    if args.show_dir is not None:
        if lib == 'mmseg':
            hook = _visualization_hook(cfg, 'SegVisualizationHook')
            hook['draw'] = True
            hook['interval'] = args.interval
            cfg.visualizer['save_dir'] = args.show_dir
        else:
            hook = _visualization_hook(
                cfg, 'PoseVisualizationHook' if lib == 'mmpose' else 'VisualizationHook')
            hook['enable'] = True
            hook['interval'] = args.interval
            # mmpose's hook puts a relative out_dir under work_dir/<timestamp>/
            hook['out_dir'] = osp.abspath(args.show_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    filter_tool_warnings()
    try:
        if is_local_path(args.checkpoint):
            check_checkpoint_file(args.checkpoint, 'CHECKPOINT')
        cfg = load_run_config(args)
        cfg.load_from = args.checkpoint
        apply_output_args(cfg, args)
        runner = build_runner(cfg, phases=('test', ))
    except USER_ERRORS as exc:
        print(f'tools/test.py: {exc}', file=sys.stderr)
        return 2
    quiet_runner_logger(runner.logger)
    lib = family(cfg)
    if args.out is not None and lib == 'mmpretrain' and args.out_item != 'metrics':
        from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    # checkpoints written before WeightsOnlyCheckpointHook hold mmengine's own objects
    with mmengine_checkpoint_globals():
        metrics = runner.test()
    if args.out is not None and (lib == 'mmpose' or args.out_item == 'metrics'):
        import mmengine
        from mmengine.dist import is_main_process
        if is_main_process():
            mmengine.dump(metrics, args.out)
            runner.logger.info(f'metrics written to {args.out}')
    del runner  # what holds the process group, through its reference cycles
    release_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
