"""A check shared by the tests of training under ``torch.compile`` at changing input sizes
(``tests/test_block_contract.py``, ``tests/layers/test_non_local.py``)."""
from __future__ import annotations

import torch
from torch import nn


def check_compiled_training(block: nn.Module, compiled: nn.Module,
                            shapes: list[tuple[int, ...]],
                            memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """A training step of ``compiled`` (``torch.compile`` of ``block``) at each input shape in
    turn (dynamic sizes from the second): its output and the gradients of the input and of
    every parameter equal eager ``block``'s."""
    for shape in shapes:
        x = torch.randn(shape).to(memory_format=memory_format).requires_grad_()
        inputs = [x, *block.parameters()]
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), inputs)
        ref = block(x)
        ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for grad, ref_grad in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)
