"""The whole PSA block per call on a GPU (``mmattn::psa_block_cuda_fwd`` / ``_bwd``, autograd in
C++): ``PolarizedSelfAttention(backend='cuda')`` for the four forms against the module's
reference path, the state kept for the backward, CUDA-graph capture and ``torch.compile``.
All ``cuda``-marked: they run on a machine with a GPU (``tools/gpu_check.sh``); the same code's
logic runs on the CPU in ``test_kernels_emulated.py`` (the kernels under an emulation of CUDA).
"""
from __future__ import annotations

import os.path as osp
import sys

import pytest
import torch
from torch import Tensor

from mmattn.analysis import saved_bytes

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_psa_block import FORMS, block  # noqa: E402
from psa_block_checks import all_grads, check_low_precision  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
pytestmark = pytest.mark.cuda


def cuda_pair(variant: str, mode: str, c: int, dtype: torch.dtype = F64):
    fast = block(variant, mode, c, 'cuda').to('cuda', dtype)
    ref = block(variant, mode, c, 'reference').to('cuda', dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def call(b, t: Tensor) -> Tensor:
    return b(t)


# (layout, MMATTN_PSA_REGISTER_TILES): NCHW's passes on the register tiles where they apply
# (psa_register_tiles.cuh: H*W whole 16-byte vectors, C <= 256) and on the shared-memory tiles
TILES = [(torch.contiguous_format, '1'), (torch.contiguous_format, '0'),
         (torch.channels_last, '1')]


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('layout, register_tiles', TILES)
def test_module_matches_reference(cuda_kernels: str, variant: str, mode: str,
                                  layout: torch.memory_format, register_tiles: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', register_tiles)
    fast, ref = cuda_pair(variant, mode, 48)
    auto = block(variant, mode, 48, 'auto').cuda()
    assert auto.selected_backend(torch.randn(1, 48, 2, 2, device='cuda'))[0] == 'cuda'
    # (float64: the register tiles take NCHW's even H*W, the shared-memory tiles the others)
    for shape in [(2, 48, 12, 10), (1, 48, 1, 1), (3, 48, 33, 17), (1, 48, 130, 96)]:
        x = torch.randn(shape, dtype=F64, device='cuda').contiguous(memory_format=layout)
        g = torch.randn(shape, dtype=F64, device='cuda').contiguous(memory_format=layout)
        y = fast(x)
        assert y.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y, ref(x), **TOL)
        for got, want in zip(all_grads(call, fast, x, g), all_grads(call, ref, x, g)):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_s_value_kernels_match_reference(cuda_kernels: str, layout: torch.memory_format,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """PSA_s's value kernels (psa_value_tiles.cuh: the value map's tiles computed in the
    forward's and the backward's cooperative launches) on scalar products in float64
    (MMATTN_PSA_VALUE_TILES=1): output and every gradient against the reference, with rows,
    channels and pixels past a tile and several tiles a split, and M = dVl x^T over runs of
    the pixels (4096 pixels: 16 runs); the bf16/fp16/TF32 warp products: test_low_precision,
    test_psa_s_value_products_tf32 and test_psa_s_weight_products_over_runs_of_pixels."""
    monkeypatch.setenv('MMATTN_PSA_VALUE_TILES', '1')
    for c, shape in [(48, (2, 48, 12, 10)), (160, (3, 160, 20, 22)), (256, (1, 256, 8, 6)),
                     (48, (2, 48, 64, 64))]:
        fast, ref = cuda_pair('official', 'sequential', c)
        x = torch.randn(shape, dtype=F64, device='cuda').contiguous(memory_format=layout)
        g = torch.randn(shape, dtype=F64, device='cuda').contiguous(memory_format=layout)
        torch.testing.assert_close(fast(x), ref(x), **TOL)
        for got, want in zip(all_grads(call, fast, x, g), all_grads(call, ref, x, g)):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('glue_blocks', ['', '1', '8'])
def test_glues_on_clusters_match_reference(cuda_kernels: str, variant: str, mode: str,
                                           glue_blocks: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """float64, output and every gradient, with the glues' blocks per image as chosen (on
    compute capability 9.0 a cluster of 3 at C = 96, 8 at C = 256), one (as below sm_90) and
    8 (``MMATTN_PSA_GLUE_BLOCKS``; a cluster where the device has them)."""
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', glue_blocks)
    for c, shape in [(96, (2, 96, 12, 10)), (256, (1, 256, 8, 6))]:
        fast, ref = cuda_pair(variant, mode, c)
        x = torch.randn(shape, dtype=F64, device='cuda')
        g = torch.randn(shape, dtype=F64, device='cuda')
        torch.testing.assert_close(fast(x), ref(x), **TOL)
        for got, want in zip(all_grads(call, fast, x, g), all_grads(call, ref, x, g)):
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize('variant, mode', FORMS)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('register_tiles', ['1', '0'])
def test_low_precision(cuda_kernels: str, variant: str, mode: str, dtype: torch.dtype,
                       register_tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Error against float64 at most about twice the eager reference's in the same dtype
    (C=256, NCHW: 16-byte vectors, the register tiles and the shared-memory tiles; the check
    of psa_block_checks.py, on CUDA tensors). float32 without TF32 (PSA_s's value products
    follow ``torch.backends.cudnn.allow_tf32``; TF32: the test below)."""
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', register_tiles)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    check_low_precision(on_cuda, mode, (2, 256, 24, 20), dtype, variant)


def on_cuda(b, x: Tensor) -> Tensor:
    b.to('cuda').backend = 'cuda'
    return b(x.cuda()).cpu()


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('value_tiles', ['', '0'])
def test_psa_s_value_products_tf32(cuda_kernels: str, layout: torch.memory_format,
                                   value_tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PSA_s in float32 with TF32 allowed in cuDNN's convolutions (PyTorch's default): its
    value map's tiles on TF32 warp products (psa_value_tiles.cuh; '0': the GEMM path), within
    twice the error of the eager reference in float16 (TF32 rounds the products' inputs to
    float16's 10 mantissa bits)."""
    monkeypatch.setenv('MMATTN_PSA_VALUE_TILES', value_tiles)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)

    def in_layout(b, x: Tensor) -> Tensor:
        return on_cuda(b, x.contiguous(memory_format=layout))
    check_low_precision(in_layout, 'sequential', (2, 256, 24, 20), torch.float32,
                        bound=torch.float16)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('fused_m', ['', '0'])
def test_psa_s_weight_products_over_runs_of_pixels(cuda_kernels: str, dtype: torch.dtype,
                                                   fused_m: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """PSA_s's M = dVl x^T in the backward's cooperative launch where M has fewer tiles than
    the grid has blocks (one image of 64 x 64 pixels, C = 64: one tile, in 16 runs of 256
    pixels, summed in float32), on TF32 (float32, TF32 allowed) or bf16 warp products, in
    both layouts: within twice the eager reference's error in float16 or bf16; '0': M as a
    GEMM after the launch (MMATTN_PSA_FUSED_M=0)."""
    monkeypatch.setenv('MMATTN_PSA_FUSED_M', fused_m)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    for layout in (torch.contiguous_format, torch.channels_last):
        def in_layout(b, x: Tensor) -> Tensor:
            return on_cuda(b, x.contiguous(memory_format=layout))
        check_low_precision(in_layout, 'sequential', (1, 64, 64, 64), dtype,
                            bound=torch.float16 if dtype == torch.float32 else None)


@pytest.mark.parametrize('variant, mode', FORMS)
def test_keeps_nothing_of_x_size(cuda_kernels: str, variant: str, mode: str) -> None:
    """Besides x, the backward keeps a few (N, P), (N, C) and (N, C/2) tensors: under a
    twentieth of x at C=64 (the reference keeps more than x)."""
    fast, ref = cuda_pair(variant, mode, 64, torch.float32)
    x = torch.randn(2, 64, 32, 24, device='cuda', requires_grad=True)
    assert saved_bytes(fast, x) < x.numel() * x.element_size() / 20
    assert saved_bytes(ref, x) >= x.numel() * x.element_size()


@pytest.mark.parametrize('variant, mode', FORMS)
def test_training_step_replays_in_a_cuda_graph(cuda_kernels: str, variant: str,
                                               mode: str) -> None:
    """A training step (forward, backward) captured in a CUDA graph replays equal to eager on
    new data: no host-device synchronisation, no allocation outside the graph's pool."""
    fast, _ = cuda_pair(variant, mode, 64, torch.float32)
    static_x = torch.randn(2, 64, 32, 24, device='cuda', requires_grad=True)

    def step() -> Tensor:
        fast.zero_grad(set_to_none=False)
        static_x.grad = None
        y = fast(static_x)
        y.square().sum().backward()
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the capture (cuBLAS workspaces, the allocator)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    with torch.no_grad():
        static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    got = [static_y.clone(), static_x.grad.clone()] + [p.grad.clone() for p in fast.parameters()]
    want = [step().detach(), static_x.grad] + [p.grad for p in fast.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant, mode', FORMS)
def test_torch_compile_fullgraph(cuda_kernels: str, variant: str, mode: str) -> None:
    torch._dynamo.reset()
    fast, ref = cuda_pair(variant, mode, 16)
    compiled = torch.compile(fast, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 16, 5, 4, dtype=F64, device='cuda')
    g = torch.randn_like(x)
    for got, want in zip(all_grads(lambda b, t: compiled(t), fast, x, g),
                         all_grads(call, ref, x, g)):
        torch.testing.assert_close(got, want, **TOL)


def test_opcheck(cuda_kernels: str) -> None:
    """Schema, fake tensors (the state's shapes), the C++ autograd and AOT dispatch."""
    from mmattn.ops.psa_block import psa_block_weights
    for variant, mode in FORMS:
        weights, form, eps = psa_block_weights(block(variant, mode, 8, 'reference'))
        weights = [w.detach().cuda().requires_grad_() for w in weights]
        x = torch.randn(2, 8, 3, 5, dtype=F64, device='cuda', requires_grad=True)
        torch.library.opcheck(torch.ops.mmattn.psa_block_cuda_fwd.default,
                              (x, weights, form, eps))


def test_argument_errors_raise(cuda_kernels: str) -> None:
    """A gradient of the wrong shape raises, its message naming both shapes (checks of this
    kind crashed the process on the lent H200s, 2026-11-27, where the extension was linked
    with a C++ runtime of its own: ``extension.link_flags``)."""
    from mmattn.ops.psa_block import psa_block_weights
    weights, form, eps = psa_block_weights(block('paper', 'parallel', 8, 'reference'))
    weights = [w.detach().cuda() for w in weights]
    x = torch.randn(2, 8, 3, 5, dtype=F64, device='cuda')
    _, state = torch.ops.mmattn.psa_block_cuda_fwd(x, weights, form, eps)
    with pytest.raises(RuntimeError, match=r"grad must have x's shape \[2, 8, 3, 5\], "
                                           r'got \[2, 8, 3, 4\]'):
        torch.ops.mmattn.psa_block_cuda_bwd(x[..., :4], x, state, weights, form, eps)
