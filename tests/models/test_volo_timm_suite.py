"""timm's model-suite checks for TorchScript and FX (``tests/test_models.py`` of timm:
``test_model_forward_torchscript``, ``test_model_forward_fx``, ``test_model_backward_fx``,
``test_model_forward_fx_torchscript``, plus a TorchScript backward), run on mmattn's
``volo_d1``/``volo_d2`` with the same calls: ``timm.set_scriptable`` + ``torch.jit.script``,
torchvision's ``create_feature_extractor`` with timm's not-traced modules and functions
(``timm.models.get_notrace_modules``/``get_notrace_functions``), input sizes shrunk to the
suite's targets (128). Unlike the suite, the scripted outputs are also compared with eager
ones (the reference path: TorchScript compiles it). ``volo_d3``..``volo_d5`` are scripted
and traced on the meta device (compilation only: no weights, no forward).
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torch import nn

import mmattn  # noqa: F401  (registers the models)
from mmattn.ops import extension

fx_extraction = pytest.importorskip('torchvision.models.feature_extraction')

# (entrypoint, extra create_model kwargs): the default suite runs volo_d1 with one block per
# stage (every block type, the same code paths, a fraction of the time); the full-size
# volo_d1 and volo_d2 (10-30 s per test on 2 CPU cores) run with the slow tests
RUN = [pytest.param('volo_d1', {'layers': (1, 1, 1, 1)}, id='volo_d1-1block'),
       pytest.param('volo_d1', {}, id='volo_d1', marks=pytest.mark.slow),
       pytest.param('volo_d2', {}, id='volo_d2', marks=pytest.mark.slow)]
# scripted and traced on the meta device (compilation only), 5-10 s each
COMPILE_ONLY = [pytest.param(n, marks=pytest.mark.slow) for n in ('volo_d3', 'volo_d4', 'volo_d5')]
TARGET_JIT_SIZE = TARGET_FX_SIZE = 128   # the suite's TARGET_JIT_SIZE / TARGET_FWD_FX_SIZE


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager runs take the reference path, which TorchScript compiles (on CPU without built
    kernels that is what ``auto`` does anyway)."""
    monkeypatch.setenv('MMATTN_BACKEND', 'reference')


@pytest.fixture(autouse=True)
def _simple_jit_executor() -> Iterator[None]:
    """As the suite does: the profiling executor without profiling runs (no specialisation
    passes to wait for in a unit test)."""
    executor = torch._C._jit_set_profiling_executor(True)
    mode = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_executor(executor)
    torch._C._jit_set_profiling_mode(mode)


def input_size(model: nn.Module, target: int) -> tuple[int, ...]:
    """The suite's ``_get_input_size``: the pretrained size, each side capped at ``target``
    unless the model has a fixed input size."""
    cfg = model.pretrained_cfg
    size = tuple(cfg['input_size'])
    if cfg.get('fixed_input_size'):
        return size
    return tuple(min(s, target) for s in size) if max(size) > target else size


