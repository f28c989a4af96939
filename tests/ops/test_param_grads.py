"""mmattn.ops.param_grads and mmattn.models.dense_layers: the linear layer and LayerNorm whose
parameters' gradients are column sums on mmattn's kernels.

The sums are checked against their definitions in float64 (a bias's gradient Σ_r g[r]; a
LayerNorm's Σ_r g[r] x̂[r] and Σ_r g[r] with x̂ = (x - mean) / sqrt(var + eps) over the last
dimension); the ops with their C++ autograd against ``torch.nn.functional``. The kernels
themselves run here in the CPU emulation (``test_kernels_emulated.py`` imports the checks) and
on a GPU in the ``cuda`` tests.
"""
from __future__ import annotations

import glob
import os.path as osp
import re
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmattn.models.dense_layers import (LayerNorm, Linear, restore_torch_layers,
                                        use_column_sum_layers)
from mmattn.ops import extension, param_grads

F64 = torch.float64
EPS = 1e-5
# (shape, what it covers): the last dimension picks the vector width (16 bytes for 192, 8 / 4
# bytes for 12 / 6 in bf16, single elements for 5) and the column tiles (2050 float32: 5 tiles
# of 205 two-element groups); the rows, the unrolled loop's remainder and a grid of one block
COLUMN_SHAPES = [
    ((7, 9, 192), 'bf16: 16-byte vectors, 63 rows'),
    ((301, 12), '8-byte vectors, rows past the unrolled loop'),
    ((2, 3, 5, 6), '4-byte vectors, 4-d'),
    ((40, 5), 'single elements'),
    ((33, 2050), 'several column tiles'),
    ((10, 1160), 'bf16: 3 tiles of 49 groups, the last cut short'),
    ((1, 24), 'one row'),
]


def tolerance(dtype: torch.dtype, rows: int) -> dict[str, float]:
    """The sums' tolerance: the output's rounding to dtype, plus accumulation in the
    accumulation type over `rows` values of magnitude about 1."""
    if dtype == F64:
        return dict(rtol=1e-12, atol=1e-12 * rows)
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    return dict(rtol=rtol, atol=rtol + 1e-6 * rows)


def layer_norm_inputs(shape: tuple[int, ...], dtype: torch.dtype,
                      device: str = 'cpu') -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad, x, mean, rstd): random grad and x in dtype, x's per-row statistics in the
    accumulation type, computed in float64 from their definitions."""
    gen = torch.Generator().manual_seed(sum(shape))
    grad = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.5).to(dtype)
    xd = x.to(F64)
    acc = F64 if dtype == F64 else torch.float32
    mean = xd.mean(-1, keepdim=True)
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + EPS).rsqrt()
    return (grad.to(device), x.to(device), mean.to(acc).to(device), rstd.to(acc).to(device))


def reference_sums(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_r g x̂, Σ_r g) over every dimension but the last, in float64 on the CPU."""
    c = grad.shape[-1]
    g = grad.to(F64).cpu().reshape(-1, c)
    xhat = ((x.to(F64).cpu().reshape(-1, c) - mean.to(F64).cpu().reshape(-1, 1))
            * rstd.to(F64).cpu().reshape(-1, 1))
    return (g * xhat).sum(0), g.sum(0)


def check_column_sums(bias_grad: Callable[[Tensor], Tensor],
                      ln_grads: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
                      shape: tuple[int, ...], dtype: torch.dtype, device: str = 'cpu') -> None:
    """Both sums of the ops against their float64 definitions, in grad's dtype and shape (C,)."""
    grad, x, mean, rstd = layer_norm_inputs(shape, dtype, device)
    rows = grad.numel() // shape[-1]
    want_w, want_b = reference_sums(grad, x, mean, rstd)
    got_b = bias_grad(grad)
    got_w, got_b2 = ln_grads(grad, x, mean, rstd)
    for got, want in ((got_b, want_b), (got_b2, want_b), (got_w, want_w)):
        assert got.dtype == dtype and got.shape == (shape[-1],)
        torch.testing.assert_close(got.to(F64).cpu(), want, **tolerance(dtype, rows))


