"""Run every compiled CUDA kernel once, forward and backward, on small awkward shapes: the
program that ``compute-sanitizer`` checks (``tools/gpu_check.sh`` runs it under ``--tool
memcheck`` and ``--tool racecheck``)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/sanitize_kernels.py

PSA (``backend='cuda'``: the whole block per call, the paper's two forms and the release's
``PSA_p`` and ``PSA_s``): float32 and bfloat16, NCHW and channels_last, on [2, 64, 17, 13],
[3, 96, 33, 40] and [1, 8, 1, 1] (odd sizes, a single pixel); NCHW [3, 96, 33, 40] on the
register tiles and (``MMATTN_PSA_REGISTER_TILES=0``) on the shared-memory tiles; ``PSA_s``'s
value kernels (``psa_value_tiles.cuh``: bfloat16, H*W a multiple of 8) on [3, 96, 33, 40]
(the backward's M = dVl x^T over runs of the pixels and their sum: 6 runs on an H100), its
GEMM path on the others. Outlook
attention (``backend='cuda'``): K=3 with stride 1 and 2, float32 and bfloat16, bfloat16's
gathers on the scalar kernel and (``MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1``) the tensor-core
one. The column sums
of the parameters' gradients (``mmattn::bias_grad``, ``mmattn::layer_norm_param_grads``) on
four widths (16-byte vectors with a last column tile cut short, 4-byte vectors, single
elements, one row). Each result is compared with the reference path (the sums: with their
definitions in float64), so that a kernel the sanitizer passes but that computes
garbage still fails (float32 against a float32 reference: TF32 is switched off). ``--ops``
and ``--dtypes`` take a part of it (``--ops official-sequential --dtypes float32``);
``--shapes`` and ``--layouts`` replace PSA's shapes and layouts, so that the same program runs
the kernels once at a benchmark's shape under Nsight Compute (``NCU_ARGS`` of
``tools/gpu_check.sh``)::

    ncu -k regex:'^(fwd|bwd|value)_' python tools/sanitize_kernels.py --ops paper-parallel \
        --dtypes bfloat16 --shapes 16,256,128,128 --layouts nchw

Exits 0 when all match, 1 otherwise; needs a CUDA GPU and the kernels (``MMATTN_JIT=1`` or a
``MMATTN_WITH_CUDA=1`` install).
"""
from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

import mmattn  # noqa: F401
from mmattn.layers import OutlookAttention, PolarizedSelfAttention
from mmattn.ops import kernel_status
from mmattn.utils.cli import int_tuple

PSA_SHAPES = [(2, 64, 17, 13), (3, 96, 33, 40), (1, 8, 1, 1)]
PSA_FORMS = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
             ('official', 'sequential')]
DTYPES = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def run_pair(fast: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward and backward of both on x; the largest difference (outputs and input
    gradients) relative to the reference's largest magnitude."""
    worst = 0.0
    results = []
    for block in (fast, ref):
        xi = x.detach().clone().requires_grad_()
        y = block(xi)
        y.float().square().sum().backward()
        results.append((y.detach().float(), xi.grad.float()))
    for got, want in zip(*results):
        worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item())
    return worst


def check_pair(name: str, fast: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor,
               env: dict[str, str], tol: float, failures: list[str]) -> None:
    """run_pair with ``env`` set around it (a kernel choice mmattn's C++ reads at each call);
    prints the difference, and adds ``name`` to ``failures`` where it exceeds ``tol``."""
    with mock.patch.dict(os.environ, env):
        err = run_pair(fast, ref, x)
    print(f'{name}: max relative difference {err:.1e}', flush=True)
    if not err <= tol:
        failures.append(name)


#: (shape, what it covers) of the column sums
COLUMN_SHAPES = [((3, 5, 7, 1160), 'bf16: 16-byte vectors, 3 column tiles, the last cut short'),
                 ((2, 9, 486), '4-byte vectors (bf16)'), ((4, 33, 5), 'single elements'),
                 ((1, 1, 192), 'one row')]


