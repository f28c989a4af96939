"""Run a trained model on one image and write the host library's visualisation.

    python tools/infer.py CONFIG CHECKPOINT IMAGE [--out-dir DIR] [--device cpu]

The task follows the config's ``default_scope``: mmseg -> the segmentation overlay, mmpose ->
the keypoints (top-down: the whole image is the person box unless ``--bbox`` is given),
mmpretrain -> the top-k labels with their scores (printed, written over the image and into
``<image>_cls.json``). ``IMAGE`` may be ``demo`` for ``demo/demo.png``.
See docs/inference.md.
"""
from __future__ import annotations

import argparse
import sys

import torch
from mmengine.config import DictAction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmattn.utils.cli import int_at_least, number_between, visible_device
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='config file (mmseg, mmpose or mmpretrain based)')
    parser.add_argument('checkpoint', help='checkpoint file (e.g. work_dirs/<config>/iter_40.pth)')
    parser.add_argument('image', help="image file, or 'demo' for demo/demo.png")
    parser.add_argument('--out-dir', default='work_dirs/infer',
                        help='where the PNG (and the top-k JSON) go (default: %(default)s)')
    parser.add_argument('--device', type=visible_device,
                        default='cuda:0' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda, cuda:1, ... (default: %(default)s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of the config, key=value')
    parser.add_argument('--opacity', type=number_between(0, 1), default=0.5,
                        help='segmentation: opacity of the class colours (default: %(default)s)')
    parser.add_argument('--kpt-thr', type=number_between(0, float('inf')), default=0.3,
                        help='pose: keypoints scored below it are not drawn '
                             '(default: %(default)s)')
    parser.add_argument('--bbox', type=float, nargs=4, action='append',
                        metavar=('X1', 'Y1', 'X2', 'Y2'),
                        help='pose: a person box in pixels (repeat for several; default: '
                             'the whole image)')
    parser.add_argument('--topk', type=int_at_least(1), default=5,
                        help='classification: labels to report (default: %(default)s)')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mmattn.apis import inference
    try:
        result = inference(args.config, args.checkpoint, args.image, args.out_dir,
                           device=args.device, cfg_options=args.cfg_options,
                           opacity=args.opacity, kpt_thr=args.kpt_thr, bboxes=args.bbox,
                           topk=args.topk)
    except (FileNotFoundError, ValueError) as exc:
        print(f'tools/infer.py: {exc}', file=sys.stderr)
        return 2
    if result.task == 'pose' and not args.bbox:
        print('pose: no --bbox given, the whole image was used as the person box')
    if result.topk is not None:
        for rank, (label, score) in enumerate(result.topk, 1):
            print(f'top-{rank}: {label} ({score:.4f})')
    for kind, path in result.files.items():
        print(f'{kind}: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