def check_column_sums_edges(bias_grad: Callable[[Tensor], Tensor],
                            ln_grads: Callable[..., tuple[Tensor, Tensor]],
                            device: str = 'cpu') -> None:
    """No rows: zeros; a gradient that is not contiguous (a transposed view); clear errors."""
    empty = torch.randn(0, 7, device=device)
    assert torch.equal(bias_grad(empty), torch.zeros(7, device=device))
    g = torch.randn(24, 40, dtype=F64, device=device).t()
    torch.testing.assert_close(bias_grad(g).cpu(), g.cpu().sum(0))
    grad, x, mean, rstd = layer_norm_inputs((6, 8), torch.float32, device)
    with pytest.raises(RuntimeError, match="x must have grad's shape"):
        ln_grads(grad, x[:, :4], mean, rstd)


# ---------------------------------------------------------------- CPU build: ops and autograd
@pytest.mark.parametrize('shape, covers', COLUMN_SHAPES[:2])
def test_cpu_column_sums_match_definitions(cpu_kernels: str, shape: tuple[int, ...],
                                           covers: str) -> None:
    ops = torch.ops.mmattn
    for dtype in (F64, torch.float32, torch.bfloat16):
        check_column_sums(ops.bias_grad, ops.layer_norm_param_grads, shape, dtype)
    check_column_sums_edges(ops.bias_grad, ops.layer_norm_param_grads)


def linear_inputs(dtype: torch.dtype, bias: bool, device: str = 'cpu'):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 12, generator=gen, dtype=F64).to(dtype).to(device)
    w = (torch.randn(20, 12, generator=gen, dtype=F64) / 4).to(dtype).to(device)
    b = torch.randn(20, generator=gen, dtype=F64).to(dtype).to(device) if bias else None
    return x, w, b


def ln_inputs(dtype: torch.dtype, bias: bool, device: str = 'cpu'):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 6, 5, 24, generator=gen, dtype=F64) * 3 - 1).to(dtype).to(device)
    w = (1 + torch.randn(24, generator=gen, dtype=F64) / 4).to(dtype).to(device)
    b = torch.randn(24, generator=gen, dtype=F64).to(dtype).to(device) if bias else None
    return x, w, b


def check_op_against_torch(op: Callable[..., Tensor], torch_fn: Callable[..., Tensor],
                           inputs: tuple, needs: tuple[bool, ...], **tol: float) -> None:
    """Output and gradients of op equal torch_fn's, with only the inputs `needs` marks
    requiring a gradient (the others get none)."""
    def run(fn):
        leaves = [None if t is None else t.detach().clone().requires_grad_(n)
                  for t, n in zip(inputs, needs)]
        out = fn(*leaves)
        grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype,
                              device=out.device).reshape(out.shape)
        out.backward(grad)
        return out, [None if t is None else t.grad for t in leaves]
    out, grads = run(op)
    want_out, want_grads = run(torch_fn)
    torch.testing.assert_close(out, want_out, **tol)
    for got, want in zip(grads, want_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('needs', [(True, True, True), (False, True, True), (True, False, False)])
def test_cpu_linear_op_matches_torch(cpu_kernels: str, bias: bool,
                                     needs: tuple[bool, ...]) -> None:
    check_op_against_torch(torch.ops.mmattn.linear, F.linear, linear_inputs(F64, bias), needs)


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('needs', [(True, True, True), (False, True, False), (True, False, True)])
def test_cpu_layer_norm_op_matches_torch(cpu_kernels: str, bias: bool,
                                         needs: tuple[bool, ...]) -> None:
    check_op_against_torch(lambda x, w, b: torch.ops.mmattn.layer_norm(x, w, b, EPS),
                           lambda x, w, b: F.layer_norm(x, (24,), w, b, EPS),
                           ln_inputs(F64, bias), needs)


def test_cpu_ops_outputs_take_in_place_changes(cpu_kernels: str) -> None:
    """As torch's: the outputs are not views made inside a custom Function (which autograd
    would refuse to change in place; timm's blocks change layers' outputs in place)."""
    def scaled_in_place(fn):
        return lambda *args: fn(*args).mul_(2)
    check_op_against_torch(scaled_in_place(torch.ops.mmattn.linear), scaled_in_place(F.linear),
                           linear_inputs(F64, True), (True, True, True))
    check_op_against_torch(scaled_in_place(lambda x, w, b: torch.ops.mmattn.layer_norm(x, w, b,
                                                                                       EPS)),
                           scaled_in_place(lambda x, w, b: F.layer_norm(x, (24,), w, b, EPS)),
                           ln_inputs(F64, True), (True, True, True))


def test_cpu_ops_gradcheck(cpu_kernels: str) -> None:
    x, w, b = linear_inputs(F64, True)
    assert torch.autograd.gradcheck(torch.ops.mmattn.linear,
                                    tuple(t.requires_grad_() for t in (x[:1, :2], w, b)))
    x, w, b = ln_inputs(F64, True)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.mmattn.layer_norm(*a, EPS),
                                    tuple(t.requires_grad_() for t in (x[:1, :2], w, b)))


