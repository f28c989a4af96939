"""The CUDA kernels' own sources, run on the CPU.

``tests/ops/emulation`` compiles ``mmattn/ops/csrc/psa_kernels.cuh`` and ``outlook_kernels.cuh``
(the kernels and the host code that launches them, exactly as ``psa_cuda*.cu`` /
``outlook_cuda.cu`` include them: the PSA code in the same four translation units, one per dtype,
its ops routed to them as ``cuda_ops.cpp`` routes them) with the host compiler against a CPU
emulation of CUDA's execution model (``emulated_cuda.h``: each CUDA thread a fiber that runs to its
next barrier, the threads in index order and in reverse by turns, a launch's blocks too, barriers
for ``__syncthreads``, the warp shuffles and the clusters, shared memory filled with NaN before
each block). The emulated ops are compared with the paper's equations (the references of
``test_psa_op.py`` and ``test_outlook_op.py``), in float64 and, with the per-dtype rule, in
float32/bfloat16/float16.
This checks the kernels' indexing, tiling, split reductions, layouts and synchronisation on any
machine; the ``cuda``-marked tests run the same comparisons on a GPU. New CPU memory holds
junk while they run, as recycled GPU memory does (``junk_in_new_memory``, conftest.py, which
``emulated`` requests).
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import sys
from typing import Iterator

import pytest
import torch
from torch import Tensor

import mmattn.ops.psa as psa_op
from mmattn.ops import extension
from mmattn.ops.dispatch import PSA_KERNEL_OPS
from mmattn.ops.psa_block import psa_block_weights, state_shapes

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from test_outlook_op import (TENSOR_CORE_GATHERS, check_gathers_half,  # noqa: E402
                             check_logits_grad, check_logits_grad_half, check_ones_column,
                             check_softmax, check_unpool_add, paper_aggregate)
from test_outlook_op import (SCALE, assert_rounded_once, logits_grad_rounded_truth,  # noqa: E402
                             logits_grad_truth, rounded_inputs_truth)
from test_outlook_op import inputs as outlook_inputs  # noqa: E402
from test_param_grads import (COLUMN_SHAPES, check_column_sums,  # noqa: E402
                              check_column_sums_edges, layer_norm_inputs)
from op_recorder import OpRecorder  # noqa: E402
from test_psa_block import block, equations  # noqa: E402
from test_psa_op import (EPS, F64, PARAM_NAMES, check_low_precision, grads,  # noqa: E402
                         paper_psa, random_params)
from psa_block_checks import all_grads, block_function, check_matches, through  # noqa: E402
from psa_block_checks import check_low_precision as check_release_low_precision  # noqa: E402

HERE = osp.dirname(osp.abspath(__file__))
NAMESPACE = 'mmattn_emulated'
#: MMATTN_EMULATION_ASAN=1: the emulation built with AddressSanitizer, every memory access of
#: the kernels and their host code checked against its allocation's bounds
#: (tools/analysis/emulated_asan.sh preloads the runtime it needs)
ASAN = os.environ.get('MMATTN_EMULATION_ASAN', '') == '1'
_LIBRARY: list[torch.library.Library] = []   # keeps the schema definitions alive


@pytest.fixture(scope='module')
def emulated(junk_in_new_memory: None) -> Iterator[object]:
    """Build (cached by torch) and load the emulated kernels; yields ``torch.ops.<ns>``. New
    CPU memory holds junk from then on in the module (``junk_in_new_memory``, conftest.py)."""
    from torch.utils.cpp_extension import load
    if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE),
                                                        'psa_fwd_reduce'):
        lib = torch.library.Library(NAMESPACE, 'DEF')
        for schema in extension.SCHEMAS.values():
            lib.define(schema)
        lib.define('psa_vector_width(Tensor x, int tiles) -> int')  # psa_emulated.cpp
        lib.define('psa_register_tiles(Tensor x) -> bool')
        lib.define('emulated_launches() -> int')
        lib.define('psa_glue_blocks(int n, int c) -> int')
        lib.define('outlook_gather_tensor_cores(Tensor v, Tensor attn, int kernel_size, '
                   'int padding, int stride) -> bool')  # outlook_emulated.cpp
        lib.define('emulated_previous_thread(int threads, int rounds, bool barrier) -> Tensor')
        lib.define('emulated_divergent_barriers(int threads) -> ()')  # emulator_checks.cpp
        lib.define('emulated_previous_block(int x, int y, int z, int cluster) -> Tensor')
        lib.define('emulated_warp_sum(int threads, int live) -> Tensor')
        _LIBRARY.append(lib)
        load(name='mmattn_emulated_kernels' + ('_asan' if ASAN else ''),
             sources=[osp.join(HERE, 'emulation', f'psa_emulated{unit}.cpp')
                      for unit in ('', '_double', '_half', '_bfloat16')] +
                     [osp.join(HERE, 'emulation', 'outlook_emulated.cpp'),
                      osp.join(HERE, 'emulation', 'column_sums_emulated.cpp'),
                      osp.join(HERE, 'emulation', 'emulator_checks.cpp'),
                      osp.join(extension.CSRC, 'column_sums_args.cpp')],
             extra_include_paths=[extension.CSRC, osp.join(HERE, 'emulation')],
             extra_cflags=['-pthread'] + (['-O1', '-g', '-fsanitize=address',
                                            '-fno-omit-frame-pointer'] if ASAN else ['-O2']),
             extra_ldflags=['-pthread'] + (['-fsanitize=address'] if ASAN else []),
             is_python_module=False)
    yield getattr(torch.ops, NAMESPACE)


def test_new_memory_holds_junk(junk_in_new_memory: None) -> None:
    assert torch.empty(4096, dtype=torch.float32).isnan().all()
    assert (torch.empty(1 << 20, dtype=torch.float64) > 1e300).all()   # 8 MiB: fresh pages


# ---------------------------------------------------------------- the emulation itself
@pytest.mark.parametrize('threads', [1, 37, 256])
def test_emulation_shows_a_missing_barrier_in_either_order(emulated, threads: int) -> None:
    """Each thread reads the previous thread's write of the same round: right with a barrier
    between write and read; without one, the rounds run in index order (the reads right) and
    in reverse (every thread but 0 reads the previous round's value, or, in round 0, shared
    memory's poison) by turns, starting one way in a launch and the other in the next, so that
    the missing barrier shows whichever way the read goes."""
    rounds = 4
    written = torch.arange(rounds)[:, None] * threads + torch.arange(threads)
    previous = torch.cat([written[:, :1], written[:, :-1]], dim=1)
    assert torch.equal(emulated.emulated_previous_thread(threads, rounds, True), previous)
    poison = -1   # 0xFF bytes
    stale = torch.cat([previous[:, :1], previous[:, 1:] - threads], dim=1)
    stale[0, 1:] = poison
    starts = set()
    for _ in range(2):
        racy = emulated.emulated_previous_thread(threads, rounds, False)
        first = 0 if torch.equal(racy[0], previous[0]) else 1   # round 0 ran in index order
        starts.add(first)
        for r in range(rounds):
            assert torch.equal(racy[r], previous[r] if (r + first) % 2 == 0 else stale[r]), r
    assert starts == {0, 1} or threads == 1


@pytest.mark.parametrize('grid, cluster', [((5, 1, 1), 1), ((3, 2, 2), 1), ((4, 3, 1), 2)])
def test_emulation_shows_a_dependence_between_blocks_in_either_order(
        emulated, grid: tuple[int, int, int], cluster: int) -> None:
    """Each block writes its linear index, then reads the previous block's write (block 0 its
    own): a launch runs the blocks in index order (every read finds the write) and the next
    one in reverse (no block but 0 finds it: -1, the buffer's fill), so that a block reading
    another block's output in the same launch shows whichever way the dependence goes. In
    clusters, the clusters take turns so (a cluster's blocks run at once, its last one after
    the others: within a cluster, the cluster barriers' check is the one that applies)."""
    blocks = grid[0] * grid[1] * grid[2]
    index = torch.arange(blocks)
    in_order = torch.stack([index, (index - 1).clamp(min=0)], dim=1)
    reversed_ = in_order.clone()
    reversed_[(index % cluster == 0) & (index > 0), 1] = -1
    runs = [emulated.emulated_previous_block(*grid, cluster) for _ in range(4)]
    first = 0 if torch.equal(runs[0], in_order) else 1
    for k, got in enumerate(runs):
        assert torch.equal(got, in_order if (k + first) % 2 == 0 else reversed_), k


@pytest.mark.parametrize('threads, live', [(64, 64), (64, 40), (64, 32), (48, 48), (70, 70)])
def test_emulation_gives_junk_for_a_shuffle_from_a_lane_not_there(emulated, threads: int,
                                                                  live: int) -> None:
    """The threads before ``live`` sum their indices over their warp by xor shuffles, the
    others return first: a full warp of live threads gets its sum; a warp with a lane that has
    exited, or that the block lacks (48 or 70 threads: a partial last warp), reads an undefined
    value on the GPU, NaN here, in every live lane (each one's partners reach the missing lane
    by the last step); threads that returned leave their -1."""
    out = emulated.emulated_warp_sum(threads, live)
    want = torch.full((threads,), -1.0)
    for w in range(0, live, 32):
        lanes = torch.arange(w, min(w + 32, live))
        full = w + 32 <= live and w + 32 <= threads
        want[lanes] = float(torch.arange(w, w + 32).sum()) if full else float('nan')
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)


def test_emulation_reports_a_deadlock(emulated) -> None:
    """Threads waiting at barriers that not all of them reach (odd threads at the block's,
    even ones at their warp's) end the launch with an error instead of hanging the suite; the
    next launch runs."""
    with pytest.raises(RuntimeError, match='deadlock: threads wait at barriers'):
        emulated.emulated_divergent_barriers(64)
    assert torch.equal(emulated.emulated_previous_thread(8, 1, True)[0],
                       torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))


