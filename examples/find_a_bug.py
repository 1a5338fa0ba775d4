"""gradwatch's standalone check finding a real bug in a custom layer.

A hand-written Swish activation (``x * sigmoid(x)``) has a backward that forgets one term of the
product rule. Training would run, the loss would even go down, and nothing would look wrong. The
check compares autodiff with finite differences on a float64 copy and names the layer.

Run: python examples/find_a_bug.py
"""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.torch import check_gradients


class BuggySwishFn(torch.autograd.Function):
    """``x * sigmoid(x)`` with a wrong backward: it drops the ``x * s * (1 - s)`` term."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * s  # correct: grad * (s + x * s * (1 - s))


class SwishFn(BuggySwishFn):
    """The same activation with the right derivative."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad * (s + x * s * (1 - s))


class Swish(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def make_model(fn: type[torch.autograd.Function]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), Swish(fn), nn.Dropout(0.1), nn.Linear(32, 10))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:128] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:128])

    print("== custom Swish with a wrong backward ==")
    report = check_gradients(make_model(BuggySwishFn), (x, y), loss_fn)
    print(report)
    print()
    print("== the same model with the backward fixed ==")
    print(check_gradients(make_model(SwishFn), (x, y), loss_fn))


if __name__ == "__main__":
    main()
