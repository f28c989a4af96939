"""Write the embedded demo data (tiny generated Cityscapes, COCO-keypoints and ImageNet-style
datasets in their real on-disk formats) that the configs in configs/demo/ train on.

    python tools/make_demo_data.py [--out data/demo] [--seed 0] [--force]

Deterministic, idempotent (a complete copy is left alone) and atomic (written into a
temporary directory that is renamed into place).
"""
import argparse
import sys
import time

from mmattn.datasets import DEMO_ROOT, make_demo_data
from mmattn.utils.cli import int_at_least


def main() -> int:
    parser = argparse.ArgumentParser(description='Write the embedded demo data.')
    parser.add_argument('--out', default=DEMO_ROOT, help=f'target directory (default {DEMO_ROOT})')
    parser.add_argument('--seed', type=int_at_least(0), default=0, help='random seed (default 0)')
    parser.add_argument('--force', action='store_true',
                        help='replace --out even if it was not written by this tool')
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        written = make_demo_data(args.out, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f'make_demo_data: {exc}', file=sys.stderr)
        return 2
    verb = 'wrote' if written else 'already up to date:'
    print(f'{verb} {args.out} ({time.perf_counter() - start:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