# ---------------------------------------------------------------- PSA
@contextlib.contextmanager
def cudnn_tf32(allowed: bool) -> Iterator[None]:
    """``torch.backends.cudnn.allow_tf32`` (PSA_s's value products on tensor cores follow it,
    as the reference's 1x1 convolutions do on a GPU) set to ``allowed`` inside, restored
    after."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(autouse=True)
def exact_float32() -> Iterator[None]:
    """float32 without TF32 (PyTorch's default allows it in cuDNN's convolutions), so that the
    float32 checks hold float32's bounds; a test of TF32 allows it itself (cudnn_tf32)."""
    with cudnn_tf32(False):
        yield


@pytest.fixture
def psa_kernel(emulated, monkeypatch: pytest.MonkeyPatch):
    """``psa_paper_folded(..., kernel=True)`` running its four passes on the emulated kernels
    (the Python glue between them is mmattn's own)."""
    passes = tuple(getattr(emulated, name) for name in PSA_KERNEL_OPS)
    real = psa_op._passes
    monkeypatch.setattr(psa_op, '_passes', lambda kernel: passes if kernel else real(False))

    def run(x: Tensor, w: dict[str, Tensor], mode: str) -> Tensor:
        return psa_op.psa_paper_folded(x, *(w[k] for k in PARAM_NAMES), eps=EPS,
                                       sequential=mode == 'sequential', kernel=True)
    return run


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_kernels_match_equations(psa_kernel, mode: str,
                                     layout: torch.memory_format) -> None:
    """1x1 maps, one pixel row, C not a multiple of 32, more pixels than a tile and than a
    split; float64, output and all 13 gradients."""
    for shape in [(1, 2, 1, 1), (2, 8, 7, 5), (3, 4, 1, 9), (2, 64, 16, 12), (1, 96, 9, 1)]:
        w = random_params(shape[1], std=0.3)
        x, g = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
        ref, ref_g = paper_psa(x, w, mode), grads(paper_psa, x, w, mode, g)
        xl = x.contiguous(memory_format=layout)
        y = psa_kernel(xl, w, mode)
        assert y.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for name, a, b in zip(('x',) + PARAM_NAMES, grads(psa_kernel, xl, w, mode, g), ref_g):
            scale = ref_g[1] if name == 'ch_bq' else b
            torch.testing.assert_close(a, b, rtol=1e-10,
                                       atol=1e-10 * max(1.0, scale.abs().max().item()),
                                       msg=name)


@pytest.mark.parametrize('layout, register_tiles', [
    (torch.contiguous_format, '1'), (torch.contiguous_format, '0'), (torch.channels_last, '1')])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_psa_kernels_low_precision(psa_kernel, dtype: torch.dtype, layout: torch.memory_format,
                                   register_tiles: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """C=256 (smaller tiles in the backward's two-tile pass for float32), 16-byte vectors in
    both layouts, NCHW's four passes on the register tiles and on the shared-memory
    tiles: error against float64 at most about twice the eager reference's in the same dtype."""
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', register_tiles)

    def in_layout(x: Tensor, w: dict[str, Tensor], mode: str) -> Tensor:
        return psa_kernel(x.contiguous(memory_format=layout), w, mode)
    check_low_precision(in_layout, (2, 256, 10, 12), 0.05, 'sequential', dtype)


def test_psa_kernels_use_16_byte_vectors_where_the_layout_allows(emulated) -> None:
    """Whole vectors along the contiguous axis (H*W for NCHW, C for channels_last), tiles of
    at least a vector's pixels, 16-byte aligned data; else single elements."""
    width = emulated.psa_vector_width
    x = torch.randn(2, 256, 10, 12, dtype=torch.bfloat16)
    assert width(x, 1) == 8 and width(x.contiguous(memory_format=torch.channels_last), 1) == 8
    assert width(x.float(), 1) == 4 and width(x.double(), 2) == 2
    odd = torch.randn(2, 256, 9, 7, dtype=torch.bfloat16)  # H*W = 63
    assert width(odd, 1) == 1 and width(odd.contiguous(memory_format=torch.channels_last), 1) == 8
    shifted = torch.randn(x.numel() + 1, dtype=torch.bfloat16)[1:].view(x.shape)
    assert width(shifted, 1) == 1
    assert width(torch.randn(1, 4096, 4, 4, dtype=torch.bfloat16), 2) == 1  # 1-pixel tiles


# NCHW shapes of the register tiles (psa_register_tiles.cuh) in float64 (2-pixel vectors, 4
# pixels a thread): channel groups of 1, 2, 4 and 8 warps (C = 2, 40, 96, 200, 256), the
# image's last tile partial (some groups past its end), several tiles per split
REGISTER_TILE_SHAPES = [(2, 2, 6, 6), (1, 40, 5, 14), (2, 96, 3, 10), (1, 200, 4, 9),
                        (3, 256, 2, 2)]


def test_psa_register_tiles_where_they_apply(emulated,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """NCHW, H*W a multiple of the 16-byte vector, aligned data, up to 256 channels; the
    shared-memory tile otherwise, or with MMATTN_PSA_REGISTER_TILES=0."""
    taken = emulated.psa_register_tiles
    x = torch.randn(2, 256, 10, 12, dtype=torch.bfloat16)
    assert taken(x) and taken(x.float()) and taken(x.double()) and taken(x[:, :2].contiguous())
    assert not taken(x.contiguous(memory_format=torch.channels_last))
    assert not taken(torch.randn(2, 258, 10, 12, dtype=torch.bfloat16))   # C > 256
    assert not taken(torch.randn(2, 256, 9, 7, dtype=torch.bfloat16))     # H*W = 63
    assert not taken(torch.randn(x.numel() + 1, dtype=torch.bfloat16)[1:].view(x.shape))
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', '0')
    assert not taken(x)
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', '1')
    assert taken(x)
    monkeypatch.setenv('MMATTN_PSA_REGISTER_TILES', 'yes')
    with pytest.raises(RuntimeError, match="MMATTN_PSA_REGISTER_TILES must be 0 or 1, got 'yes'"):
        taken(x)


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
def test_psa_register_tiles_match_equations(psa_kernel, emulated, mode: str) -> None:
    """Every channel-group width, partial last tiles: float64, output and all 13 gradients."""
    for shape in REGISTER_TILE_SHAPES:
        x, g = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
        assert emulated.psa_register_tiles(x), shape
        w = random_params(shape[1], std=0.3)
        torch.testing.assert_close(psa_kernel(x, w, mode), paper_psa(x, w, mode), rtol=1e-12,
                                   atol=1e-12)
        ref_g = grads(paper_psa, x, w, mode, g)
        for name, a, b in zip(('x',) + PARAM_NAMES, grads(psa_kernel, x, w, mode, g), ref_g):
            scale = ref_g[1] if name == 'ch_bq' else b
            torch.testing.assert_close(a, b, rtol=1e-10,
                                       atol=1e-10 * max(1.0, scale.abs().max().item()),
                                       msg=f'{shape} {name}')


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_psa_register_tiles_reduction_splits(emulated, dtype: torch.dtype) -> None:
    """The forward reduction's splits (1, 3 or 7 asked per image, at most one a tile; partial
    tiles among them) against the definitions: logits l = w . x_p, and, merged over the
    splits, the softmax over the pixels' normaliser and s = sum_p softmax(l)_p x_p,
    m = sum_p x_p."""
    counts = set()
    for shape in [(2, 2, 6, 12), (1, 40, 5, 24), (2, 96, 4, 10), (1, 200, 4, 18)]:  # P % 8 = 0
        x = (torch.randn(shape, dtype=F64) * 2).to(dtype)
        assert emulated.psa_register_tiles(x), shape
        wq = torch.randn(shape[1], dtype=F64)
        xd = x.double().flatten(2)                                # (N, C, P)
        logits = torch.einsum('c,ncp->np', wq, xd)
        pi = logits.softmax(-1)
        for splits in (1, 3, 7):
            acc = torch.float64 if dtype == F64 else torch.float32
            lg, pmax, psum, ps, pm = emulated.psa_fwd_reduce(x, wq.to(acc), splits)
            assert pmax.shape[0] == shape[0] and 1 <= pmax.shape[1] <= splits
            counts.add(pmax.shape[1])   # (at most a split per tile of the pixels)
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(lg.double(), logits, **tol)
            top = pmax.double().amax(-1, keepdim=True)
            scale = (pmax.double() - top).exp()                 # (N, S)
            total = (psum.double() * scale).sum(-1)
            torch.testing.assert_close(total, (logits - top).exp().sum(-1), **tol)
            s = (ps.double() * scale[..., None]).sum(1) / total[:, None]
            torch.testing.assert_close(s, torch.einsum('np,ncp->nc', pi, xd), **tol)
            torch.testing.assert_close(pm.double().sum(1), xd.sum(-1), **tol)
    assert 1 in counts and max(counts) >= 4, counts


@pytest.mark.parametrize('variant, mode', [('official', 'parallel'), ('official', 'sequential')])
def test_psa_release_forms_on_register_tiles(block_kernel, emulated, variant: str,
                                             mode: str) -> None:
    """PSA_p's spatial logits (a per-image weight) and its gate from given logits, PSA_s's
    passes (its dx part added by the backward apply pass, whose launch runs the weight
    gradients' tail), on the register tiles: float64 against the equations, every gradient."""
    for shape in REGISTER_TILE_SHAPES[1:4]:
        assert emulated.psa_register_tiles(torch.empty(shape, dtype=F64))
        check_matches(block_kernel, mode, shape, torch.contiguous_format, variant)


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_kernels_on_misaligned_data(psa_kernel, layout: torch.memory_format) -> None:
    """x 8 bytes off a 16-byte boundary (a view into a larger buffer): the single-element path,
    float64, output and gradients."""
    shape, mode = (2, 64, 6, 8), 'sequential'
    w = random_params(shape[1], std=0.3)
    g = torch.randn(shape, dtype=F64)
    buffer = torch.randn(int(torch.Size(shape).numel()) + 1, dtype=F64)
    x = buffer[1:].view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2) \
        if layout == torch.channels_last else buffer[1:].view(shape)
    assert x.data_ptr() % 16 == 8 and x.is_contiguous(memory_format=layout)
    torch.testing.assert_close(psa_kernel(x, w, mode), paper_psa(x, w, mode), rtol=1e-12,
                               atol=1e-12)
    ours, ref = grads(psa_kernel, x, w, mode, g), grads(paper_psa, x, w, mode, g)
    for name, a, b in zip(('x',) + PARAM_NAMES, ours, ref):
        scale = ref[1] if name == 'ch_bq' else b
        atol = 1e-10 * max(1.0, scale.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=atol, msg=name)


def test_psa_kernels_wide_channels_use_the_opt_in_shared_memory(psa_kernel) -> None:
    """C=2048 in float64: one pixel per tile does not fit the default 48 KiB of shared memory;
    the launch asks for the opt-in amount."""
    w = random_params(2048, std=0.02)
    x, g = torch.randn(2, 2048, 2, 3, dtype=F64), torch.randn(2, 2048, 2, 3, dtype=F64)
    torch.testing.assert_close(psa_kernel(x, w, 'parallel'), paper_psa(x, w, 'parallel'),
                               rtol=1e-12, atol=1e-12)
    ours, ref = grads(psa_kernel, x, w, 'parallel', g), grads(paper_psa, x, w, 'parallel', g)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-10, atol=1e-10)