def column_sums_difference(shape: tuple[int, ...], dtype: torch.dtype,
                           device: torch.device) -> float:
    """The column-sum ops on random g and x against the sums' definitions in float64 (a bias's
    Σ_r g; LayerNorm's Σ_r g x̂ and Σ_r g), relative to the largest magnitude."""
    c = shape[-1]
    g = torch.randn(shape, device=device, dtype=dtype)
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 1
    _, mean, rstd = torch.native_layer_norm(x, [c], None, None, 1e-5)
    g2 = g.double().reshape(-1, c)
    xhat = (x.double().reshape(-1, c) - mean.double().reshape(-1, 1)) * rstd.double().reshape(-1, 1)
    want = [g2.sum(0), (g2 * xhat).sum(0), g2.sum(0)]
    dw, db = torch.ops.mmattn.layer_norm_param_grads(g, x, mean, rstd)
    got = [torch.ops.mmattn.bias_grad(g), dw, db]
    return max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
               for a, b in zip(got, want))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    names = [f'{variant}-{mode}' for variant, mode in PSA_FORMS] + ['outlook', 'column-sums']
    parser.add_argument('--ops', default=','.join(names),
                        help=f'comma-separated, of {", ".join(names)} (default: all)')
    parser.add_argument('--dtypes', default=','.join(str(d)[6:] for d in DTYPES),
                        help='comma-separated: float32, bfloat16 (default: both)')
    parser.add_argument('--shapes', nargs='+', type=int_tuple(4, 'N,C,H,W'), default=PSA_SHAPES,
                        metavar='N,C,H,W', help='PSA shapes (default: '
                        + ' '.join(','.join(map(str, s)) for s in PSA_SHAPES) + ')')
    parser.add_argument('--layouts', default=','.join(LAYOUTS),
                        help='PSA layouts, comma-separated: nchw, channels_last (default: both)')
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(',') if o.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
    layouts = [v.strip() for v in args.layouts.split(',') if v.strip()]
    unknown = [o for o in ops if o not in names] + [
        d for d in dtypes if d not in ('float32', 'bfloat16')] + [
        v for v in layouts if v not in LAYOUTS]
    if unknown:
        parser.error(f'unknown {unknown}: --ops takes {names}, --dtypes float32, bfloat16, '
                     f'--layouts {", ".join(LAYOUTS)}')
    if not torch.cuda.is_available():
        print('sanitize_kernels: needs a CUDA GPU; none found', file=sys.stderr)
        return 2
    print(f'mmattn kernels: {kernel_status()}', flush=True)
    device = torch.device('cuda')
    # the kernels compute float32 in float32 FMAs; the reference's 1x1 convolutions would run
    # on TF32 tensor cores (cuDNN's default), 1e-4-1e-3 away from float32 (an H200, 2026-11-26)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    failures = []
    for dtype, tol in DTYPES.items():
        if str(dtype)[6:] not in dtypes:
            continue
        for variant, mode in PSA_FORMS:
            if f'{variant}-{mode}' not in ops:
                continue
            for shape in args.shapes:
                for layout in (LAYOUTS[v] for v in layouts):
                    # NCHW where the register tiles take it (C <= 256, H*W whole 16-byte
                    # vectors): on them, and on the shared-memory tiles
                    # (MMATTN_PSA_REGISTER_TILES=0)
                    both = layout == torch.contiguous_format and shape[1] <= 256 and \
                        shape[2] * shape[3] % 8 == 0
                    for tiles in ('1', '0') if both else ('1',):
                        kw = dict(mode=mode, variant=variant)
                        fast = PolarizedSelfAttention(shape[1], backend='cuda', **kw).to(device)
                        ref = PolarizedSelfAttention(shape[1], backend='reference',
                                                     **kw).to(device)
                        ref.load_state_dict(fast.state_dict())
                        x = torch.randn(shape, device=device).to(dtype=dtype,
                                                                 memory_format=layout)
                        fast, ref = fast.to(dtype), ref.to(dtype)
                        name = (f'psa {variant} {mode} {list(shape)} {dtype} {layout}'
                                + (' (shared-memory tiles)' if tiles == '0' else ''))
                        check_pair(name, fast, ref, x, {'MMATTN_PSA_REGISTER_TILES': tiles},
                                   tol, failures)
        # NCHW input, and channels-last input, whose block pools on mmattn's kernel
        # (16-bit, stride 2: the gathers on the scalar kernel, the default, and on the
        # tensor-core one, MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1)
        cases = [(1, 'NCHW', '0'), (2, 'NCHW', '0'), (2, 'NHWC', '0'), (2, 'NHWC', '1')]
        for stride, fmt, tensor_cores in cases if 'outlook' in ops else ():
            kw = dict(num_heads=2, kernel_size=3, stride=stride, data_format=fmt)
            fast = OutlookAttention(64, backend='cuda', **kw).to(device, dtype)
            ref = OutlookAttention(64, backend='reference', **kw).to(device, dtype)
            ref.load_state_dict(fast.state_dict())
            shape = (2, 64, 13, 11) if fmt == 'NCHW' else (2, 13, 11, 64)
            x = torch.randn(shape, device=device, dtype=dtype)
            name = (f'outlook K=3 stride {stride} {fmt} {dtype}'
                    + (' (tensor-core gathers)' if tensor_cores == '1' else ''))
            check_pair(name, fast, ref, x, {'MMATTN_OUTLOOK_TENSOR_CORE_GATHER': tensor_cores},
                       tol, failures)
        for shape, covers in COLUMN_SHAPES if 'column-sums' in ops else ():
            err = column_sums_difference(shape, dtype, device)
            name = f'column sums {list(shape)} {dtype} ({covers})'
            print(f'{name}: max relative difference {err:.1e}', flush=True)
            if not err <= tol:
                failures.append(name)
    torch.cuda.synchronize()
    if failures:
        print(f'sanitize_kernels: {len(failures)} case(s) differ from the reference: '
              f'{failures}', file=sys.stderr)
        return 1
    print('sanitize_kernels: all cases match the reference')
    return 0


if __name__ == '__main__':
    sys.exit(main())
