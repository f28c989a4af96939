"""The fused outlook-attention kernels (``mmattn::outlook_fwd`` / ``outlook_bwd``) against Eq. 4-5
of arXiv 2106.13112.

The reference here is written from the equations with explicit loops over windows and window
positions (``paper_aggregate``); the C++ CPU kernel runs here, the CUDA kernel (same index code,
``mmattn/ops/csrc/outlook.h``) in the ``cuda``-marked tests on a machine with a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mmattn.analysis import saved_bytes
from mmattn.layers import OutlookAttention
from mmattn.ops import KernelUnavailableError, outlook_attention, outlook_attention_reference

F64 = torch.float64
# (K, p, s, H, W, heads, d): "same" windows (K = 2p + 1, any size), and geometries that tile
# only some sizes (even kernel, no padding)
GEOMETRIES = [(3, 1, 1, 5, 7, 2, 3), (3, 1, 2, 5, 7, 2, 3), (3, 1, 2, 1, 1, 1, 4),
              (3, 1, 1, 2, 1, 3, 2), (5, 2, 2, 6, 9, 1, 5), (5, 2, 3, 7, 8, 2, 2),
              (3, 0, 1, 4, 6, 2, 2), (2, 0, 2, 6, 4, 1, 3), (3, 1, 2, 28, 28, 6, 4)]


def grid(n: int, k: int, p: int, s: int) -> int:
    return (n + 2 * p - k) // s + 1


def inputs(b: int, k: int, p: int, s: int, height: int, width: int, heads: int, d: int,
           dtype: torch.dtype = F64, device: str = 'cpu') -> tuple[Tensor, Tensor]:
    v = torch.randn(b, height, width, heads * d, dtype=F64)
    h, w = grid(height, k, p, s), grid(width, k, p, s)
    attn = torch.randn(b, h, w, heads, k * k, k * k, dtype=F64).mul(2).softmax(-1)
    return v.to(device, dtype), attn.to(device, dtype)


def paper_aggregate(v: Tensor, attn: Tensor, k: int, p: int, s: int) -> Tensor:
    """Eq. 4: window (i, j) has positions m = a*K + b on pixels (s*i - p + a, s*j - p + b) (zero
    outside the image); its output at m is sum_n attn[i, j, head, m, n] V[pixel n].
    Eq. 5: every pixel sums the window outputs of the positions that land on it."""
    b, height, width, c = v.shape
    h, w, heads = attn.shape[1:4]
    d = c // heads
    y = torch.zeros_like(v, dtype=F64)
    for i in range(h):
        for j in range(w):
            pix = [(s * i - p + m // k, s * j - p + m % k) for m in range(k * k)]
            inside = [0 <= u < height and 0 <= t < width for u, t in pix]
            window = torch.stack([v[:, u, t].double() if ok else
                                  torch.zeros(b, c, dtype=F64, device=v.device)
                                  for (u, t), ok in zip(pix, inside)], 1)     # B, K^2, C
            for head in range(heads):
                ch = slice(head * d, (head + 1) * d)
                out = attn[:, i, j, head].double() @ window[:, :, ch]          # B, K^2, d
                for m, ((u, t), ok) in enumerate(zip(pix, inside)):
                    if ok:
                        y[:, u, t, ch] += out[:, m]
    return y


def grads(fn, v: Tensor, attn: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    v, attn = v.detach().requires_grad_(), attn.detach().requires_grad_()
    fn(v, attn).backward(g)
    return v.grad, attn.grad


U32 = 2.0 ** -23   # float32's unit roundoff, doubled: tensor cores' float32 accumulation need
                   # not round to nearest


def window_terms(k: int, s: int) -> int:
    """The products a value of y or grad_v sums: K^2 positions of each of the at most
    ceil(K/s)^2 windows that cover a pixel."""
    return k * k * ((k + s - 1) // s) ** 2


def rounded_inputs_truth(v: Tensor, attn: Tensor, g: Tensor, k: int, p: int, s: int,
                         dtype: torch.dtype) -> dict[str, tuple[Tensor, Tensor]]:
    """Eq. 4-5 and both gradients (of sum(g * y)) in float64 of ``v``, ``attn``, ``g`` rounded
    to ``dtype``, the kernels' own inputs, exactly: for 'y', 'v' (grad_v) and 'attn'
    (grad_attn), the exact value and how far a float32 sum of its products (exact: 16-bit x
    16-bit fits float32's 24 bits) may lie from it in any order, (terms - 1) U32 sum|products|
    (Higham's bound; the magnitudes are the same equations on |v|, |attn|, |g|; window_terms
    products for y and grad_v, the head's d channels for grad_attn)."""
    d = v.shape[-1] // attn.shape[3]
    v, attn, g = (t.to(dtype).double() for t in (v, attn, g))
    vr, ar = v.clone().requires_grad_(), attn.clone().requires_grad_()
    y = paper_aggregate(vr, ar, k, p, s)
    y.backward(g)
    vm, am = v.abs().requires_grad_(), attn.abs().requires_grad_()
    magnitude = paper_aggregate(vm, am, k, p, s)
    magnitude.backward(g.abs())
    terms = window_terms(k, s)
    return {'y': (y.detach(), (terms - 1) * U32 * magnitude.detach()),
            'v': (vr.grad, (terms - 1) * U32 * vm.grad),
            'attn': (ar.grad, (d - 1) * U32 * am.grad)}


def assert_rounded_once(name: str, ours: Tensor, exact: Tensor, error: Tensor,
                        dtype: torch.dtype) -> None:
    """``ours`` is in ``dtype`` and every value is a float32 result within ``error`` of
    ``exact`` rounded to ``dtype`` once: within ``error`` plus half the dtype's spacing at
    |exact| + error (on the CPU: torch.nextafter there takes every dtype)."""
    assert ours.dtype == dtype, (name, ours.dtype)
    ours, exact, error = ours.cpu(), exact.cpu(), error.cpu()
    top = (exact.abs() + error).to(dtype)
    spacing = torch.nextafter(top, torch.full_like(top, float('inf'))).double() - top.double()
    err = (ours.double() - exact).abs()
    excess = err - error - spacing / 2
    assert excess.max().item() <= 0, (name, excess.max().item(), err.max().item())


def kernel_fn(k: int, p: int, s: int, backend: str):
    return lambda v, a: outlook_attention(v, a, kernel_size=k, padding=p, stride=s,
                                          backend=backend)


def check_kernel(device: str, backend: str) -> None:
    """Forward and both gradients in float64 against the equations, every geometry."""
    for k, p, s, height, width, heads, d in GEOMETRIES:
        v, attn = inputs(2, k, p, s, height, width, heads, d, device=device)
        fn = kernel_fn(k, p, s, backend)
        ref = paper_aggregate(v, attn, k, p, s)
        torch.testing.assert_close(fn(v, attn), ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(v)
        ours = grads(fn, v, attn, g)
        auto = grads(lambda v_, a_: paper_aggregate(v_, a_, k, p, s), v, attn, g)
        for name, a, b in zip(('v', 'attn'), ours, auto):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def check_half(device: str, backend: str, dtype: torch.dtype, batch: int = 2,
               size: int = 14) -> None:
    """fp16/bf16: the output and both gradients each within one rounding of Eq. 4-5 in float64
    of the same 16-bit inputs (rounded_inputs_truth: float32 sums rounded once); float32:
    within 1e-5 of float64 (the reference's BLAS uses FMA, a portable build of the kernel may
    not, so their float32 errors differ by a small factor). VOLO-D1's first stage's outlook
    attention (K = 3, p = 1, s = 2, 6 heads of 32 channels) on ``batch`` size x size maps."""
    k, p, s = 3, 1, 2
    v, attn = inputs(batch, k, p, s, size, size, 6, 32, device=device)
    g = torch.randn_like(v)
    fn = kernel_fn(k, p, s, backend)
    vh, ah, gh = v.to(dtype), attn.to(dtype), g.to(dtype)
    ours = dict(zip(('y', 'v', 'attn'), (fn(vh, ah), *grads(fn, vh, ah, gh))))
    if dtype == torch.float32:
        truth = outlook_attention_reference(v, attn, kernel_size=k, padding=p, stride=s)
        truth_g = grads(kernel_fn(k, p, s, 'reference'), v, attn, g)
        for name, t in zip(('y', 'v', 'attn'), (truth, *truth_g)):
            assert ours[name].dtype == dtype, name
            torch.testing.assert_close(ours[name].double(), t, rtol=1e-5, atol=1e-5, msg=name)
        return
    for name, (exact, error) in rounded_inputs_truth(v, attn, g, k, p, s, dtype).items():
        assert_rounded_once(name, ours[name], exact, error, dtype)


# The tensor-core gathers' cases (16-bit types, K = 3, s >= 2, heads of a multiple of 16
# channels): (heads, d, K, p, s, H, W)
TENSOR_CORE_GATHERS = [
    (2, 32, 3, 1, 2, 19, 13),   # 3 x 2 tiles of 8 x 8 pixels, the last ones cut; padding
    (3, 16, 3, 0, 3, 10, 17),   # s = 3: rows and columns past the last window (zero)
    (10, 48, 3, 1, 2, 9, 8),    # more heads than a block's 8 warps, 3 steps of 16 a head
    (1, 16, 3, 1, 2, 1, 1)]


def check_gathers_half(fwd, bwd, dtype: torch.dtype, case: tuple[int, ...],
                       device: str = 'cpu') -> None:
    """y (with the ones column) and grad_v of ``outlook_fwd`` / ``outlook_bwd`` in a 16-bit
    dtype, each value within one rounding of Eq. 4-5 in float64 of the same inputs
    (rounded_inputs_truth), for the maps and for copies 2 bytes off their 16-byte alignment."""
    heads, d, k, p, s, height, width = case
    v, attn = inputs(2, k, p, s, height, width, heads, d, device=device)
    g = torch.randn_like(v)
    truth = rounded_inputs_truth(v, attn, g, k, p, s, dtype)
    vh, ah, gh = v.to(dtype), attn.to(dtype), g.to(dtype)

    def shifted(t: Tensor) -> Tensor:
        return torch.empty(t.numel() + 1, dtype=dtype, device=device)[1:].view(t.shape).copy_(t)

    ones = torch.zeros(8, dtype=dtype, device=device)
    ones[0] = 1
    for vi, gi in ((vh, gh), (shifted(vh), shifted(gh))):
        y = fwd(vi, ah, k, p, s, True)
        assert_rounded_once('y', y[..., :-8], *truth['y'], dtype)
        assert torch.equal(y[..., -8:], ones.expand(*v.shape[:3], 8))
        grad_v, _ = bwd(gi, vi, ah, k, p, s)
        assert_rounded_once('v', grad_v, *truth['v'], dtype)


SCALE = 0.37   # softmax_scale in the logits tests (VOLO's is d ** -0.5)


def logits_grad_truth(v: Tensor, logits: Tensor, g: Tensor, k: int, p: int, s: int,
                      scale: float = SCALE) -> tuple[Tensor, Tensor]:
    """Gradients of sum(g * y) for y = Eq. 4-5 with attn = softmax(scale * logits) (Eq. 3) in
    float64, by autograd through the equations: (grad v, grad logits)."""
    vr = v.detach().double().requires_grad_()
    lr = logits.detach().double().requires_grad_()
    paper_aggregate(vr, (lr * scale).softmax(-1), k, p, s).backward(g.double())
    return vr.grad, lr.grad


def check_logits_grad(bwd, geometries: list, device: str = 'cpu') -> None:
    """``outlook_bwd`` (``bwd``) with ``softmax_scale``: its second output is the gradient of
    the logits L of attn = softmax(scale L), in float64 against autograd through Eq. 3-5,
    every geometry; the first, v's gradient, as without it."""
    for k, p, s, height, width, heads, d in geometries:
        v, attn = inputs(2, k, p, s, height, width, heads, d, device=device)
        logits = attn.log().mul(3.0)
        attn = (logits * SCALE).softmax(-1)
        g = torch.randn_like(v)
        grad_v, grad_l = bwd(g, v, attn, k, p, s, SCALE)
        truth_v, truth_l = logits_grad_truth(v, logits, g, k, p, s)
        torch.testing.assert_close(grad_l, truth_l, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad_v, truth_v, rtol=1e-10, atol=1e-10)


def logits_grad_rounded_truth(attn: Tensor, grad_attn: Tensor, grad_attn_error: Tensor,
                              scale: float) -> tuple[Tensor, Tensor]:
    """The logits' gradient scale A (G - sum_q A G) (Eq. 3's softmax backward) in float64 of
    A = ``attn`` and G = ``grad_attn``, and how far a float32 computation of it may lie from
    that, from a G within ``grad_attn_error``: that error carried through, plus K^2 + 4
    float32 roundings of its terms (the K^2-term sum, a product, a difference, the products
    by A and by scale, scale's own rounding to float32)."""
    a = attn.double()
    exact = scale * a * (grad_attn - (a * grad_attn).sum(-1, keepdim=True))
    carried = scale * a * (grad_attn_error + (a * grad_attn_error).sum(-1, keepdim=True))
    size = grad_attn.abs() + grad_attn_error
    rounding = (a.shape[-1] + 4) * U32 * scale * a * (size + (a * size).sum(-1, keepdim=True))
    return exact, carried + rounding


def check_logits_grad_half(bwd, dtype: torch.dtype, heads: int, d: int,
                           device: str = 'cpu') -> None:
    """The logits' gradient in ``dtype`` (K=3, s=2) of 16-bit inputs: within one rounding
    (assert_rounded_once) of scale A (G - sum_q A G) in float64 of the same inputs, G being
    grad_attn (rounded_inputs_truth), with the float32 computation's error
    (logits_grad_rounded_truth); float32 within 1e-5 of the float64 gradient of the unrounded
    inputs."""
    k, p, s = 3, 1, 2
    v, attn = inputs(2, k, p, s, 9, 10, heads, d, device=device)
    logits = attn.log().mul(3.0)
    g = torch.randn_like(v)
    vh, lh, gh = v.to(dtype), logits.to(dtype), g.to(dtype)
    ah = (lh * SCALE).softmax(-1)
    _, ours = bwd(gh, vh, ah, k, p, s, SCALE)
    if dtype == torch.float32:
        _, truth = logits_grad_truth(v, logits, g, k, p, s)
        assert ours.dtype == dtype and (ours.double() - truth).abs().max().item() <= 1e-5
        return
    grad_attn, error = rounded_inputs_truth(vh, ah, gh, k, p, s, dtype)['attn']
    assert_rounded_once('logits', ours, *logits_grad_rounded_truth(ah, grad_attn, error, SCALE),
                        dtype)


def softmax_truth(logits: Tensor, k: int, scale: float) -> Tensor:
    """Eq. 3's normalisation in float64: each group of K^2 consecutive logits L as
    exp(scale L - max) / sum over the group of exp(scale L - max)."""
    t = logits.double().reshape(-1, k * k) * scale
    e = (t - t.max(-1, keepdim=True).values).exp()
    return (e / e.sum(-1, keepdim=True)).view(logits.shape)


def check_softmax(op, device: str = 'cpu') -> None:
    """``mmattn::outlook_softmax`` (``op``) against Eq. 3 in float64 (K = 3, the unrolled path,
    and 2 and 5; logits up to 400 after scaling, past where exp overflows without its maximum
    subtracted), and in 16-bit types and float32 within twice PyTorch's error in that dtype
    (``softmax(scale * L)``); the output has the logits' shape and dtype."""
    # (K = 3: 432 groups, a whole tile of 256 and part of one, then 259 groups, a tile's tail
    # of 27 logits that no vector holds whole, then a view off the vectors' alignment)
    for k, shape in ((3, (2, 3, 4, 2 * 81)), (3, (259, 9)), (3, (31, 9)), (2, (5, 16)),
                     (5, (1, 2, 2, 75))):
        logits = torch.randn(shape, dtype=F64, device=device) * 30
        if shape == (31, 9):
            logits = torch.randn(31 * 9 + 1, dtype=F64, device=device)[1:].view(shape) * 30
        truth = softmax_truth(logits, k, SCALE * 30)
        out = op(logits, k, SCALE * 30)
        assert out.shape == logits.shape and out.dtype == F64
        torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            low = logits.to(dtype) / 30
            if shape == (31, 9):   # (off the alignment in this dtype too)
                low = torch.empty(31 * 9 + 1, dtype=dtype, device=device)[1:].view(shape)
                low.copy_(logits / 30)
            truth = softmax_truth(low, k, SCALE)
            ref = (low.reshape(-1, k * k) * SCALE).softmax(-1)
            out = op(low, k, SCALE)
            assert out.dtype == dtype
            bound = 2 * (ref.double() - truth.view(-1, k * k)).abs().max().item() + 1e-7
            assert (out.double() - truth).abs().max().item() <= bound, (k, dtype)


def unpool_truth(grad: Tensor, pooled: Tensor, s: int) -> Tensor:
    """grad plus the backward of VOLO's s x s pooling (ceil mode) written out, in float64:
    every pixel of cell (i, j), the pixels (y, x) with s i <= y < s i + s, s j <= x < s j + s
    inside the image, gets pooled[i, j] over the number of those pixels."""
    out = grad.double().clone()
    height, width = grad.shape[1], grad.shape[2]
    for i in range(pooled.shape[1]):
        for j in range(pooled.shape[2]):
            cell = out[:, s * i:s * i + s, s * j:s * j + s]
            cell += pooled[:, i, j, None, None].double() / (cell.shape[1] * cell.shape[2])
    return out


def check_unpool_add(op, device: str = 'cpu') -> None:
    """``mmattn::outlook_unpool_add`` (``op``): float64 against :func:`unpool_truth` (cells
    cut by the bottom and right edges, 16-byte vectors (C = 24, 192) and single channels (C =
    5), stride 1), and the adjoint of the pooling: <pool(x), p> = <x, unpool(0, p)>; other
    dtypes within their rounding of the float64 result."""
    cases = [((2, 28, 28, 192), 2), ((2, 7, 9, 24), 2), ((1, 5, 6, 5), 3), ((2, 4, 3, 24), 1),
             ((1, 1, 1, 8), 2), ((3, 9, 2, 16), 4)]
    for shape, s in cases:
        grad = torch.randn(shape, dtype=F64, device=device)
        pooled = torch.randn(shape[0], -(-shape[1] // s), -(-shape[2] // s), shape[3],
                             dtype=F64, device=device)
        out = op(grad, pooled, s)
        assert out.shape == grad.shape and out.dtype == F64, (shape, s)
        torch.testing.assert_close(out, unpool_truth(grad, pooled, s), rtol=1e-14, atol=1e-14)
        x = torch.randn_like(grad)
        pooled_x = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), s, s, ceil_mode=True)
        lhs = (pooled_x.permute(0, 2, 3, 1) * pooled).sum()
        rhs = (x * op(torch.zeros_like(grad), pooled, s)).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g, p = grad.to(dtype), pooled.to(dtype)
            truth = unpool_truth(g, p, s)
            out = op(g, p, s)
            assert out.dtype == dtype
            bound = torch.finfo(dtype).eps * truth.abs() + 1e-6 * grad.abs().max()
            assert ((out.double() - truth).abs() <= bound).all(), (shape, s, dtype)


def check_ones_column(op, device: str = 'cpu') -> None:
    """``outlook_fwd`` (``op``) with ``ones_column``: y as without it, then 8 channels (1, 0,
    ..., 0) at every pixel; in float64 (every geometry) and bf16 (K = 3: the 16-byte packs)."""
    for k, p, s, height, width, heads, d in GEOMETRIES + [(3, 1, 2, 6, 5, 2, 16)]:
        for dtype in (F64, torch.bfloat16):
            v, attn = inputs(2, k, p, s, height, width, heads, d, dtype, device)
            y = op(v, attn, k, p, s, True)
            assert y.shape == (*v.shape[:3], v.shape[3] + 8) and y.dtype == dtype
            torch.testing.assert_close(y[..., :-8], op(v, attn, k, p, s), rtol=0, atol=0)
            ones = torch.zeros(8, dtype=dtype, device=device)
            ones[0] = 1
            assert torch.equal(y[..., -8:], ones.expand(*v.shape[:3], 8))


def kept(fn, v: Tensor, attn: Tensor) -> int:
    """Bytes autograd keeps for the backward of ``fn(v, attn)`` beyond the inputs."""
    return saved_bytes(fn, v.detach().requires_grad_(), attn.detach().requires_grad_())


# ---------------------------------------------------------------- the reference itself
def test_reference_matches_equations() -> None:
    for k, p, s, height, width, heads, d in GEOMETRIES[:-1]:
        v, attn = inputs(2, k, p, s, height, width, heads, d)
        torch.testing.assert_close(
            outlook_attention_reference(v, attn, kernel_size=k, padding=p, stride=s),
            paper_aggregate(v, attn, k, p, s), rtol=1e-12, atol=1e-12)


def test_missing_kernel_is_an_error_not_a_fallback() -> None:
    v, attn = inputs(1, 3, 1, 1, 4, 4, 1, 2)
    from mmattn.ops import extension
    if extension.has_kernel('outlook_fwd', 'cpu'):
        pytest.skip('a kernel build is loaded in this process')
    with pytest.raises(KernelUnavailableError, match="backend='cpu'.*MMATTN_JIT=1"):
        outlook_attention(v, attn, kernel_size=3, padding=1, stride=1, backend='cpu')


# ---------------------------------------------------------------- the C++ CPU kernel
def test_cpu_kernel_matches_equations(cpu_kernels: str) -> None:
    check_kernel('cpu', 'cpu')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_low_precision(cpu_kernels: str, dtype: torch.dtype) -> None:
    check_half('cpu', 'cpu', dtype)


@pytest.mark.parametrize('s', [1, 2])
def test_cpu_kernel_gradcheck(cpu_kernels: str, s: int) -> None:
    v, attn = inputs(1, 3, 1, s, 3, 5, 2, 2)
    assert torch.autograd.gradcheck(kernel_fn(3, 1, s, 'cpu'),
                                     (v.requires_grad_(), attn.requires_grad_()))


def test_cpu_kernel_logits_gradient(cpu_kernels: str) -> None:
    check_logits_grad(torch.ops.mmattn.outlook_bwd, GEOMETRIES)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_logits_gradient_low_precision(cpu_kernels: str, dtype: torch.dtype) -> None:
    check_logits_grad_half(torch.ops.mmattn.outlook_bwd, dtype, 6, 32)


def test_cpu_kernel_opcheck(cpu_kernels: str) -> None:
    """Schema, fake tensor and autograd registration (what torch.compile relies on)."""
    v, attn = inputs(2, 3, 1, 2, 5, 6, 2, 3)
    torch.library.opcheck(torch.ops.mmattn.outlook_fwd.default,
                          (v.requires_grad_(), attn.requires_grad_(), 3, 1, 2))


def test_cpu_pool_op_opcheck(cpu_kernels: str) -> None:
    """mmattn::outlook_pool (the block's pooling: a kernel on CUDA, ATen's on the CPU): schema
    and fake tensor against the CPU implementation, partial cells included (no autograd: the
    block differentiates around it)."""
    for shape, s in (((2, 7, 9, 6), 2), ((1, 4, 4, 3), 3), ((1, 2, 2, 4), 1)):
        torch.library.opcheck(torch.ops.mmattn.outlook_pool.default,
                              (torch.randn(shape, dtype=F64), s),
                              test_utils=('test_schema', 'test_faketensor'))


def test_cpu_softmax_op(cpu_kernels: str) -> None:
    check_softmax(torch.ops.mmattn.outlook_softmax)


def test_cpu_softmax_op_errors_and_opcheck(cpu_kernels: str) -> None:
    with pytest.raises(RuntimeError, match=r'multiple of kernel_size\^2 = 9, got shape \[2, 10\]'):
        torch.ops.mmattn.outlook_softmax(torch.randn(2, 10), 3, 1.0)
    with pytest.raises(RuntimeError, match='kernel_size must be in'):
        torch.ops.mmattn.outlook_softmax(torch.randn(2, 9), 0, 1.0)
    with pytest.raises(RuntimeError, match='floating point'):
        torch.ops.mmattn.outlook_softmax(torch.ones(2, 9, dtype=torch.long), 3, 1.0)
    torch.library.opcheck(torch.ops.mmattn.outlook_softmax.default,
                          (torch.randn(2, 3, 18, dtype=F64), 3, 0.5),
                          test_utils=('test_schema', 'test_faketensor'))


def test_cpu_kernel_ones_column(cpu_kernels: str) -> None:
    check_ones_column(torch.ops.mmattn.outlook_fwd)
    v, attn = inputs(2, 3, 1, 2, 5, 6, 2, 3)
    torch.library.opcheck(torch.ops.mmattn.outlook_fwd.default, (v, attn, 3, 1, 2, True),
                          test_utils=('test_schema', 'test_faketensor'))


def test_cpu_unpool_add_op(cpu_kernels: str) -> None:
    check_unpool_add(torch.ops.mmattn.outlook_unpool_add)


def check_unpool_add_errors(op, device: str = 'cpu') -> None:
    """Bad arguments raise errors naming them, shapes included (the numbers in a message are
    what a C++ runtime of the extension's own, linked statically, lost or crashed on:
    ``extension.link_flags``)."""
    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.randn(shape, dtype=dtype, device=device)
    with pytest.raises(RuntimeError, match=r'pooled must be \(B, ceil\(H / s\), ceil\(W / s\), '
                                           r'C\) = \(2, 4, 5, 3\).*got shape \[2, 3, 5, 3\]'):
        op(randn(2, 7, 9, 3), randn(2, 3, 5, 3), 2)
    with pytest.raises(RuntimeError, match='pooled dtype Float must match grad dtype Double'):
        op(randn(1, 4, 4, 2, dtype=F64), randn(1, 2, 2, 2), 2)
    with pytest.raises(RuntimeError, match=r'outlook_unpool_add: stride must be in \[1, 64\], '
                                           r'got 0'):
        op(randn(1, 4, 4, 2), randn(1, 2, 2, 2), 0)
    with pytest.raises(RuntimeError, match='outlook_unpool_add: grad must be 4-D'):
        op(randn(4, 4, 2), randn(1, 2, 2, 2), 2)


def test_cpu_unpool_add_errors_and_opcheck(cpu_kernels: str) -> None:
    op = torch.ops.mmattn.outlook_unpool_add
    check_unpool_add_errors(op)
    torch.library.opcheck(op.default, (torch.randn(2, 7, 9, 6, dtype=F64),
                                       torch.randn(2, 4, 5, 6, dtype=F64), 2),
                          test_utils=('test_schema', 'test_faketensor'))


# (v, attn, K, p, s) built from a valid (v, attn) for K=3, p=1, s=2 on a 5 x 6 map, 2 heads of
# 3 channels (grid 3 x 3); the phrase both the reference path and the compiled ops raise
BAD_CALLS = [
    (lambda v, a: (v, a, 3, 1, 0), 'stride must be'),
    (lambda v, a: (v, a, 0, 1, 2), 'kernel_size must be'),
    (lambda v, a: (v, a, 3, -1, 2), 'padding must be'),
    (lambda v, a: (v[0], a, 3, 1, 2), 'v must be 4-D (B, H, W, C), got shape'),
    (lambda v, a: (v, a[0], 3, 1, 2), 'attn must be 6-D (B, h, w, N, K*K, K*K), got shape'),
    (lambda v, a: (v, a[..., :8], 3, 1, 2), "attn's last two dims must be K*K = 9 (kernel_size "
                                            '3), got 9 x 8'),
    (lambda v, a: (v[..., :5], a, 3, 1, 2), 'the channels C = 5 of v must be divisible by the '
                                            'heads N = attn.size(3) = 2'),
    (lambda v, a: (v, a[:, :2], 3, 1, 2), "attn's (B, h, w) must be (1, 3, 3) for v of shape"),
    (lambda v, a: (v[:, :3], a, 3, 1, 2), "attn's (B, h, w) must be (1, 2, 3) for v of shape"),
]


@pytest.mark.parametrize('make, phrase', BAD_CALLS)
def test_reference_path_names_bad_arguments_as_the_kernels_do(make, phrase) -> None:
    """Without compiled kernels (the default install) the functional op failed inside its
    slicing ('slice step cannot be zero', 'stack expects a non-empty TensorList', a
    batched-matmul size error); it now checks what outlook.h's outlook_check does."""
    v, attn = inputs(1, 3, 1, 2, 5, 6, 2, 3)
    with pytest.raises(ValueError) as info:
        outlook_attention(*make(v, attn), backend='reference')
    assert str(info.value).startswith('outlook_attention: ')
    assert phrase in str(info.value).replace('[', '(').replace(']', ')')
    with pytest.raises(TypeError, match='outlook_attention: v must be floating point, got '
                                        'dtype torch.int64'):
        outlook_attention(v.long(), attn, 3, 1, 2, backend='reference')


@pytest.mark.parametrize('make, phrase', BAD_CALLS)
def test_cpu_kernel_names_the_same_bad_arguments(make, phrase, cpu_kernels: str) -> None:
    v, attn = inputs(1, 3, 1, 2, 5, 6, 2, 3)
    with pytest.raises(RuntimeError) as info:
        outlook_attention(*make(v, attn), backend='cpu')
    assert str(info.value).startswith('outlook_fwd: ')
    assert phrase in str(info.value).replace('[', '(').replace(']', ')')


def test_cpu_kernel_input_errors(cpu_kernels: str) -> None:
    v, attn = inputs(1, 3, 1, 2, 5, 6, 2, 3)
    with pytest.raises(RuntimeError, match='attn'):
        torch.ops.mmattn.outlook_fwd(v, attn[:, :-1], 3, 1, 2)
    with pytest.raises(RuntimeError, match='v'):
        torch.ops.mmattn.outlook_fwd(v[..., :-1], attn, 3, 1, 2)
    with pytest.raises(RuntimeError, match='dtype|type'):
        torch.ops.mmattn.outlook_fwd(v.float(), attn, 3, 1, 2)


def test_cpu_kernel_in_the_block_and_under_compile(cpu_kernels: str) -> None:
    """The block with backend='cpu' equals its reference path, also under torch.compile
    (the op's fake registration lets it trace without a graph break)."""
    block = OutlookAttention(12, num_heads=3, stride=2, qkv_bias=True, dtype=F64)
    ref = OutlookAttention(12, num_heads=3, stride=2, qkv_bias=True, dtype=F64,
                           backend='reference')
    ref.load_state_dict(block.state_dict())
    block.backend = 'cpu'
    x = torch.randn(2, 12, 9, 7, dtype=F64)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-12, atol=1e-12)
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-12, atol=1e-12)