def check_glues(emulated, sequential: bool, cases: list[tuple[int, ...]]) -> None:
    """The paper form's glue kernels against ``_fwd_glue_torch`` / ``_bwd_glue_torch`` on random
    (N, S splits, C, pixels) inputs, float64."""
    for n, s, c, p in cases:
        w = random_params(c, std=0.3)
        weights = [w[k] for k in psa_op.CHAIN_NAMES]
        pmax = torch.randn(n, s, dtype=F64)
        psum, ps, pm = (torch.rand(n, s, dtype=F64) + 0.5, torch.randn(n, s, c, dtype=F64),
                        torch.randn(n, s, c, dtype=F64))
        fwd = emulated.psa_fwd_glue(pmax, psum, ps, pm, p, weights, EPS, sequential)
        for a, b in zip(fwd, psa_op._fwd_glue_torch(pmax, psum, ps, pm, p, weights, EPS,
                                                    sequential)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # the merged state of the splits': the maximum, the sum rescaled to it
        top = pmax.amax(1)
        torch.testing.assert_close(fwd[0], torch.stack([top, (psum * (pmax - top[:, None]).exp())
                                                        .sum(1)]), rtol=1e-12, atol=1e-12)
        stats = fwd[1]
        part_dt, part_da, part_dueff = (torch.randn(n, s, dtype=F64),
                                        torch.randn(n, s, c, dtype=F64),
                                        torch.randn(n, s, c, dtype=F64))
        bwd = emulated.psa_bwd_glue(part_dt, part_da, part_dueff, stats, p, weights, EPS,
                                    sequential)
        ref = psa_op._bwd_glue_torch(part_dt, part_da, part_dueff, stats, p, weights, EPS,
                                     sequential)
        for name, a, b in zip(('dm', 'dsv', 'beta', 'left', 'right', 'vecs'), bwd, ref):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
def test_psa_glue_kernels_match_their_pytorch_twins(emulated, mode: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The C-sized work between the passes (a thread block per image), against its PyTorch
    twins: one split and many, C/2 below and above the block's 512 threads (kGlueThreads), C
    not a multiple of 32."""
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', '1')
    check_glues(emulated, mode == 'sequential',
                [(1, 1, 2, 1), (3, 5, 6, 7), (2, 41, 96, 50), (2, 3, 1040, 9)])


def test_psa_glues_on_teams_of_blocks(emulated, block_kernel,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """MMATTN_PSA_GLUE_BLOCKS spreads an image's glue over a team of blocks (a thread-block
    cluster on the GPU; here run at once, each block its own shared memory, the last one running
    each step between cluster barriers after the others, so that a missing barrier shows): the
    paper glues against their twins on teams of 3 (uneven shares, a block with no share at
    C/2 = 1, more channels a block than its threads at C = 1100; the parallel mode, whose
    steps are the same, on one case), and the blocks of the sequential paper form, PSA_p and
    PSA_s against the equations on teams of 2; then every glue on teams of 8, an H100's at
    C=256 (32 channels a block); float64, output and gradients."""
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', '3')
    assert emulated.psa_glue_blocks(1, 2) == 3
    check_glues(emulated, True, [(1, 1, 2, 1), (2, 5, 14, 7), (1, 3, 1100, 9)])
    check_glues(emulated, False, [(2, 5, 14, 7)])
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', '2')
    for variant, mode in BLOCK_FORMS[1:]:
        check_matches(block_kernel, mode, (2, 24, 5, 6), torch.contiguous_format, variant)
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', '8')
    check_glues(emulated, True, [(2, 3, 256, 5)])
    for variant, mode in BLOCK_FORMS:
        check_matches(block_kernel, mode, (2, 256, 3, 4), torch.contiguous_format, variant)


def test_psa_glue_blocks_by_default_and_errors(emulated,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, as many blocks an image as keep the images' teams within the multiprocessors (the
    emulation's 2), at least 32 channels each; MMATTN_PSA_GLUE_BLOCKS sets 1 to 8 (a portable
    cluster), anything else is an error naming it."""
    monkeypatch.delenv('MMATTN_PSA_GLUE_BLOCKS', raising=False)
    blocks = emulated.psa_glue_blocks
    assert blocks(1, 64) == 2 and blocks(1, 256) == 2
    assert blocks(2, 256) == 1 and blocks(1, 63) == 1 and blocks(1, 2) == 1
    monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', '8')
    assert blocks(16, 2) == 8
    for bad in ('0', '9', 'two', '2x'):
        monkeypatch.setenv('MMATTN_PSA_GLUE_BLOCKS', bad)
        with pytest.raises(RuntimeError, match=f"MMATTN_PSA_GLUE_BLOCKS must be an integer "
                                               f"from 1 to 8 .*, got '{bad}'"):
            blocks(1, 64)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_psa_kernel_path_launches_few_operators(psa_kernel, dtype: torch.dtype) -> None:
    """With the kernels, a training step's host work is the four passes, the two glue kernels
    and a few PyTorch operations (the weights' and gradients' casts, the weight gradients'
    one batched product and sums), not the 30-90 small operations of the C-sized chain: on a
    GPU each launch costs microseconds, as much as a pass over x at moderate sizes."""
    w = {k: v.to(dtype) for k, v in random_params(32, std=0.3).items()}
    x = torch.randn(2, 32, 4, 6, dtype=dtype)
    params = tuple(w[k] for k in PARAM_NAMES)
    with OpRecorder() as fwd:
        y, logits, lnorm, s_mask, stats = psa_op._forward_impl(x, params, EPS, True, True)
    g = torch.randn_like(y)
    with OpRecorder() as bwd:
        psa_op._backward_impl(g, x, logits, lnorm, s_mask, stats, params, EPS, True, True)
    kernels = {f'{NAMESPACE}.{name}' for name in PSA_KERNEL_OPS}
    fwd_ops, bwd_ops = fwd.launches(), bwd.launches()
    assert kernels == {op for op in fwd_ops + bwd_ops if op.startswith('mmattn_emulated')}
    # forward: 3 kernels (bf16: + concatenating and casting the weights); backward: 3 kernels,
    # the weight gradients' product, two sums, ch_bq's zero, the transposed ch_wz gradient's
    # copy and the concatenation of the gradients (bf16: + 3 casts and concatenations)
    assert len(fwd_ops) <= 5, fwd_ops
    assert len(bwd_ops) <= 12, bwd_ops


def test_psa_glue_input_errors(emulated) -> None:
    pmax, psum = torch.randn(2, 3), torch.rand(2, 3)
    ps, pm = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    weights = [torch.randn(4, 8), torch.randn(4)]
    with pytest.raises(RuntimeError, match='expected the 10 chain weights, got 2'):
        emulated.psa_fwd_glue(pmax, psum, ps, pm, 9, weights, EPS, False)
    with pytest.raises(RuntimeError, match=r'pmax must have shape \[2, 3\], got \[2, 2\]'):
        emulated.psa_fwd_glue(pmax[:, :2], psum, ps, pm, 9, weights, EPS, False)
    with pytest.raises(RuntimeError, match='float32 or float64'):
        emulated.psa_fwd_glue(pmax.half(), psum, ps, pm, 9, weights, EPS, False)
    with pytest.raises(RuntimeError, match=r'pixels must be in \[1, 2\^31\), got 0'):
        emulated.psa_fwd_glue(pmax, psum, ps, pm, 0, weights, EPS, False)
    with pytest.raises(RuntimeError, match='part_dt must be \\(N, S\\)'):
        emulated.psa_bwd_glue(torch.randn(2, 3, 1), ps, pm, torch.randn(2, 4, 8), 9, weights,
                              EPS, False)


def test_psa_kernel_input_errors(emulated) -> None:
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(RuntimeError, match='C must be even'):
        emulated.psa_fwd_reduce(torch.randn(2, 5, 3, 3), torch.randn(5), 0)
    with pytest.raises(RuntimeError, match='wq must have shape'):
        emulated.psa_fwd_reduce(x, torch.randn(4), 0)
    with pytest.raises(RuntimeError, match='a must be Float'):
        emulated.psa_fwd_apply(x, torch.randn(2, 6, dtype=F64), torch.randn(2, 6),
                               torch.randn(2), False)
    with pytest.raises(RuntimeError, match='contiguous or channels_last'):
        emulated.psa_fwd_apply(x.transpose(2, 3), torch.randn(2, 6), torch.randn(2, 6),
                               torch.randn(2), False)


# ---------------------------------------------------------------- the whole block per call
@pytest.fixture
def block_kernel(emulated):
    """``(module, x) -> output`` through the emulated psa_block_cuda_fwd/_bwd: every form on the
    kernels as psa_cuda.cu composes them (psa_block_cuda.cuh), with the state the forward
    returns kept for the backward."""
    return through(block_function(emulated.psa_block_cuda_fwd, emulated.psa_block_cuda_bwd))


BLOCK_FORMS = [('paper', 'parallel'), ('paper', 'sequential'), ('official', 'parallel'),
               ('official', 'sequential')]


@pytest.mark.parametrize('variant, mode', BLOCK_FORMS)
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_block_kernels_match_equations(block_kernel, variant: str, mode: str,
                                           layout: torch.memory_format) -> None:
    """1x1 maps, one pixel row, C not a multiple of 32, more pixels than a tile and than a
    split (every reduction over the pixels split); float64, output and every gradient. The
    paper forms' passes are tested through the folded op above: here their composition, on two
    of the shapes."""
    shapes = [(1, 2, 1, 1), (2, 8, 7, 5), (3, 4, 1, 9), (2, 64, 16, 12), (1, 96, 9, 1)]
    for shape in shapes if variant == 'official' else shapes[1::2]:
        check_matches(block_kernel, mode, shape, layout, variant)


@pytest.mark.parametrize('cap', ['1', '3'])
def test_psa_block_kernels_with_the_split_cap(block_kernel, emulated, cap: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """MMATTN_PSA_MAX_SPLITS caps the reductions' splits per image (one, or a few longer ones
    than one wave would give): every form still matches the equations in float64."""
    x = torch.randn(1, 8, 16, 16, dtype=F64)   # 8 tiles: one wave of the emulation, 8 splits
    wq = torch.randn(8, dtype=F64)
    assert emulated.psa_fwd_reduce(x, wq, 0)[1].shape == (1, 8)
    monkeypatch.setenv('MMATTN_PSA_MAX_SPLITS', cap)
    assert emulated.psa_fwd_reduce(x, wq, 0)[1].shape == (1, int(cap))
    assert emulated.psa_fwd_reduce(x, wq, 4)[1].shape == (1, 4)   # an explicit count: kept
    for variant, mode in BLOCK_FORMS:
        check_matches(block_kernel, mode, (1, 8, 16, 16), torch.contiguous_format, variant)


def test_psa_split_cap_errors(emulated, monkeypatch: pytest.MonkeyPatch) -> None:
    x, wq = torch.randn(1, 4, 6, 6), torch.randn(4)
    for bad in ('-1', 'four', '2x'):
        monkeypatch.setenv('MMATTN_PSA_MAX_SPLITS', bad)
        with pytest.raises(RuntimeError, match=f"MMATTN_PSA_MAX_SPLITS must be a non-negative "
                                               f"integer \\(0: no cap\\), got '{bad}'"):
            emulated.psa_fwd_reduce(x, wq, 0)
    monkeypatch.setenv('MMATTN_PSA_MAX_SPLITS', '0')
    assert emulated.psa_fwd_reduce(x, wq, 0)[1].shape[0] == 1


@pytest.mark.parametrize('variant, mode', BLOCK_FORMS)
def test_psa_block_kernels_empty_batch(block_kernel, variant: str, mode: str) -> None:
    """No image: empty y and dx, and every weight's gradient zero (a sum over no image) though
    no kernel runs to clear the buffers the kernels add the gradients into."""
    b = block(variant, mode, 8, 'reference')
    x = torch.randn(0, 8, 3, 4, dtype=F64, requires_grad=True)
    y = block_kernel(b, x)
    y.backward(torch.randn_like(y))
    assert y.shape == x.shape and x.grad.shape == x.shape
    for name, p in b.named_parameters():
        torch.testing.assert_close(p.grad, torch.zeros_like(p), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize('mode', ['parallel', 'sequential'])
@pytest.mark.parametrize('layout, dtype', [
    (torch.contiguous_format, torch.float32), (torch.contiguous_format, torch.bfloat16),
    (torch.contiguous_format, torch.float16), (torch.channels_last, torch.float32),
    (torch.channels_last, torch.bfloat16), (torch.channels_last, torch.float16)])
def test_psa_release_kernels_low_precision(block_kernel, mode: str, dtype: torch.dtype,
                                           layout: torch.memory_format) -> None:
    """The release's forms at C=256, 16-byte vectors in both layouts: error against float64 at
    most about twice the eager reference's in the same dtype (the paper forms' passes: the
    folded op's tests above)."""
    def in_layout(b, x: Tensor) -> Tensor:
        return block_kernel(b, x.contiguous(memory_format=layout))
    check_release_low_precision(in_layout, mode, (2, 256, 10, 12), dtype)


def test_psa_s_kernels_wide_channels(block_kernel) -> None:
    """PSA_s at C=1024, float64: the value passes' tiles shrink to a few pixels (the value
    map's tile and two pixel tiles share the block's shared memory)."""
    check_matches(block_kernel, 'sequential', (2, 1024, 3, 2), torch.contiguous_format)


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_s_value_products_cut_over_the_pixels(block_kernel,
                                                  layout: torch.memory_format) -> None:
    """PSA_s's M = dVl x^T with few output tiles and many pixels is cut into chunks of the
    pixels (a batched GEMM per image over its chunks, then their sum; the emulation has 2 SMs,
    so one image of C <= 32 channels and 8192 pixels is cut into 4): the output and every
    gradient still match the equations in float64, in both memory formats, and the cut shows
    as the chunks' sum among the backward's ATen calls (none at 256 pixels)."""
    from torch.profiler import ProfilerActivity, profile
    for shape, cut in (((1, 8, 64, 128), True), ((1, 8, 16, 16), False)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            check_matches(block_kernel, 'sequential', shape, layout)
        calls = [evt for evt in prof.events() if evt.name == f'{NAMESPACE}::psa_block_cuda_bwd']
        sums = sum(child.name == 'aten::sum' for evt in calls for child in evt.cpu_children)
        assert calls and sums == (len(calls) if cut else 0), (shape, len(calls), sums)


#: ATen operators that launch nothing on a GPU (allocations, views, no-op casts)
NO_LAUNCH = {'aten::empty', 'aten::empty_strided', 'aten::empty_like', 'aten::to',
             'aten::view', 'aten::as_strided', 'aten::select', 'aten::slice', 'aten::narrow',
             'aten::t', 'aten::transpose', 'aten::reshape', 'aten::_reshape_alias',
             'aten::split_with_sizes', 'aten::split', 'aten::unbind', 'aten::expand',
             'aten::resolve_conj', 'aten::resolve_neg', 'aten::alias', 'aten::detach',
             'aten::contiguous', 'aten::lift_fresh', 'aten::resize_', 'aten::unsqueeze',
             'aten::squeeze', 'aten::permute', 'aten::result_type', 'aten::flatten'}


def aten_launches(events, op: str) -> int:
    """The ATen operators that ``op``'s C++ calls (its direct children in the profile) and that
    would launch a kernel on a GPU: those computing anything, themselves or below."""
    def computes(evt) -> bool:
        return evt.name not in NO_LAUNCH or any(computes(c) for c in evt.cpu_children)
    return sum(computes(child) for evt in events if evt.name == op
               for child in evt.cpu_children)


@pytest.mark.parametrize('variant, mode, tf32, fused_m, kernels, total', [
    ('paper', 'sequential', False, '1', (3, 3), 6), ('official', 'parallel', False, '1', (3, 3), 6),
    ('official', 'sequential', True, '1', (3, 4), 7),
    ('official', 'sequential', True, '0', (3, 4), 8),
    ('official', 'sequential', False, '1', (4, 4), 12)])
def test_psa_block_kernel_launches(emulated, block_kernel, monkeypatch: pytest.MonkeyPatch,
                                   variant: str, mode: str, tf32: bool, fused_m: str,
                                   kernels: tuple[int, int], total: int) -> None:
    """A training step's launches per block: the paper forms' kernels 3 forward (reduction, glue,
    apply pass) and 3 backward (reduction, glue, apply pass with the weight matrices' gradients
    in the same launch); PSA_p 3 forward (its spatial logits' reduction in the apply pass's
    cooperative launch) and the same 3 backward; PSA_s, where tensor cores take its value
    products (float32 with TF32 allowed), 3 forward (reduction, glue, then the value map's
    tiles, its softmax and the apply pass in one cooperative launch) and 4 backward (the
    paper's reduction; the map's tiles again, dq, dVl, dx's part Wa^T dVl and M = dVl x^T in
    one cooperative launch; glue; apply pass with the weights' gradients; with
    MMATTN_PSA_FUSED_M=0 M is a GEMM after that launch: 8); else 4 forward (reduction, glue,
    value softmax state, apply pass) and 4 backward (the paper's reduction, dq and dVl, glue,
    apply pass) with GEMMs between them (the value map forward, the map again, dx's part and M
    backward); and, in ``total``, the ATen operators the ops' C++ runs besides (each a launch
    on a GPU): at most 8 in all (issue 12) but for PSA_s on the GEMM path."""
    from torch.profiler import ProfilerActivity, profile
    monkeypatch.setenv('MMATTN_PSA_FUSED_M', fused_m)
    b = block(variant, mode, 32, 'reference', torch.float32)
    x = torch.randn(2, 32, 6, 4, dtype=torch.float32, requires_grad=True)
    with cudnn_tf32(tf32):
        start = emulated.emulated_launches()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = block_kernel(b, x)
            forward = emulated.emulated_launches() - start
            y.backward(torch.randn_like(y))
        backward = emulated.emulated_launches() - start - forward
    events = prof.events()
    aten = {op: aten_launches(events, f'{NAMESPACE}::psa_block_cuda_{op}')
            for op in ('fwd', 'bwd')}
    assert (forward, backward) == kernels
    assert forward + backward + aten['fwd'] + aten['bwd'] == total, aten


def forward_launches(emulated, block_kernel, b, x: Tensor) -> tuple[int, Tensor]:
    """The kernels a block's forward launches, and its output."""
    start = emulated.emulated_launches()
    y = block_kernel(b, x)
    return emulated.emulated_launches() - start, y


def test_psa_p_forward_in_one_cooperative_launch(emulated, block_kernel,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """PSA_p's spatial reduction and apply pass run in one cooperative launch, a grid-wide
    barrier between them (the emulation runs the grid's blocks at once): 3 forward launches.
    MMATTN_PSA_COOPERATIVE=0, or a batch whose grid would not be resident at once (9 images:
    the emulated device holds 8 blocks), takes two launches for them, with the same output
    (bitwise here: the same splits); float64, against the equations either way; another
    value is an error naming the variable."""
    def forward(b, x: Tensor) -> tuple[int, Tensor]:
        return forward_launches(emulated, block_kernel, b, x)

    monkeypatch.delenv('MMATTN_PSA_COOPERATIVE', raising=False)
    for layout in (torch.contiguous_format, torch.channels_last):
        b = block('official', 'parallel', 24, 'reference')
        x = torch.randn(2, 24, 7, 8, dtype=F64).contiguous(memory_format=layout)
        launches, y = forward(b, x)
        assert launches == 3
        monkeypatch.setenv('MMATTN_PSA_COOPERATIVE', '0')
        launches, y2 = forward(b, x)
        assert launches == 4 and torch.equal(y, y2)
        monkeypatch.delenv('MMATTN_PSA_COOPERATIVE')
    b = block('official', 'parallel', 8, 'reference')
    x = torch.randn(9, 8, 3, 4, dtype=F64)
    assert forward(b, x)[0] == 4
    check_matches(block_kernel, 'parallel', (9, 8, 3, 4), torch.contiguous_format)
    monkeypatch.setenv('MMATTN_PSA_COOPERATIVE', 'yes')
    with pytest.raises(RuntimeError, match="MMATTN_PSA_COOPERATIVE must be 0 or 1, got 'yes'"):
        forward(b, x)


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_s_value_map_in_the_forwards_tiles(emulated, block_kernel, layout: torch.memory_format,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PSA_s's forward after its glue in one cooperative launch that computes the value map's
    tiles itself (psa_value_tiles.cuh), here on scalar products in float64
    (MMATTN_PSA_VALUE_TILES=1): output and every gradient against the equations with one row
    (C = 2) and a 2-pixel map, channels past a 32-channel step (C = 24, 40), rows past a
    64-row tile (C = 160: 80 rows), pixels past a 64-pixel tile and splits of several tiles
    (20 x 20 at N = 2: 7 tiles, 4 splits); 3 forward launches, and the backward's map again,
    dq, dVl, dx's part Wa^T dVl and M = dVl x^T in one more cooperative launch (4 backward),
    M's tiles over runs of the pixels where the grid has more blocks than M tiles (the
    emulated device's 8 blocks: one image of 600 pixels, C = 24, in 3 runs of 224, 224 and 152
    pixels; two of 512 pixels, C = 48, in 2 runs of 256; two of C = 80 (M two tiles an image,
    the second 16 channels wide) and one of C = 160 (six tiles, two of rows, three of
    channels), 2 runs each; the other shapes in one). The kernels
    move 16-byte vectors: an odd pixel count, or x off a 16-byte boundary, takes the GEMM
    path (4 kernels each way), as do MMATTN_PSA_VALUE_TILES=0 and MMATTN_PSA_COOPERATIVE=0,
    with the same output and gradients up to rounding, and MMATTN_PSA_FUSED_M=0 takes M as a
    GEMM after the backward's launch (the same kernels, the same results); another value is an
    error naming the variable."""
    monkeypatch.setenv('MMATTN_PSA_VALUE_TILES', '1')
    for shape in [(1, 2, 2, 1), (2, 24, 7, 6), (2, 40, 9, 10), (3, 64, 3, 2), (2, 160, 20, 20),
                  (2, 24, 7, 5), (1, 24, 20, 30), (2, 48, 16, 32), (2, 80, 16, 32),
                  (1, 160, 24, 32)]:
        check_matches(block_kernel, 'sequential', shape, layout)
    b = block('official', 'sequential', 40, 'reference')
    x = torch.randn(2, 40, 9, 10, dtype=F64).contiguous(memory_format=layout)
    g = torch.randn_like(x)

    def step() -> tuple[tuple[int, int], list[Tensor]]:
        start = emulated.emulated_launches()
        xg = x.detach().requires_grad_()
        y = block_kernel(b, xg)
        forward = emulated.emulated_launches() - start
        b.zero_grad()
        y.backward(g)
        backward = emulated.emulated_launches() - start - forward
        return (forward, backward), [y, xg.grad] + [p.grad for p in b.parameters()]

    launches, outs = step()
    assert launches == (3, 4)
    for name, kernels in (('MMATTN_PSA_VALUE_TILES', (4, 4)), ('MMATTN_PSA_COOPERATIVE', (4, 4)),
                          ('MMATTN_PSA_FUSED_M', (3, 4))):
        with monkeypatch.context() as m:
            m.setenv(name, '0')
            launches, outs0 = step()
            assert launches == kernels, name
            for got, want in zip(outs, outs0):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    odd = torch.randn(2, 40, 9, 9, dtype=F64).contiguous(memory_format=layout)
    assert forward_launches(emulated, block_kernel, b, odd)[0] == 4
    x = torch.randn(2, 40, 9, 10, dtype=F64)
    buffer = torch.randn(x.numel() + 1, dtype=F64)
    off = buffer[1:].view(2, 9, 10, 40).permute(0, 3, 1, 2) \
        if layout == torch.channels_last else buffer[1:].view(x.shape)
    assert off.data_ptr() % 16 == 8 and off.is_contiguous(memory_format=layout)
    launches, y = forward_launches(emulated, block_kernel, b, off)
    assert launches == 4
    torch.testing.assert_close(y, equations(b, off), rtol=1e-10, atol=1e-10)
    monkeypatch.delenv('MMATTN_PSA_VALUE_TILES')
    assert forward_launches(emulated, block_kernel, b, x)[0] == 4  # float64: the GEMM's
    monkeypatch.setenv('MMATTN_PSA_VALUE_TILES', '2')
    with pytest.raises(RuntimeError, match="MMATTN_PSA_VALUE_TILES must be 0 or 1, got '2'"):
        forward_launches(emulated, block_kernel, b, x)
    monkeypatch.setenv('MMATTN_PSA_VALUE_TILES', '1')
    monkeypatch.setenv('MMATTN_PSA_FUSED_M', 'on')
    with pytest.raises(RuntimeError, match="MMATTN_PSA_FUSED_M must be 0 or 1, got 'on'"):
        step()


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_psa_s_value_tiles_tf32(emulated, block_kernel, layout: torch.memory_format) -> None:
    """float32 where PyTorch allows TF32 in cuDNN's convolutions (torch.backends.cudnn.allow_tf32,
    its default): the value map's tiles on TF32 warp products (3 forward launches; without
    TF32, 4: the GEMM path). TF32 rounds the products' inputs to
    float16's 10 mantissa bits, so the output and every gradient stay within twice the error
    of the eager reference in float16 (at C = 256: 2 tiles of 64 rows, 2 of 64 pixels,
    channels in 8 steps; the bf16/fp16 warp products: test_psa_release_kernels_low_precision,
    which takes them by default)."""
    b = block('official', 'sequential', 256, 'reference')
    x = torch.randn(2, 256, 10, 12).contiguous(memory_format=layout)
    assert forward_launches(emulated, block_kernel, b.float(), x)[0] == 4

    def in_layout(b, x: Tensor) -> Tensor:
        return block_kernel(b, x.contiguous(memory_format=layout))
    with cudnn_tf32(True):
        assert forward_launches(emulated, block_kernel, b.float(), x)[0] == 3
        check_release_low_precision(in_layout, 'sequential', (2, 256, 10, 12), torch.float32,
                                    bound=torch.float16)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_psa_s_weight_products_over_runs_of_pixels(block_kernel, dtype: torch.dtype) -> None:
    """M = dVl x^T on warp products (TF32 for float32 where allowed, bf16), one image of 768
    pixels and C = 64 (M one 32 x 64 tile) cut into 3 runs of 256 pixels for the emulated
    device's 8 blocks, the runs' tiles summed in float32 and rounded once: within twice the
    error of the eager reference in float16 (float32) or in its own dtype, in both layouts."""
    for layout in (torch.contiguous_format, torch.channels_last):
        def in_layout(b, x: Tensor) -> Tensor:
            return block_kernel(b, x.contiguous(memory_format=layout))
        with cudnn_tf32(True):
            check_release_low_precision(
                in_layout, 'sequential', (1, 64, 24, 32), dtype,
                bound=torch.float16 if dtype == torch.float32 else None)


def step_launches(emulated, block_kernel, variant: str, mode: str, dtype: torch.dtype) -> int:
    """Kernels and computing ATen operators of a block's forward + backward, weights and x in
    ``dtype``."""
    from torch.profiler import ProfilerActivity, profile
    b = block(variant, mode, 32, 'reference', torch.float32).to(dtype)
    x = torch.randn(2, 32, 6, 5, dtype=dtype, requires_grad=True)
    start = emulated.emulated_launches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        block_kernel(b, x).backward(torch.randn(2, 32, 6, 5, dtype=dtype))
    events = prof.events()
    return emulated.emulated_launches() - start + sum(
        aten_launches(events, f'{NAMESPACE}::psa_block_cuda_{op}') for op in ('fwd', 'bwd'))


@pytest.mark.parametrize('variant, mode', BLOCK_FORMS[1:])
def test_psa_block_kernel_low_precision_weights_convert_together(
        emulated, block_kernel, variant: str, mode: str) -> None:
    """A block whose weights are bf16 (a model cast to bf16) converts them to float32 for the
    kernels in one concatenation and one conversion, forward and backward, and the weights'
    gradients back to bf16 the same way: 6 launches more than float32's, whatever the number of
    weights (5-12), where a conversion for each gradient took 5-12 more. (float32 with TF32
    allowed: PSA_s's value products on tensor cores, as bf16's.)"""
    weights = psa_block_weights(block(variant, mode, 32, 'reference'))[0]
    assert len(weights) >= 5
    with cudnn_tf32(True):
        extra = (step_launches(emulated, block_kernel, variant, mode, torch.bfloat16)
                 - step_launches(emulated, block_kernel, variant, mode, torch.float32))
    assert extra == 6



def test_psa_block_kernel_gradients_leave_in_the_weights_layout(emulated) -> None:
    """Every weight's gradient leaves the backward dense in its weight's layout (the 1x1
    convolution from C/2 to C channels too, whose C x C/2 gradient is the transpose of the
    product the others are), so autograd's accumulation takes it as it is: a gradient in
    another layout is copied into the weight's, a launch per block and step."""
    for variant, mode in BLOCK_FORMS:
        weights, form, eps = psa_block_weights(block(variant, mode, 8, 'reference'))
        x = torch.randn(2, 8, 5, 3, dtype=F64)
        y, state = emulated.psa_block_cuda_fwd(x, weights, form, eps)
        _, grads = emulated.psa_block_cuda_bwd(torch.randn_like(y), x, state, weights, form,
                                               eps)
        assert len(grads) == len(weights)
        for w, g in zip(weights, grads):
            assert g.shape == w.shape and g.is_contiguous(), (variant, mode, tuple(w.shape))


ZERO_FILLS = ('aten::zeros', 'aten::zeros_like', 'aten::new_zeros', 'aten::fill_', 'aten::zero_')


@pytest.mark.parametrize('variant, mode', BLOCK_FORMS)
def test_psa_block_cuda_autograd_fills_nothing_for_the_state(
        emulated, block_kernel, cpu_kernels, variant: str, mode: str) -> None:
    """The C++ autograd of psa_block_cuda_fwd (psa_autograd.cpp), run on the emulated kernels
    registered as the op's CPU implementation: the forward's state outputs take no gradient, so
    the backward fills no zero tensor for them outside the ops (each a launch per block on a
    GPU; an H200 step launched 14-18 kernels per block against the ops' own 7-8), and the
    gradients are those of the same ops paired in Python."""
    from torch.profiler import ProfilerActivity, profile
    lib = torch.library.Library('mmattn', 'IMPL')
    try:
        lib.impl('psa_block_cuda_fwd', emulated.psa_block_cuda_fwd, 'CPU')
        lib.impl('psa_block_cuda_bwd', emulated.psa_block_cuda_bwd, 'CPU')
        b = block(variant, mode, 16, 'reference', torch.float32)
        weights, form, eps = psa_block_weights(b)
        x, g = torch.randn(2, 16, 5, 3), torch.randn(2, 16, 5, 3)
        xi = x.clone().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y, state = torch.ops.mmattn.psa_block_cuda_fwd(xi, weights, form, eps)
            y.backward(g)
        assert len(state) >= 5 and not any(t.requires_grad for t in state)

        def in_op(evt) -> bool:
            while evt is not None:
                if evt.name.endswith(('psa_block_cuda_fwd', 'psa_block_cuda_bwd')):
                    return True
                evt = evt.cpu_parent
            return False
        assert any(e.name.endswith('psa_block_cuda_bwd') for e in prof.events())
        fills = [e.name for e in prof.events() if e.name in ZERO_FILLS and not in_op(e)]
        assert not fills, fills
        ours = [xi.grad] + [p.grad.clone() for p in b.parameters()]
        paired = all_grads(block_kernel, b, x, g)
        for got, want in zip(ours, paired, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        lib._destroy()


def test_psa_block_backward_alerts_non_determinism(block_kernel) -> None:
    """The backward adds the weight gradients up with atomics: under
    torch.use_deterministic_algorithms(True) it raises, as PyTorch's own such ops do."""
    b = block('official', 'parallel', 8, 'reference', torch.float32)
    x = torch.randn(2, 8, 3, 4, requires_grad=True)
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        y = block_kernel(b, x)   # the forward is deterministic
        with pytest.raises(RuntimeError, match='psa_block_cuda_bwd.*atomics'):
            y.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_psa_block_kernel_state_shapes(emulated) -> None:
    """What the forward returns besides y has the shapes the fake implementation gives
    (torch.compile builds its graph from those) and nothing of x's size."""
    for variant, mode in BLOCK_FORMS:
        weights, form, eps = psa_block_weights(block(variant, mode, 8, 'reference'))
        bottleneck = weights[3].numel() if form == 3 else 0
        for dtype, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (F64, F64)):
            x = torch.randn(3, 8, 5, 2, dtype=dtype)
            y, state = emulated.psa_block_cuda_fwd(x, [w.to(dtype) for w in weights], form,
                                                   eps)
            assert [tuple(t.shape) for t in state] == \
                state_shapes(form, *x.shape, bottleneck=bottleneck)
            assert all(t.dtype == acc for t in state) and y.dtype == dtype


# ---------------------------------------------------------------- outlook attention
# (K, p, s, H, W, heads, d): unrolled K=3 and generic K, strides 1-3, even kernels, 1x1 maps,
# and K=7 with C=128, whose window rows exceed the shared-memory budget of grad_attn's kernel
EMULATED_GEOMETRIES = [(3, 1, 1, 5, 7, 2, 3), (3, 1, 2, 5, 7, 2, 4), (3, 1, 2, 1, 1, 1, 4),
                       (5, 2, 3, 7, 8, 2, 2), (2, 0, 2, 6, 4, 1, 3), (7, 3, 2, 5, 5, 2, 64)]


def check_outlook_matches(ops, batch: int, k: int, p: int, s: int, height: int, width: int,
                          heads: int, d: int, device: str = 'cpu') -> None:
    """The outlook forward and both gradients of ``ops`` (the emulated kernels, or
    ``torch.ops.mmattn``: ``outlook_fwd``, ``outlook_bwd``) on ``device`` against Eq. 4-5
    (paper_aggregate and autograd through it), float64, within 1e-12; and with
    ``softmax_scale``, the gradient of the logits L of attn = softmax(scale L) against
    autograd through Eq. 3-5 (logits_grad_truth), within 1e-10."""
    v, attn = outlook_inputs(batch, k, p, s, height, width, heads, d, device=device)
    torch.testing.assert_close(ops.outlook_fwd(v, attn, k, p, s),
                               paper_aggregate(v, attn, k, p, s), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(v)
    grad_v, grad_attn = ops.outlook_bwd(g, v, attn, k, p, s)
    vr, ar = v.clone().requires_grad_(), attn.clone().requires_grad_()
    paper_aggregate(vr, ar, k, p, s).backward(g)
    torch.testing.assert_close(grad_v, vr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_attn, ar.grad, rtol=1e-12, atol=1e-12)
    logits = attn.log().mul(3.0)
    _, grad_logits = ops.outlook_bwd(g, v, (logits * SCALE).softmax(-1), k, p, s, SCALE)
    _, truth = logits_grad_truth(v, logits, g, k, p, s)
    torch.testing.assert_close(grad_logits, truth, rtol=1e-10, atol=1e-10)


def test_outlook_kernels_match_equations(emulated) -> None:
    for geometry in EMULATED_GEOMETRIES:
        check_outlook_matches(emulated, 2, *geometry)


def test_outlook_kernel_ones_column(emulated) -> None:
    """outlook_fwd's ones_column (the block's backward): y's pixels C + 8 apart, the thread
    of a pixel's first pack writing (1, 0, ..., 0) after them."""
    check_ones_column(emulated.outlook_fwd)


def test_outlook_unpool_add_kernel(emulated) -> None:
    """The block's input gradient plus the pooling's backward (mmattn::outlook_unpool_add,
    CUDA); a map 2 bytes off its vector alignment takes the single-channel path."""
    check_unpool_add(emulated.outlook_unpool_add)
    from test_outlook_op import unpool_truth
    flat = torch.randn(2 * 6 * 6 * 16 + 1, dtype=torch.bfloat16)
    grad, pooled = flat[1:].view(2, 6, 6, 16), torch.randn(2, 3, 3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(emulated.outlook_unpool_add(grad, pooled, 2),
                               unpool_truth(grad, pooled, 2).to(torch.bfloat16))


def test_outlook_softmax_kernel(emulated) -> None:
    """The block's weights, softmax(scale L) a group of K^2 at a time (mmattn::outlook_softmax,
    CUDA): the unrolled K = 3 path and the any-K one."""
    check_softmax(emulated.outlook_softmax)


def test_outlook_kernels_logits_gradient(emulated) -> None:
    """outlook_bwd with softmax_scale (the block's backward): the logits' gradient in grad_attn's
    kernels, every emulated geometry (the K=7 one past the shared-memory budget: the global
    kernel, then PyTorch's softmax backward)."""
    check_logits_grad(emulated.outlook_bwd, EMULATED_GEOMETRIES)


@pytest.mark.parametrize('dtype, heads, d', [(torch.bfloat16, 6, 32), (torch.float16, 10, 16),
                                             (torch.bfloat16, 2, 48), (torch.bfloat16, 3, 3),
                                             (torch.bfloat16, 3, 250), (torch.float32, 6, 32)])
def test_outlook_kernels_logits_gradient_low_precision(emulated, dtype: torch.dtype, heads: int,
                                                       d: int) -> None:
    """The same in 16-bit types on the tensor-core kernel (heads of 16-48 channels, more heads
    than its 8 warps), the scalar one (3 channels a head, float32) and, at C = 750, past the
    shared-memory budget (the global kernel's grad_attn in float, then PyTorch's softmax
    backward in float: rounded once, as the others)."""
    check_logits_grad_half(emulated.outlook_bwd, dtype, heads, d)


def check_outlook_low_precision(ops, batch: int, k: int, p: int, s: int, height: int,
                                width: int, heads: int, d: int, dtype: torch.dtype,
                                device: str = 'cpu') -> None:
    """The outlook forward, both gradients and, with ``softmax_scale``, the logits' gradient of
    ``ops`` (check_outlook_matches') in ``dtype``: in fp16/bf16 every value within one rounding
    of Eq. 4-5 in float64 of the same 16-bit inputs (rounded_inputs_truth,
    logits_grad_rounded_truth, assert_rounded_once), what float32 sums of them rounded once
    give. (Not against the PyTorch reference in the same dtype, which rounds its window
    products first: at 1 random geometry in 1,692, K = 5 with one head of 3 channels on 2 x 7
    pixels in bf16, the kernels' error against the float64 result of the unrounded inputs was
    2.6 times the reference's, whose roundings had by chance cancelled the inputs'; the
    kernels' output was the float64 result of its inputs rounded once.) Float32 within 1e-5
    of float64 (the reference's BLAS sums in another order, with FMA: at K=5 its error is a
    third of the kernel's, both about 1e-6)."""
    v, attn = outlook_inputs(batch, k, p, s, height, width, heads, d, device=device)
    g = torch.randn_like(v)
    vh, ah, gh = v.to(dtype), attn.to(dtype), g.to(dtype)
    ours = dict(zip(('y', 'v', 'attn'), (ops.outlook_fwd(vh, ah, k, p, s),
                                         *ops.outlook_bwd(gh, vh, ah, k, p, s))))
    ours['logits'] = ops.outlook_bwd(gh, vh, ah, k, p, s, SCALE)[1]
    if dtype != torch.float32:
        truth = rounded_inputs_truth(v, attn, g, k, p, s, dtype)
        truth['logits'] = logits_grad_rounded_truth(ah, *truth['attn'], SCALE)
        for name, (exact, error) in truth.items():
            assert_rounded_once(name, ours[name], exact, error, dtype)
        return
    vr, ar = v.clone().requires_grad_(), attn.clone().requires_grad_()
    truth = paper_aggregate(vr, ar, k, p, s)
    truth.backward(g)
    logits, _ = logits_grad_rounded_truth(attn, ar.grad, torch.zeros_like(ar.grad), SCALE)
    for name, t in (('y', truth.detach()), ('v', vr.grad), ('attn', ar.grad),
                    ('logits', logits)):
        assert ours[name].dtype == dtype, name
        assert (ours[name].double() - t).abs().max().item() <= 1e-5, name


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('d', [32, 2, 3])
@pytest.mark.parametrize('k, p, s', [(3, 1, 2), (5, 2, 2)])
def test_outlook_kernels_low_precision(emulated, dtype: torch.dtype, d: int, k: int, p: int,
                                       s: int) -> None:
    """The vectorised channel packs (16 bytes a thread on the unrolled K=3 path, 8 for other K,
    where the head size allows, else single channels), by check_outlook_low_precision's rule."""
    check_outlook_low_precision(emulated, 1, k, p, s, 14, 12, 3, d, dtype)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('heads, d', [(10, 16), (2, 48), (6, 32)])
def test_outlook_grad_attn_on_tensor_cores(emulated, dtype: torch.dtype, heads: int,
                                           d: int) -> None:
    """grad_attn's tensor-core kernel (16-bit types, K = 3, heads of a multiple of 16
    channels): more heads than the block's 8 warps, 1-3 steps of 16 channels, windows over the
    padding at every edge; 2 x 4 x 3 windows (whole groups of a block's 4) and 2 x 3 x 3 (a
    group across two images, the last one short); each value within one rounding of the
    float64 result of the same 16-bit inputs (rounded_inputs_truth). A map 2 bytes off its
    alignment takes the scalar kernel, as accurate."""
    k, p, s = 3, 1, 2
    for height, width in ((7, 6), (5, 5)):
        v, attn = outlook_inputs(2, k, p, s, height, width, heads, d)
        g = torch.randn_like(v)
        exact, error = rounded_inputs_truth(v, attn, g, k, p, s, dtype)['attn']
        vh, ah, gh = v.to(dtype), attn.to(dtype), g.to(dtype)
        _, ours = emulated.outlook_bwd(gh, vh, ah, k, p, s)
        assert_rounded_once('attn', ours, exact, error, dtype)
        shifted = torch.empty(vh.numel() + 1, dtype=dtype)[1:].view(vh.shape).copy_(vh)
        _, ours = emulated.outlook_bwd(gh, shifted, ah, k, p, s)
        assert_rounded_once('attn (shifted)', ours, exact, error, dtype)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('case', TENSOR_CORE_GATHERS)
def test_outlook_gathers_on_tensor_cores(emulated, dtype: torch.dtype, case: tuple[int, ...],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """y and grad_v on the tensor-core gather (MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1; 16-bit
    types, K = 3, s >= 2, heads of a multiple of 16 channels: a tile's window products, then
    their fold), against float64; a map 2 bytes off its alignment, float32 and stride 1 take
    the scalar gather."""
    monkeypatch.setenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', '1')
    heads, d, k, p, s, height, width = case
    v, attn = outlook_inputs(2, k, p, s, height, width, heads, d, dtype)
    assert emulated.outlook_gather_tensor_cores(v, attn, k, p, s)
    shifted = torch.empty(v.numel() + 1, dtype=dtype)[1:].view(v.shape)
    assert not emulated.outlook_gather_tensor_cores(shifted, attn, k, p, s)
    assert not emulated.outlook_gather_tensor_cores(v.float(), attn.float(), k, p, s)
    one, attn_one = outlook_inputs(1, 3, 1, 1, 5, 4, heads, d, dtype)
    assert not emulated.outlook_gather_tensor_cores(one, attn_one, 3, 1, 1)
    check_gathers_half(emulated.outlook_fwd, emulated.outlook_bwd, dtype, case)


def test_outlook_tensor_core_gather_switch(emulated, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gathers take the scalar kernel unless MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1 (both as
    accurate); another value than 0 or 1 is an error that names it."""
    v, attn = outlook_inputs(1, 3, 1, 2, 9, 8, 2, 16, torch.bfloat16)
    monkeypatch.delenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', raising=False)
    assert not emulated.outlook_gather_tensor_cores(v, attn, 3, 1, 2)
    check_gathers_half(emulated.outlook_fwd, emulated.outlook_bwd, torch.bfloat16,
                       TENSOR_CORE_GATHERS[0])
    monkeypatch.setenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', '0')
    assert not emulated.outlook_gather_tensor_cores(v, attn, 3, 1, 2)
    monkeypatch.setenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', '1')
    assert emulated.outlook_gather_tensor_cores(v, attn, 3, 1, 2)
    monkeypatch.setenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', 'yes')
    with pytest.raises(RuntimeError, match="MMATTN_OUTLOOK_TENSOR_CORE_GATHER must be 0 or 1"):
        emulated.outlook_fwd(v, attn, 3, 1, 2)


def window_means(x: Tensor, s: int) -> Tensor:
    """VOLO's pooling written out: cell (i, j) of x (B, H, W, C) is the mean of the pixels
    (y, x) with s i <= y < s i + s, s j <= x < s j + s inside the image (ceil mode: the last row
    and column of cells may hold fewer)."""
    b, height, width, c = x.shape
    rows, cols = -(-height // s), -(-width // s)
    out = x.new_empty(b, rows, cols, c)
    for i in range(rows):
        for j in range(cols):
            out[:, i, j] = x[:, s * i:s * i + s, s * j:s * j + s].mean(dim=(1, 2))
    return out


@pytest.mark.parametrize('dtype', [F64, torch.float32, torch.bfloat16, torch.float16])
def test_outlook_pool_kernel_matches_the_window_means(emulated, dtype: torch.dtype) -> None:
    """The block's s x s average pooling (mmattn::outlook_pool, CUDA): each cell the mean of
    its window's pixels inside the image, partial windows at the bottom and right edges too;
    16-byte channel vectors where C and the pointers allow (C = 24, 192), single channels
    elsewhere (C = 5, and a map 2 bytes off its vector alignment). Float64 exact to rounding;
    the other dtypes as PyTorch's own avg_pool2d (ceil mode) in that dtype rounds, within one
    unit in the last place of the output."""
    import torch.nn.functional as F
    cases = [((2, 28, 28, 192), 2), ((2, 7, 9, 24), 2), ((1, 5, 6, 5), 3), ((2, 4, 3, 24), 1),
             ((1, 1, 1, 8), 2), ((3, 9, 2, 16), 4)]
    for shape, s in cases:
        x64 = torch.randn(shape, dtype=F64)
        truth = window_means(x64, s)
        x = x64.to(dtype)
        ours = emulated.outlook_pool(x, s)
        assert ours.dtype == dtype and ours.shape == truth.shape, (shape, s)
        if dtype == F64:
            torch.testing.assert_close(ours, truth, rtol=1e-14, atol=1e-14)
            continue
        ref = F.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True).permute(0, 2, 3, 1)
        ulp = torch.finfo(dtype).eps * truth.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((ours.double() - ref.double()).abs() <= ulp + 1e-30).all(), (shape, s)
    # off the 16-byte alignment: the single-channel path
    flat = torch.randn(2 * 6 * 6 * 16 + 1, dtype=torch.bfloat16)
    x = flat[1:].view(2, 6, 6, 16)
    torch.testing.assert_close(emulated.outlook_pool(x, 2),
                               window_means(x.double(), 2).to(torch.bfloat16))


def test_outlook_pool_kernel_errors_and_fake(emulated) -> None:
    """Clear errors for bad input; the fake (torch.compile's) shape is ceil(H / s) x ceil(W / s)."""
    with pytest.raises(RuntimeError, match='x must be 4-D'):
        emulated.outlook_pool(torch.randn(3, 4, 5), 2)
    with pytest.raises(RuntimeError, match=r'stride must be in \[1, 64\], got 0'):
        emulated.outlook_pool(torch.randn(1, 4, 4, 2), 0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out = torch.ops.mmattn.outlook_pool(torch.empty(2, 7, 9, 24), 2)
    assert tuple(out.shape) == (2, 4, 5, 24)


# ---------------------------------------------------------------- column sums
@pytest.mark.parametrize('shape, covers', COLUMN_SHAPES)
@pytest.mark.parametrize('dtype', [F64, torch.float32, torch.bfloat16, torch.float16])
def test_column_sum_kernels_match_definitions(emulated, shape: tuple[int, ...], covers: str,
                                              dtype: torch.dtype) -> None:
    check_column_sums(emulated.bias_grad, emulated.layer_norm_param_grads, shape, dtype)


def test_column_sum_kernels_edges_and_launches(emulated) -> None:
    check_column_sums_edges(emulated.bias_grad, emulated.layer_norm_param_grads)
    grad, x, mean, rstd = layer_norm_inputs((300, 64), torch.bfloat16)
    with pytest.raises(RuntimeError, match='mean and rstd must hold one floating-point value '
                                           r'per row \(300\), got 299 values of Float'):
        emulated.layer_norm_param_grads(grad, x, mean[:299], rstd)
    # statistics in grad's dtype (CPU's LayerNorm keeps bf16 ones): read in the accumulation type
    bf16 = (mean.to(torch.bfloat16), rstd.to(torch.bfloat16))
    got = emulated.layer_norm_param_grads(grad, x, *bf16)
    want = emulated.layer_norm_param_grads(grad, x, *(t.float() for t in bf16))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a pass over the rows and the sum of its blocks' partial sums: two launches a call
    for call in (lambda: emulated.bias_grad(grad),
                 lambda: emulated.layer_norm_param_grads(grad, x, mean, rstd)):
        start = emulated.emulated_launches()
        call()
        assert emulated.emulated_launches() - start == 2


def test_column_sums_past_a_grids_tiles(emulated) -> None:
    """More columns than 65535 tiles of 256 threads take (an odd width: single elements):
    ATen's sums (one row: each sum is the row's value, and Σ g x̂ with x = g, mean 0, rstd 1
    its square, exact in bf16)."""
    c = 65535 * 256 + 1
    g = (torch.arange(c, dtype=torch.float32) % 251 - 125).to(torch.bfloat16).view(1, c)
    assert torch.equal(emulated.bias_grad(g), g[0])
    ones, zeros = torch.ones(1, 1), torch.zeros(1, 1)
    dw, db = emulated.layer_norm_param_grads(g, g, zeros, ones)
    assert torch.equal(db, g[0]) and torch.equal(dw, (g[0].float() ** 2).to(torch.bfloat16))