def create_fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """The suite's ``_create_fx_model``: an FX feature extractor returning the model's output
    node(s), traced with timm's leaf modules and autowrapped functions."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(),
                         autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = fx_extraction.get_graph_node_names(model,
                                                                 tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:  # every node feeding the output (a model may return a tuple in training)
        graph = fx_extraction.NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return fx_extraction.create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs)


def cat_outputs(outputs: Any) -> torch.Tensor:
    outputs = tuple(outputs.values()) if isinstance(outputs, dict) else outputs
    return torch.cat(outputs) if isinstance(outputs, tuple) else outputs


def assert_every_parameter_has_grad(model: nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing[:5]}'
    assert sum(p.grad.numel() for p in model.parameters()) == \
        sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name, kwargs', RUN)
def test_forward_torchscript(name: str, kwargs: dict) -> None:
    with timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, *input_size(model, TARGET_JIT_SIZE))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out, ref = scripted(x), model(x)
    assert out.shape == (1, 1000)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, kwargs', RUN)
def test_backward_torchscript(name: str, kwargs: dict) -> None:
    with timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False, num_classes=42, **kwargs).train()
    scripted = torch.jit.script(model)
    out = scripted(torch.randn(2, *input_size(model, TARGET_JIT_SIZE)))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert not torch.isnan(out).any()
    assert_every_parameter_has_grad(scripted)


@pytest.mark.parametrize('name, kwargs', RUN)
def test_forward_fx(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, *input_size(model, TARGET_FX_SIZE))
    with torch.inference_mode():
        ref = model(x)
        out = cat_outputs(create_fx_model(model)(x))
    assert torch.equal(out, ref)  # the suite's `torch.all(fx_outputs == outputs)`
    assert not torch.isnan(out).any()


@pytest.mark.parametrize('name, kwargs', RUN)
def test_backward_fx(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=42, **kwargs).train()
    fx_model = create_fx_model(model, train=True)
    out = cat_outputs(fx_model(torch.randn(2, *input_size(model, TARGET_FX_SIZE))))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert not torch.isnan(out).any()
    assert_every_parameter_has_grad(fx_model)


@pytest.mark.parametrize('name, kwargs', RUN)
def test_forward_fx_torchscript(name: str, kwargs: dict) -> None:
    with timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, *input_size(model, TARGET_JIT_SIZE))
    scripted = torch.jit.script(create_fx_model(model))
    with torch.inference_mode():
        out = cat_outputs(scripted(x))
        ref = model(x)
    assert out.shape == (1, 1000)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', COMPILE_ONLY)
def test_larger_variants_script_and_trace(name: str) -> None:
    with torch.device('meta'), timm.set_scriptable(True):
        model = timm.create_model(name, pretrained=False).eval()
    assert isinstance(torch.jit.script(model), torch.jit.ScriptModule)
    graph = create_fx_model(model).graph
    assert any(n.op == 'call_module' and n.target.endswith('attn.proj') for n in graph.nodes)


def test_fx_feature_extraction_matches_intermediates() -> None:
    """Detection/segmentation use: stage features through FX (timm's ``feature_cls='fx'``,
    graph nodes named after the stages) equal ``forward_intermediates``."""
    model = timm.create_model('volo_d1', pretrained=False, layers=(1, 1, 1, 1)).eval()
    feats = timm.models.FeatureGraphNet(model, out_indices=(0, 1, 2, 3))
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours = feats(x)
        ref = model.forward_intermediates(x, intermediates_only=True)
    assert len(ours) == len(ref) == 4
    for out, expected in zip(ours, ref):  # the stage modules' outputs are channels-last
        torch.testing.assert_close(out.permute(0, 3, 1, 2), expected)


def test_script_refuses_what_it_cannot_compile() -> None:
    """TorchScript compiles the logits path and the reference aggregation: the token-labelling
    forward and an explicitly requested compiled kernel refuse, naming the argument."""
    dense = timm.create_model('volo_d1', pretrained=False, layers=(1, 1, 1, 1),
                              return_dense=True)
    with pytest.raises(RuntimeError, match='return_dense=True cannot be scripted'):
        torch.jit.script(dense)
    block = mmattn.layers.OutlookAttention(16, backend='cpu')
    with pytest.raises(RuntimeError, match="backend='cpu'"):
        torch.jit.script(block)


def test_traced_block_keeps_the_tiling_check() -> None:
    """A geometry that cannot tile every size still raises the eager ValueError from the
    traced graph (the check is a graph node, not a traced branch)."""
    block = mmattn.layers.OutlookAttention(16, kernel_size=4, padding=1, stride=2).eval()
    graph = torch.fx.symbolic_trace(block)
    x = torch.randn(1, 16, 8, 8)  # tiles: floor((8 + 2 - 4) / 2) + 1 == ceil(8 / 2)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), block(x))
    with pytest.raises(ValueError, match='do not tile an input of height 7'):
        graph(torch.randn(1, 16, 7, 8))


@pytest.fixture
def cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """mmattn's C++ CPU kernels loaded (JIT-built and cached, as tests/ops does), for one
    test; ``backend='auto'`` then takes them."""
    saved = dict(extension._state)
    extension.build_jit(with_cuda=False)
    monkeypatch.delenv('MMATTN_BACKEND')
    try:
        yield
    finally:
        extension.reset_state(**saved)


def test_forward_fx_equals_eager_on_the_kernels(cpu_kernels: None) -> None:
    """With compiled kernels, eager VOLO runs the fused outlook kernel path; the FX graph,
    whose aggregation node picks its path when it runs, gives exactly the same logits (the
    suite's equality), although the kernel and the reference differ by rounding."""
    model = timm.create_model('volo_d1', pretrained=False, layers=(1, 1, 1, 1)).eval()
    x = torch.randn(1, *input_size(model, TARGET_FX_SIZE))
    tokens = torch.randn(1, 16, 16, 192)
    assert mmattn.ops.dispatch.select_backend('outlook', tokens)[0] == 'cpu'
    fx_model = create_fx_model(model)
    assert any(n.target is mmattn.ops.outlook_attention for n in fx_model.graph.nodes)
    with torch.inference_mode():
        ref = model(x)
        out = cat_outputs(fx_model(x))
    assert torch.equal(out, ref)
