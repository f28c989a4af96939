"""One table of every attention block's cost at a given C and H x W, side by side.

    python tools/analysis/block_costs.py [--channels 64] [--size 64 64] [--device cpu]
                                         [--blocks CBAM ...] [--json f]

For every registered block (``mmattn.layers.attention_blocks()``), built with its defaults
from ``in_channels`` only, on one (1, C, H, W) input; blocks with an eager-reference switch
(``efficient=False``) get a second row for the reference. Columns:

* params;
* MACs (one multiply-accumulate counts as one, as fvcore / mmengine / timm count; the
  attention matrix products included, see ``mmattn.analysis.costs``);
* peak activations: the largest total size of the tensors alive at once during an
  inference forward (output included, input excluded), tracked op by op (independent of
  the device and of the allocator; scratch memory inside a fused kernel is not seen);
* saved for backward: what a training forward keeps for the backward pass (input and
  parameters excluded);
* on CUDA, the allocator's peak above the input in an inference forward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmattn.utils.cli import int_at_least, visible_device
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--channels', type=int_at_least(1), default=64, help='C')
    parser.add_argument('--size', type=int_at_least(1), nargs=2, default=(64, 64),
                        metavar=('H', 'W'))
    parser.add_argument('--blocks', nargs='+', help='only these blocks (registered names)')
    parser.add_argument('--device', type=visible_device, default='cpu')
    parser.add_argument('--json', help='also write the rows to this JSON file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from mmattn.analysis import block_variants, format_bytes, format_count, measure_block
    from mmattn.layers import attention_blocks
    from mmattn.utils.file_mode import write_atomic

    blocks = attention_blocks()
    names = args.blocks or sorted(blocks)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ValueError(f'--blocks: unknown block name(s) {unknown}; expected some of '
                         f'{sorted(blocks)}')
    c, (h, w) = args.channels, args.size
    torch.manual_seed(0)
    x = torch.randn(1, c, h, w, device=args.device)
    rows = []
    for name in names:
        for label, kwargs in block_variants(blocks[name]):
            module = blocks[name](c, **kwargs).to(args.device)
            rows.append({'block': name, 'variant': label, 'kwargs': kwargs,
                         **measure_block(module, x)})
    cuda = any('cuda_peak_bytes' in r for r in rows)
    head = '| block | variant | params | MACs | peak activations | saved for backward |'
    rule = '|---|---|---:|---:|---:|---:|'
    if cuda:
        head += ' CUDA peak |'
        rule += '---:|'
    lines = [f'C={c}, H x W={h}x{w}, batch 1, float32, {args.device}', '', head, rule]
    for r in rows:
        line = (f"| {r['block']} | {r['variant']} | {r['params']:,} | {format_count(r['macs'])} "
                f"| {format_bytes(r['peak_bytes'])} | {format_bytes(r['saved_bytes'])} |")
        if cuda:
            line += f" {format_bytes(r.get('cuda_peak_bytes', 0))} |"
        lines.append(line)
    print('\n'.join(lines))
    if args.json:
        text = json.dumps({'channels': c, 'size': [h, w], 'device': args.device, 'rows': rows},
                          indent=1)
        write_atomic(args.json, lambda tmp: Path(tmp).write_text(text))  # whole or not at all
    return rows


if __name__ == '__main__':
    from mmattn.utils.cli import run_tool
    run_tool(main, 'tools/analysis/block_costs.py')
