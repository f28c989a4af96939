"""``nn.Linear`` and ``nn.LayerNorm`` whose parameters' gradients come from mmattn's column-sum
kernels on CUDA (:mod:`mmattn.ops.param_grads`), and :func:`use_column_sum_layers`, which puts
them in a model in place of the torch classes.

Same parameters, state dict, initialisation and outputs as the torch classes they subclass;
only the backward's sums over the rows differ (PyTorch's kernels for them took 6.5 ms of
mmattn's VOLO-D1 training step on an H100, batch 128, bf16; see the ops module). Elsewhere (the
CPU, ``torch.compile``, ``torch.jit.script``, tracing) they are the torch layers. Code that
matches modules by their exact class (``type(m) is nn.Linear``, as
``torch.ao.quantization.quantize_dynamic`` does) sees other classes: :func:`restore_torch_layers`
puts torch's back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from mmattn.ops.param_grads import layer_norm, linear

__all__ = ['LayerNorm', 'Linear', 'restore_torch_layers', 'use_column_sum_layers']

# torch.fx records each as one call (decided when the graph runs) instead of tracing the
# device test
torch.fx.wrap('linear')
torch.fx.wrap('layer_norm')


# timm's FX tracer (feature extraction, its model tests) keeps them as the leaf modules that
# torch's classes are
@register_notrace_module
class Linear(nn.Linear):
    """``nn.Linear``; on CUDA its bias gradient is a column sum on mmattn's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


@register_notrace_module
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; on CUDA, over the last dimension with affine parameters, their
    gradients are column sums on mmattn's kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # (TorchScript: the tuple as torch's own forward passes it)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: Linear, nn.LayerNorm: LayerNorm}


def _swap(model: nn.Module, swaps: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    for module in model.modules():
        swap = swaps.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model


def use_column_sum_layers(model: nn.Module) -> nn.Module:
    """Make every ``nn.Linear`` and ``nn.LayerNorm`` of ``model`` (exactly those classes, not
    subclasses) a :class:`Linear` / :class:`LayerNorm`, in place: the same module objects, their
    class changed (parameters, buffers and hooks kept). Returns ``model``."""
    return _swap(model, _SWAPS)


def restore_torch_layers(model: nn.Module) -> nn.Module:
    """Undo :func:`use_column_sum_layers` in place (every :class:`Linear` / :class:`LayerNorm`
    a torch class again): for tools that match modules by their exact class, such as
    ``torch.ao.quantization.quantize_dynamic``. Returns ``model``."""
    return _swap(model, {ours: theirs for theirs, ours in _SWAPS.items()})
