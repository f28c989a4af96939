"""Draw what the attention blocks of a model attend to, over an image.

    python tools/visualize_attention.py CONFIG_OR_MODEL IMAGE --out out.png

CONFIG_OR_MODEL is an OpenMMLab config (``configs/psa_hrnet_ocr_cityscapes.py``,
``mmseg::...``) or a timm model name (``timm:volo_d1`` / ``volo_d1``). Weights: ``--checkpoint``
if given; else, for a config, the latest checkpoint of its work dir (``work_dirs/<config
name>``, as tools/train.py writes it: the ``last_checkpoint`` pointer, else the highest
``iter_N``/``epoch_N``); else random, which the log and the figure titles say.
Writes ``out.png`` (the first block of every type) and ``out_<BlockType>.png`` per block
type (up to ``--max-blocks`` blocks spread over the depth). Heat maps use a sequential
colormap with a colour bar in the data's units, one scale per quantity (shared by the rows);
a near-constant map is drawn as its constant. ``IMAGE`` may be ``demo`` for the shipped
``demo/demo.png``. See docs/inference.md.
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import sys

import numpy as np
from mmengine.config import DictAction
from PIL import Image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmattn.utils.cli import int_at_least, visible_device
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='config file, or timm model name (timm:volo_d1)')
    parser.add_argument('image', help="image file, or 'demo' for demo/demo.png")
    parser.add_argument('--out', default='attention.png', help='overview PNG path')
    parser.add_argument('--checkpoint',
                        help="checkpoint file to load (default: the latest in the config's "
                             'work dir, if any)')
    parser.add_argument('--random-weights', action='store_true',
                        help='do not look for a checkpoint in the work dir')
    parser.add_argument('--work-dir',
                        help="where to look for a checkpoint (default: the config's work_dir, "
                             'else work_dirs/<config name>)')
    parser.add_argument('--size', type=int_at_least(1), nargs=2, metavar=('H', 'W'),
                        help="input size (default: the config's crop / the model's size)")
    parser.add_argument('--pixel', type=float, nargs=2, metavar=('Y', 'X'),
                        help='query pixel, in pixels of the resized input (default: centre)')
    parser.add_argument('--max-blocks', type=int_at_least(1), default=4,
                        help='rows per block type (blocks spread over the depth)')
    parser.add_argument('--panel-px', type=int_at_least(1), default=256,
                        help='size of one panel')
    parser.add_argument('--device', type=visible_device, default='cpu',
                        help='cpu, cuda, cuda:1, ... (default: %(default)s)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of the mm config, key=value')
    return parser.parse_args(argv)


def query_of(pixel: tuple[float, float] | None, height: int, width: int
             ) -> tuple[float, float]:
    """The relative (y, x) query of ``--pixel`` on a ``height`` x ``width`` input (its
    centre without one); a pixel outside the input ends the tool with a one-line error."""
    if pixel is None:
        return 0.5, 0.5
    y, x = pixel
    if not (0 <= y < height and 0 <= x < width):
        sys.exit(f'tools/visualize_attention.py: --pixel must lie inside the {height}x{width} '
                 f'input (0 <= Y < {height}, 0 <= X < {width}), got Y={y:g}, X={x:g}')
    return y / height, x / width


def find_checkpoint(model: str, work_dir: str | None = None
                    ) -> tuple[str | None, str | None]:
    """``(checkpoint, where it was looked for)``: the latest checkpoint of the work dir of
    config ``model`` (``work_dir``, else the config's ``work_dir``, else
    ``work_dirs/<config name>``), as ``tools/train.py --resume`` picks it;
    ``(None, work dir)`` when there is none, ``(None, None)`` when ``model`` is not a config
    file and no ``work_dir`` is given."""
    from mmattn.engine.run_config import latest_checkpoint
    if work_dir is None:
        if not model.endswith('.py') or not osp.isfile(model):
            return None, None
        from mmengine.config import Config
        work_dir = Config.fromfile(model).get('work_dir') or osp.join(
            'work_dirs', osp.splitext(osp.basename(model))[0])
    found = latest_checkpoint(work_dir) if osp.isdir(work_dir) else None
    return found, work_dir


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    from mmengine.logging import print_log

    import mmattn  # noqa: F401  (the mmattn:: config scope)
    from mmattn.analysis import load_model
    from mmattn.visualization import DEMO_IMAGE, visualize_attention

    if args.size:  # the pixel can be checked before the model is built
        query_of(args.pixel, *args.size)
    checkpoint = args.checkpoint
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'--checkpoint: no such file {checkpoint!r}')
        note = f'weights: {osp.basename(checkpoint)}'
    elif not args.random_weights:
        checkpoint, where = find_checkpoint(args.model, args.work_dir)
        if checkpoint is not None:
            print_log(f'visualize_attention: no --checkpoint given; using the latest '
                      f'checkpoint in {where}: {checkpoint}', logger='current')
            note = f'weights: {osp.basename(checkpoint)}'
        else:
            place = f' and no checkpoint in {where}' if where else ''
            print_log(f'visualize_attention: no --checkpoint given{place}: the weights are '
                      f'RANDOM (an untrained network; train it with tools/train.py or pass '
                      f'--checkpoint)', logger='current', level=logging.WARNING)
            note = 'random weights'
    else:
        note = 'random weights'
    loaded = load_model(args.model, checkpoint=checkpoint, cfg_options=args.cfg_options,
                        device=args.device)
    path = args.image
    if path == 'demo':
        path = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), DEMO_IMAGE)
    height, width = args.size or loaded.input_size
    rgb = np.asarray(Image.open(path).convert('RGB').resize((width, height), Image.BILINEAR))
    inputs = loaded.preprocess(rgb).to(args.device)
    written = visualize_attention(loaded.runner, loaded.model, rgb, inputs, args.out,
                                  query=query_of(args.pixel, height, width),
                                  max_rows=args.max_blocks,
                                  panel_px=args.panel_px, note=note)
    for key, value in written.items():
        print(f'{key}: {value}')
    return written


if __name__ == '__main__':
    from mmattn.utils.cli import run_tool
    run_tool(main, 'tools/visualize_attention.py')
