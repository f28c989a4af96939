"""Parameters and MACs of a model and of every attention block in it.

    python tools/analysis/get_flops.py CONFIG_OR_MODEL [--shape H W] [--per-block] [--json f]

CONFIG_OR_MODEL: an OpenMMLab config (``configs/...py``, ``mmseg::...py``) or a timm model
name (``timm:volo_d1``). The default input is the config's training crop (seg), the codec's
input size (pose) or the model's default resolution (timm), batch 1.

Counts come from mmengine's jit-tracing ``FlopAnalyzer`` plus the handles of
``mmattn.analysis.costs`` (``aten::scaled_dot_product_attention``; broadcasting ``matmul``;
exact two-operand ``einsum``), so the matrix products inside attention are included.
One multiply-accumulate counts as one: the "MACs" printed are what fvcore/mmengine call
"flops" and what timm publishes as "GMACs"; floating point operations are 2 x MACs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from mmengine.config import DictAction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmattn.utils.cli import int_at_least
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', help='config file, or timm model name (timm:volo_d1)')
    parser.add_argument('--shape', type=int_at_least(1), nargs=2, metavar=('H', 'W'),
                        help='input size (default: see the module docstring)')
    parser.add_argument('--per-block', action='store_true',
                        help='list every attention block instance')
    parser.add_argument('--json', help='also write the numbers to this JSON file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides of the mm config, key=value')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from mmattn.analysis import format_count, load_model, model_costs
    from mmattn.utils.file_mode import write_atomic

    loaded = load_model(args.model, cfg_options=args.cfg_options)
    height, width = args.shape or loaded.input_size
    cost = model_costs(loaded.runner, (torch.zeros(1, 3, height, width),), root=loaded.model)
    # the wrapper adds the prefix "model." to the names
    strip = len('model.')
    lines = [
        f'model: {args.model}    input: 1x3x{height}x{width}',
        f'params: {cost.params:,} ({format_count(cost.params)})',
        f'MACs:   {cost.macs:,} ({format_count(cost.macs)}MACs; '
        f'{format_count(2 * cost.macs)}FLOPs = 2 x MACs)',
    ]
    by_type = cost.by_type()
    if by_type:
        lines += ['', '| attention block | count | params | MACs | % of model MACs |',
                  '|---|---:|---:|---:|---:|']
        for name, (count, params, macs) in by_type.items():
            lines.append(f'| {name} | {count} | {params:,} | {macs:,} | '
                         f'{100 * macs / max(cost.macs, 1):.2f} |')
    else:
        lines.append('no mmattn attention block in this model')
    if args.per_block and cost.blocks:
        lines += ['', '| block | type | params | MACs |', '|---|---|---:|---:|']
        lines += [f'| {b.name[strip:]} | {b.type} | {b.params:,} | {b.macs:,} |'
                  for b in cost.blocks]
    if cost.unsupported_ops:
        ops = ', '.join(f'{k.replace("aten::", "")} x{v}'
                        for k, v in sorted(cost.unsupported_ops.items()))
        lines += ['', f'not counted (element-wise, as in fvcore): {ops}']
    print('\n'.join(lines))
    result = {'model': args.model, 'input': [1, 3, height, width], 'params': cost.params,
              'macs': cost.macs,
              'blocks_by_type': {k: {'count': c, 'params': p, 'macs': m}
                                 for k, (c, p, m) in by_type.items()},
              'blocks': [{'name': b.name[strip:], 'type': b.type, 'params': b.params,
                          'macs': b.macs} for b in cost.blocks],
              'not_counted': cost.unsupported_ops}
    if args.json:  # written whole or not at all
        text = json.dumps(result, indent=1)
        write_atomic(args.json, lambda tmp: Path(tmp).write_text(text))
    return result


if __name__ == '__main__':
    from mmattn.utils.cli import run_tool
    run_tool(main, 'tools/analysis/get_flops.py')