def test_cpu_kernel_keeps_no_unfolded_windows(cpu_kernels: str) -> None:
    """The kernel keeps only v and the weights for its backward; the reference keeps the
    K^2 / s^2 times larger window tensor."""
    v, attn = inputs(2, 3, 1, 1, 16, 16, 2, 16, dtype=torch.float32)
    v_bytes = v.numel() * v.element_size()
    assert kept(kernel_fn(3, 1, 1, 'cpu'), v, attn) == 0
    assert kept(kernel_fn(3, 1, 1, 'reference'), v, attn) >= 8 * v_bytes


# ---------------------------------------------------------------- the block on the kernels
def block_pair(stride: int, bias: bool, backend: str, device: str = 'cpu',
               **kwargs) -> tuple[OutlookAttention, OutlookAttention]:
    torch.manual_seed(0)
    ref = OutlookAttention(12, num_heads=3, stride=stride, qkv_bias=bias, dtype=F64,
                           backend='reference', **kwargs)
    with torch.no_grad():
        for prm in ref.parameters():
            prm.normal_(0, 0.4)
    fast = OutlookAttention(12, num_heads=3, stride=stride, qkv_bias=bias, dtype=F64,
                            backend=backend, **kwargs)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.to(device)


def check_block(device: str, backend: str) -> None:
    """The recomputing block (backend chosen, no attention dropout) against the reference
    block: output and the gradients of x and of every parameter, float64. Sizes the stride
    divides (the backward spreads the pooled gradient by tiles) and sizes it does not
    (ceil-mode partial cells)."""
    for stride, bias, size in [(1, True, (9, 7)), (2, False, (9, 7)), (2, True, (1, 1)),
                               (3, True, (8, 5)), (2, True, (8, 6)), (3, False, (9, 6))]:
        ref, fast = block_pair(stride, bias, backend, device)
        x = torch.randn(2, 12, *size, dtype=F64, requires_grad=True)
        xd = x.detach().to(device).requires_grad_()
        y_ref, y = ref(x), fast(xd)
        torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y_ref)
        ours = torch.autograd.grad(y, [xd, *fast.parameters()], g.to(device))
        theirs = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
        for (name, _), a, b in zip([('x', None), *ref.named_parameters()], ours, theirs):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-11, atol=1e-11, msg=name)