# ---------------------------------------------------------------- the layers and their switch
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 6)
        self.other = nn.LayerNorm((3, 4))

    def forward(self, x: Tensor) -> Tensor:
        grouped = self.other(x.reshape(x.shape[0], x.shape[1], 3, 4))   # (B, N, C) input
        return self.fc(self.norm(x)) + grouped.sum(-1)[..., :1]


class OwnLinear(nn.Linear):
    pass


def test_use_column_sum_layers_keeps_the_modules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), OwnLinear(6, 2))
    x = torch.randn(2, 5, 12)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    hooked = []
    handle = model[0].fc.register_forward_hook(lambda *args: hooked.append(1))
    assert use_column_sum_layers(model) is model
    assert type(model[0].norm) is LayerNorm and type(model[0].fc) is Linear
    assert type(model[0].other) is LayerNorm
    assert type(model[1]) is OwnLinear   # a subclass of the torch classes keeps its class
    assert [id(p) for p in model.parameters()] == params
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before) and hooked == [1]
    handle.remove()   # (TorchScript compiles no Python hooks)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), before)
    traced = torch.fx.symbolic_trace(model)
    assert 'linear' in traced.code and 'layer_norm' in traced.code
    torch.testing.assert_close(traced(x), before)
    assert restore_torch_layers(model) is model
    assert type(model[0].fc) is nn.Linear and type(model[0].norm) is nn.LayerNorm
    assert type(model[1]) is OwnLinear and [id(p) for p in model.parameters()] == params
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
    assert type(quantized[0].fc).__name__ == 'Linear' and type(quantized[0].fc) is not nn.Linear


def test_layers_take_torchs_ops_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU (and without the CUDA kernels) the layers never call mmattn's ops."""
    x = torch.randn(4, 12)
    assert not param_grads.column_sum_kernels(x)
    calls = []
    monkeypatch.setattr(param_grads, '_kernels_ready', lambda: calls.append(1) or True)
    assert not param_grads.column_sum_kernels(x) and calls == []
    torch.testing.assert_close(param_grads.bias_grad(x.reshape(2, 2, 12)), x.sum(0))


def cuda_registered_ops() -> set[str]:
    """The ops that a CUDA build's sources register for the CUDA key by name (what a GPU build
    reports): cuda_ops.cpp's ``m.impl`` calls, and those of the ``register_*(m)`` functions it
    calls (templates in the headers, which the tests' emulation registers too)."""
    texts = {}
    for path in sorted(glob.glob(osp.join(extension.CSRC, '*'))):
        with open(path) as f:
            texts[path] = f.read()
    ops = set()
    for path in extension.sources(True):
        for block in re.findall(r'TORCH_LIBRARY_IMPL\(mmattn, CUDA, m\) \{(.*?)\n\}',
                                texts[path], re.S):
            ops.update(re.findall(r'm\.impl\("(\w+)"', block))
            for function in re.findall(r'(\w+)\(m\);', block):
                bodies = [body for text in texts.values() for body in re.findall(
                    rf'void {function}\(Library& m\) \{{(.*?)\n\}}', text, re.S)]
                assert len(bodies) == 1, (function, len(bodies))
                ops.update(re.findall(r'm\.impl\("(\w+)"', bodies[0]))
    return ops


