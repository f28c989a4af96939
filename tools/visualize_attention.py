"""Draw what the attention blocks of a model attend to, over an image.

    python tools/visualize_attention.py CONFIG_OR_MODEL IMAGE --out out.png

CONFIG_OR_MODEL is an OpenMMLab config (``configs/psa_hrnet_ocr_cityscapes.py``,
``mmseg::...``) or a timm model name (``timm:volo_d1`` / ``volo_d1``). Random weights unless
``--checkpoint`` is given. Writes ``out.png`` (the first block of every type) and
``out_<BlockType>.png`` per block type (up to ``--max-blocks`` blocks spread over the depth).
``IMAGE`` may be ``demo`` for the shipped ``demo/demo.png``.
"""
from __future__ import annotations

import argparse
import os.path as osp

import numpy as np
from mmengine.config import DictAction
from PIL import Image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='config file, or timm model name (timm:volo_d1)')
    parser.add_argument('image', help="image file, or 'demo' for demo/demo.png")
    parser.add_argument('--out', default='attention.png', help='overview PNG path')
    parser.add_argument('--checkpoint', help='checkpoint file to load')
    parser.add_argument('--size', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the config's crop / the model's size)")
    parser.add_argument('--pixel', type=float, nargs=2, metavar=('Y', 'X'),
                        help='query pixel, in pixels of the resized input (default: centre)')
    parser.add_argument('--max-blocks', type=int, default=4,
                        help='rows per block type (blocks spread over the depth)')
    parser.add_argument('--panel-px', type=int, default=256, help='size of one panel')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of the mm config, key=value')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    from mmattn.analysis import load_model
    from mmattn.visualization import DEMO_IMAGE, visualize_attention

    loaded = load_model(args.model, checkpoint=args.checkpoint, cfg_options=args.cfg_options,
                        device=args.device)
    path = args.image
    if path == 'demo':
        path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), DEMO_IMAGE)
    height, width = args.size or loaded.input_size
    rgb = np.asarray(Image.open(path).convert('RGB').resize((width, height), Image.BILINEAR))
    inputs = loaded.preprocess(rgb).to(args.device)
    query = (0.5, 0.5)
    if args.pixel is not None:
        y, x = args.pixel
        if not (0 <= y < height and 0 <= x < width):
            raise ValueError(f'--pixel must lie inside the {height}x{width} input, got '
                             f'({y}, {x})')
        query = (y / height, x / width)
    written = visualize_attention(loaded.runner, loaded.model, rgb, inputs, args.out,
                                  query=query, max_rows=args.max_blocks,
                                  panel_px=args.panel_px)
    for key, value in written.items():
        print(f'{key}: {value}')
    return written


if __name__ == '__main__':
    main()
