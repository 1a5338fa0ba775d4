"""Models with one planted backward bug each, for localization tests (torch).

Each bug sits in one module; ``localize`` must name that module and no other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ScaledGELUFn(torch.autograd.Function):
    """GELU whose backward is scaled by ``scale`` (1.0: correct)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return F.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(F.gelu(xx), xx, g)
        return ctx.scale * d, None


class MyGELU(nn.Module):
    """A parameter-free activation with a hand-written backward."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ScaledGELUFn.apply(x, self.scale)


class SampleNormFn(torch.autograd.Function):
    """Per-sample normalisation over all but the batch dimension, hand-written backward.

    ``drop_term=True`` forgets the ``- x̂ · mean(g · x̂)`` term of the input gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, drop_term):
        dims = tuple(range(1, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        inv = torch.rsqrt(var + 1e-5)
        xhat = (x - mean) * inv
        ctx.save_for_backward(xhat, inv, weight)
        ctx.drop_term = drop_term
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, g):
        xhat, inv, weight = ctx.saved_tensors
        dims = tuple(range(1, g.dim()))
        shape = (1, -1) + (1,) * (g.dim() - 2)
        gw = g * weight.view(shape)
        dx = gw - gw.mean(dim=dims, keepdim=True)
        if not ctx.drop_term:
            dx = dx - xhat * (gw * xhat).mean(dim=dims, keepdim=True)
        dx = dx * inv
        channel = (0, *range(2, g.dim()))
        return dx, (g * xhat).sum(dim=channel), g.sum(dim=channel), None


class SampleNorm(nn.Module):
    def __init__(self, channels: int, drop_term: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))
        self.drop_term = drop_term

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SampleNormFn.apply(x, self.weight, self.bias, self.drop_term)


class Gate(nn.Module):
    """``x * gate``; ``detached=True`` cuts the gate out of the graph."""

    def __init__(self, channels: int, detached: bool = False) -> None:
        super().__init__()
        self.gate = nn.Parameter(1.0 + 0.1 * torch.randn(channels))
        self.detached = detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate.detach() if self.detached else self.gate
        return x * g.view(1, -1, 1, 1)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, act: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class LocCNN(nn.Module):
    """conv block → pool → conv block → pool → gate → dropout → head; 8×8 single-channel input.

    ``bug``: ``None`` (correct), ``"activation"`` (block2's GELU backward ×0.9), ``"norm"``
    (block1's normalisation drops a term), ``"hook"`` (a backward hook scales block2.conv's
    grad_input by 0.9), ``"twice"`` (one ×0.9 GELU instance used by both blocks), ``"detached"``
    (the gate's parameter is detached).
    """

    def __init__(self, bug: str | None = None, classes: int = 3) -> None:
        super().__init__()
        act1 = MyGELU(0.9 if bug == "twice" else 1.0)
        act2 = act1 if bug == "twice" else MyGELU(0.9 if bug == "activation" else 1.0)
        self.block1 = Block(1, 4, act1, SampleNorm(4, drop_term=bug == "norm"))
        self.pool = nn.MaxPool2d(2)
        self.block2 = Block(4, 6, act2, SampleNorm(6))
        self.gate = Gate(6, detached=bug == "detached")
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(6 * 2 * 2, classes)
        if bug == "hook":
            self.block2.conv.register_full_backward_hook(
                lambda module, grad_in, grad_out: tuple(
                    None if g is None else 0.9 * g for g in grad_in
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.block1(x))
        x = self.pool(self.block2(x))
        return self.head(self.drop(self.gate(x)).flatten(1))


#: bug → the module ``localize`` must name.
CNN_CULPRITS = {
    "activation": "block2.act",
    "norm": "block1.norm",
    "hook": "block2.conv",
    "twice": "block1.act",
    "detached": "gate",
}


def cnn_batch(n: int = 8, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def cnn_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def demo_transformer(bug: bool, vocab: int = 16) -> nn.Module:
    """``lightning.pytorch.demos.Transformer``, small; decoder layer 1's activation is a
    ``MyGELU`` (backward ×0.9 when ``bug``)."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=vocab, ninp=8, nhead=2, nhid=16, nlayers=2, dropout=0.1)
    for k, layer in enumerate(model.transformer.decoder.layers):
        layer.activation = MyGELU(0.9 if bug and k == 1 else 1.0)
    return model


TRANSFORMER_CULPRIT = "transformer.decoder.layers.1.activation"


def token_batch(n: int = 4, length: int = 6, vocab: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    inputs, target = batch
    out = model(inputs, target)
    return F.nll_loss(out, target.reshape(-1))