def test_kernel_check_asks_for_what_a_cuda_build_registers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the ops a CUDA build registers for the CUDA key (mmattn::linear / layer_norm are
    composite, registered for every key at once), the layers take the kernels."""
    registered = cuda_registered_ops()
    assert {'bias_grad', 'layer_norm_param_grads'} <= registered
    assert not {'linear', 'layer_norm'} & registered
    monkeypatch.setattr(extension, 'load_extension', lambda: 'a GPU build')
    monkeypatch.setattr(extension, 'has_kernel',
                        lambda op, device: device == 'cuda' and op in registered)
    monkeypatch.setattr(param_grads, '_ready', {})
    assert param_grads._kernels_ready()
    monkeypatch.setattr(extension, 'has_kernel', lambda op, device: op == 'bias_grad')
    monkeypatch.setattr(extension, 'load_extension', lambda: 'another build')
    assert not param_grads._kernels_ready()


def test_kernel_predicate_on_cuda_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a CUDA tensor (a fake one: no GPU needed) with the kernels ready: taken, except
    with MMATTN_COLUMN_SUMS=0 or MMATTN_BACKEND=reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(param_grads, '_kernels_ready', lambda: True)
    monkeypatch.delenv(param_grads.ENV_COLUMN_SUMS, raising=False)
    monkeypatch.delenv('MMATTN_BACKEND', raising=False)
    with FakeTensorMode():
        x = torch.empty(2, 3, device='cuda')
    assert param_grads.column_sum_kernels(x)
    monkeypatch.setenv(param_grads.ENV_COLUMN_SUMS, '0')
    assert not param_grads.column_sum_kernels(x)
    monkeypatch.setenv(param_grads.ENV_COLUMN_SUMS, '1')
    monkeypatch.setenv('MMATTN_BACKEND', 'reference')
    assert not param_grads.column_sum_kernels(x)
    monkeypatch.setattr(param_grads, '_kernels_ready', lambda: False)
    monkeypatch.setenv('MMATTN_BACKEND', 'auto')
    assert not param_grads.column_sum_kernels(x)


def test_column_sums_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(param_grads.ENV_COLUMN_SUMS, 'yes')
    with pytest.raises(ValueError, match='MMATTN_COLUMN_SUMS must be 0 or 1.*got .yes.'):
        param_grads._env_column_sums()
    monkeypatch.setenv(param_grads.ENV_COLUMN_SUMS, '0')
    assert not param_grads._env_column_sums()
    monkeypatch.setenv(param_grads.ENV_COLUMN_SUMS, '1')
    assert param_grads._env_column_sums()


def test_fake_kernels_give_the_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        g = torch.empty(4, 5, 12, dtype=torch.bfloat16)
        assert torch.ops.mmattn.bias_grad(g).shape == (12,)
        w, b = torch.ops.mmattn.layer_norm_param_grads(g, g, g[..., :1], g[..., :1])
        assert w.shape == b.shape == (12,) and w.dtype == torch.bfloat16
        assert torch.ops.mmattn.linear(g, torch.empty(7, 12, dtype=g.dtype)).shape == (4, 5, 7)
        assert torch.ops.mmattn.layer_norm(g, g[0, 0], None, EPS).shape == g.shape


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize('shape, covers', COLUMN_SHAPES)
@pytest.mark.parametrize('dtype', [F64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_column_sums_match_definitions(cuda_kernels: str, shape: tuple[int, ...],
                                            covers: str, dtype: torch.dtype) -> None:
    ops = torch.ops.mmattn
    check_column_sums(ops.bias_grad, ops.layer_norm_param_grads, shape, dtype, 'cuda')


@pytest.mark.cuda
def test_cuda_column_sums_edges(cuda_kernels: str) -> None:
    ops = torch.ops.mmattn
    check_column_sums_edges(ops.bias_grad, ops.layer_norm_param_grads, 'cuda')
    grad, x, mean, rstd = layer_norm_inputs((6, 8), torch.float32, 'cuda')
    with pytest.raises(RuntimeError, match="mean and rstd must be on grad's device cuda:0, "
                                           'got cpu'):
        ops.layer_norm_param_grads(grad, x, mean.cpu(), rstd)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cuda_layers_match_torch(cuda_kernels: str, dtype: torch.dtype) -> None:
    """The layers on the kernel path (taken: the ops are called) against torch's, eager and
    under autocast."""
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    for needs in ((True, True, True), (False, True, True)):
        check_op_against_torch(param_grads.linear, F.linear,
                               linear_inputs(dtype, True, 'cuda'), needs, **tol)
        check_op_against_torch(lambda x, w, b: param_grads.layer_norm(x, [24], w, b, EPS),
                               lambda x, w, b: F.layer_norm(x, (24,), w, b, EPS),
                               ln_inputs(dtype, True, 'cuda'), needs, **tol)
    assert param_grads.column_sum_kernels(torch.empty(1, device='cuda'))
    # float32 parameters for a bf16 input: torch's own LayerNorm, its error included (CUDA's
    # refused the mix in torch 2.11: "expected scalar type BFloat16 but found Float")
    x, w, b = ln_inputs(torch.bfloat16, True, 'cuda')
    try:
        F.layer_norm(x, (24,), w.float(), b.float(), EPS)
    except RuntimeError as err:
        with pytest.raises(RuntimeError, match=re.escape(str(err).splitlines()[0])):
            param_grads.layer_norm(x, [24], w.float(), b.float(), EPS)
    else:
        check_op_against_torch(lambda x, w, b: param_grads.layer_norm(x, [24], w, b, EPS),
                               lambda x, w, b: F.layer_norm(x, (24,), w, b, EPS),
                               (x, w.float(), b.float()), (True,) * 3, rtol=0, atol=0)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        check_op_against_torch(param_grads.linear, F.linear,
                               linear_inputs(torch.float32, True, 'cuda'), (True,) * 3,
                               rtol=2e-2, atol=2e-2)
        check_op_against_torch(lambda x, w, b: param_grads.layer_norm(x, [24], w, b, EPS),
                               lambda x, w, b: F.layer_norm(x, (24,), w, b, EPS),
                               ln_inputs(torch.bfloat16, True, 'cuda'), (True,) * 3,
                               rtol=2e-2, atol=2e-2)


def test_cpu_ops_opcheck(cpu_kernels: str) -> None:
    x, w, b = linear_inputs(torch.float32, True)
    torch.library.opcheck(torch.ops.mmattn.linear.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    x, w, b = ln_inputs(torch.float32, True)
    torch.library.opcheck(torch.ops.mmattn.layer_norm.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), EPS))
    grad, x, mean, rstd = layer_norm_inputs((5, 8), torch.float32)
    torch.library.opcheck(torch.ops.mmattn.bias_grad.default, (grad,))
    torch.library.opcheck(torch.ops.mmattn.layer_norm_param_grads.default, (grad, x, mean, rstd))


def test_cpu_volo_on_the_ops_matches_timm(cpu_kernels: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole (small) VOLO training step with every linear layer and LayerNorm on mmattn's ops
    (the CUDA path's composition, with the CPU sums: the predicate forced on) against timm's
    model with the same weights, every parameter's gradient in float64."""
    from timm.models.volo import VOLO as TimmVOLO

    from mmattn.models.volo import VOLO
    calls = {'linear': 0, 'layer_norm': 0, 'bias_grad': 0}
    for name in calls:
        op = getattr(torch.ops.mmattn, name)

        def counted(*args, _op=op, _name=name):
            calls[_name] += 1
            return _op(*args)
        monkeypatch.setattr(torch.ops.mmattn, name, counted)
    monkeypatch.setattr(param_grads, 'column_sum_kernels', lambda x: True)
    kw = dict(img_size=64, num_classes=7, embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4),
              stem_hidden_dim=16)
    torch.manual_seed(0)
    ref = TimmVOLO((1, 1, 1, 1), **kw).double()
    ours = VOLO((1, 1, 1, 1), **kw).double()
    ours.load_state_dict(ref.state_dict())
    # column_sum_grads=False: torch's own classes
    torchs = list(VOLO((1, 1, 1, 1), column_sum_grads=False, **kw).modules())
    assert {type(m) for m in torchs} >= {nn.Linear, nn.LayerNorm}
    assert not any(isinstance(m, (Linear, LayerNorm)) for m in torchs)
    assert any(type(m) is Linear for m in ours.modules())
    assert any(type(m) is LayerNorm for m in ours.modules())
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    g = torch.randn(2, 7, dtype=F64)
    for model in (ref, ours):
        (model(x) * g).sum().backward()
    assert all(n > 0 for n in calls.values()), calls
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10, msg=name)