def check_block_output_in_place(device: str, backend: str) -> None:
    """The recomputing block's output may be changed in place, as timm's blocks do with an
    ``attn_layer``'s (``x *= ...``, ``x += shortcut``), NCHW (a permuted view of it) and NHWC:
    the gradients stay the reference block's. (Its projection had returned a view made inside
    the autograd Function, which autograd refuses to let be changed in place.)"""
    for fmt, shape in (('NCHW', (2, 12, 7, 6)), ('NHWC', (2, 7, 6, 12))):
        ref, fast = block_pair(2, True, backend, device, data_format=fmt)
        x = torch.randn(shape, dtype=F64, requires_grad=True)
        xd = x.detach().to(device).requires_grad_()
        outs = []
        for block, inp in ((ref, x), (fast, xd)):
            y = block(inp)
            y *= 2.0
            y += inp
            outs.append(y)
        g = torch.randn(shape, dtype=F64)
        outs[0].backward(g)
        outs[1].backward(g.to(device))
        torch.testing.assert_close(outs[1].detach().cpu(), outs[0].detach(), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(xd.grad.cpu(), x.grad, rtol=1e-11, atol=1e-11)
        for a, b in zip(fast.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-11, atol=1e-11)


def test_cpu_block_matches_reference_block(cpu_kernels: str) -> None:
    check_block('cpu', 'cpu')


def test_cpu_block_output_changed_in_place(cpu_kernels: str) -> None:
    check_block_output_in_place('cpu', 'cpu')


def test_cpu_block_keeps_only_the_weights(cpu_kernels: str) -> None:
    """VOLO-D1 stage 1 (C=192, 6 heads, K=3, s=2): the kernel block keeps the normalised
    weights (N K^4 values per pooled cell) and nothing else; timm's OutlookAttention keeps over
    5x as much (its pooled map, weights, unfolded values and projection input)."""
    from timm.models.volo import OutlookAttention as TimmOutlook
    x = torch.randn(2, 28, 28, 192, requires_grad=True)
    ours = OutlookAttention(192, num_heads=6, stride=2, data_format='NHWC', backend='cpu')
    timm_block = TimmOutlook(192, 6, kernel_size=3, padding=1, stride=2)
    weights_bytes = 2 * 14 * 14 * 6 * 81 * 4
    assert saved_bytes(ours, x) == weights_bytes
    assert saved_bytes(timm_block, x) >= 5 * weights_bytes
    # with attention dropout in training the block composes the ops (dropout needs its mask)
    dropped = OutlookAttention(192, num_heads=6, stride=2, data_format='NHWC', backend='cpu',
                               attn_drop=0.1).train()
    assert saved_bytes(dropped, x) > 2 * weights_bytes
    assert saved_bytes(dropped.eval(), x) == weights_bytes
    # hooks on the projections see their calls: the block composes the ops then
    seen = []
    ours.proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert saved_bytes(ours, x) > 2 * weights_bytes and seen == [(2, 28, 28, 192)]


def test_cpu_block_under_autocast(cpu_kernels: str) -> None:
    """bf16 autocast: the recomputing backward runs under the forward's autocast state; its
    error against float32 stays within twice the reference block's, gradients in the
    parameters' dtype."""
    torch.manual_seed(0)
    ref = OutlookAttention(48, num_heads=3, stride=2, data_format='NHWC', backend='reference')
    fast = OutlookAttention(48, num_heads=3, stride=2, data_format='NHWC', backend='cpu')
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 14, 14, 48, requires_grad=True)
    g = torch.randn(2, 14, 14, 48)
    truth = torch.autograd.grad(ref(x), [x, *ref.parameters()], g)
    errs = []
    for block in (ref, fast):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = block(x)
        grads = torch.autograd.grad(y, [x, *block.parameters()], g)
        assert [t.dtype for t in grads] == [t.dtype for t in truth]
        errs.append([(a - b).abs().max().item() for a, b in zip(grads, truth)])
    for name, e_ref, e_fast in zip(['x', *dict(ref.named_parameters())], *errs):
        assert e_fast <= 2 * e_ref + 1e-5, name


# ---------------------------------------------------------------- the CUDA kernel
@pytest.mark.cuda
def test_cuda_kernel_matches_equations(cuda_kernels: str) -> None:
    check_kernel('cuda', 'cuda')


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_low_precision(cuda_kernels: str, dtype: torch.dtype) -> None:
    check_half('cuda', 'cuda', dtype)


@pytest.mark.cuda
def test_cuda_kernel_gradcheck_and_opcheck(cuda_kernels: str) -> None:
    for s in (1, 2):
        v, attn = inputs(1, 3, 1, s, 3, 5, 2, 2, device='cuda')
        assert torch.autograd.gradcheck(kernel_fn(3, 1, s, 'cuda'),
                                         (v.requires_grad_(), attn.requires_grad_()))
    v, attn = inputs(2, 3, 1, 2, 5, 6, 2, 3, device='cuda')
    torch.library.opcheck(torch.ops.mmattn.outlook_fwd.default,
                          (v.requires_grad_(), attn.requires_grad_(), 3, 1, 2))


@pytest.mark.cuda
def test_cuda_kernel_logits_gradient(cuda_kernels: str) -> None:
    check_logits_grad(torch.ops.mmattn.outlook_bwd, GEOMETRIES, 'cuda')
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # (16-bit: tensor cores)
        check_logits_grad_half(torch.ops.mmattn.outlook_bwd, dtype, 6, 32, 'cuda')


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('case', TENSOR_CORE_GATHERS)
def test_cuda_gathers_on_tensor_cores(cuda_kernels: str, dtype: torch.dtype,
                                      case: tuple[int, ...],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The gathers' cases on the scalar kernel (the default) and on the tensor-core one."""
    for value in ('0', '1'):
        monkeypatch.setenv('MMATTN_OUTLOOK_TENSOR_CORE_GATHER', value)
        check_gathers_half(torch.ops.mmattn.outlook_fwd, torch.ops.mmattn.outlook_bwd, dtype,
                           case, 'cuda')


@pytest.mark.cuda
def test_cuda_kernel_ones_column(cuda_kernels: str) -> None:
    check_ones_column(torch.ops.mmattn.outlook_fwd, 'cuda')


@pytest.mark.cuda
def test_cuda_unpool_add_op(cuda_kernels: str) -> None:
    check_unpool_add(torch.ops.mmattn.outlook_unpool_add, 'cuda')
    check_unpool_add_errors(torch.ops.mmattn.outlook_unpool_add, 'cuda')


@pytest.mark.cuda
def test_cuda_softmax_op(cuda_kernels: str) -> None:
    check_softmax(torch.ops.mmattn.outlook_softmax, 'cuda')


@pytest.mark.cuda
def test_cuda_kernel_volo_stage1_shape_and_auto(cuda_kernels: str) -> None:
    """VOLO-D1 stage 1 (28 x 28, C=192, 6 heads, K=3, s=2) in bf16, picked by 'auto': the
    output and both gradients within one rounding of Eq. 4-5 in float64 of its bf16 inputs,
    nothing kept for the backward beyond them."""
    check_half('cuda', 'auto', torch.bfloat16, batch=8, size=28)
    v, attn = inputs(8, 3, 1, 2, 28, 28, 6, 32, dtype=torch.bfloat16, device='cuda')
    assert kept(kernel_fn(3, 1, 2, 'auto'), v, attn) == 0


@pytest.mark.cuda
def test_cuda_block_matches_reference_block(cuda_kernels: str) -> None:
    check_block('cuda', 'cuda')


@pytest.mark.cuda
def test_cuda_block_output_changed_in_place(cuda_kernels: str) -> None:
    check_block_output_in_place('cuda', 'cuda')


@pytest.mark.cuda
def test_cuda_block_pools_channels_last_maps_on_its_kernel(cuda_kernels: str) -> None:
    """On a channels-last (NHWC) input the CUDA block pools with ``mmattn::outlook_pool`` (the
    NCHW block's permuted view goes to PyTorch's NCHW kernel): the block against the reference
    block in float64, partial cells included, and the kernel against avg_pool2d at VOLO-D1's
    stage 1 in bf16 (against the float64 means, within bf16's rounding)."""
    from torch.profiler import ProfilerActivity, profile
    for stride, size in [(2, (9, 7)), (3, (8, 5)), (2, (28, 28))]:
        ref, fast = block_pair(stride, True, 'cuda', 'cuda', data_format='NHWC')
        x = torch.randn(2, *size, 12, dtype=F64, requires_grad=True)
        xd = x.detach().cuda().requires_grad_()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = fast(xd)
            y.backward(torch.ones_like(y))
        assert sum(e.name == 'mmattn::outlook_pool' for e in prof.events()) == 2  # fwd, bwd
        ref(x).backward(torch.ones_like(x))
        torch.testing.assert_close(y.detach().cpu(), ref(x).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xd.grad.cpu(), x.grad, rtol=1e-11, atol=1e-11)
    x = torch.randn(128, 28, 28, 192, device='cuda', dtype=torch.bfloat16)
    ours = torch.ops.mmattn.outlook_pool(x, 2)
    truth = x.double().view(128, 14, 2, 14, 2, 192).mean(dim=(2, 4))
    # the float32 sum's error, then bf16's rounding of the mean: within half a unit
    torch.testing.assert_close(ours.double(), truth, rtol=2 ** -8, atol=1e-6)
    theirs = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2,
                                            ceil_mode=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours, theirs)   # bf16's tolerance


@pytest.mark.cuda
def test_cuda_block_matches_cpu_reference(cuda_kernels: str) -> None:
    block = OutlookAttention(12, num_heads=3, stride=2, dtype=F64, backend='cuda').cuda()
    x = torch.randn(2, 12, 11, 10, dtype=F64)
    ref = OutlookAttention(12, num_heads=3, stride=2, dtype=F64, backend='reference')
    ref.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x.cuda()).cpu(), ref(x), rtol=1e-10, atol=1e-10)
    assert math.isfinite(block(x.cuda()).sum().item())
