"""Small real torch models, correct and buggy, shared by the torch and Lightning tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=32, classes=4, dropout=0.2, batchnorm=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.fc1(x))))
        return self.out(torch.tanh(self.fc2(h)))


class CNN(nn.Module):
    """Conv biases right before BatchNorm (true gradient zero), max-pool kinks, dropout."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 2 * 2, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


class RNN(nn.Module):
    def __init__(self, vocab=30, classes=4, cell="lstm", sparse=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8, sparse=sparse)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(8, 12, num_layers=2, batch_first=True, dropout=0.1)
        self.out = nn.Linear(12, classes)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.out(h[:, -1])


class Transformer(nn.Module):
    def __init__(self, vocab=30, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.out = nn.Linear(16, classes)

    def forward(self, ids):
        return self.out(self.enc(self.emb(ids)).mean(1))


def classify(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_batch(kind: str, seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(1000 + seed)
    y = torch.randint(0, 4, (n,), generator=g)
    if kind == "mlp":
        return torch.randn(n, 12, generator=g), y
    if kind == "cnn":
        return torch.randn(n, 1, 8, 8, generator=g), y
    return torch.randint(0, 30, (n, 7), generator=g), y


def zoo(seed: int):
    """(name, model, batch kind) for every healthy model, freshly initialised from ``seed``."""
    torch.manual_seed(seed)
    return [
        ("mlp-dropout", MLP(), "mlp"),
        ("mlp-batchnorm", MLP(batchnorm=True), "mlp"),
        ("cnn", CNN(), "cnn"),
        ("lstm", RNN(cell="lstm"), "seq"),
        ("gru-sparse-emb", RNN(cell="gru", sparse=True), "seq"),
        ("transformer", Transformer(), "seq"),
    ]


# --- injected bugs -------------------------------------------------------------------------------


def _linear_fn(scale_w=1.0, scale_b=1.0, drop_bias=False, drop_x_term=False):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return x @ w.t() + b

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            gx = g @ w
            gw = scale_w * (g.t() @ x)
            gb = None if drop_bias else scale_b * g.sum(0)
            return gx, gw, gb

    return Fn


class CustomLinear(nn.Module):
    def __init__(self, fn, d_in=12, d_out=16):
        super().__init__()
        ref = nn.Linear(d_in, d_out)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x, self.weight, self.bias)


class BadSoftplusFn(torch.autograd.Function):
    """softplus(x) = log(1 + e^x) with the derivative of e^x / (1 + e^x)^2 (a wrong derivative)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 - s)


class SwishMissingTermFn(torch.autograd.Function):
    """x * sigmoid(x) whose backward misses the x * s * (1 - s) term of the product rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


class BuggyNet(nn.Module):
    """first layer → activation → dropout → head; the bug is in ``first`` or ``act``."""

    def __init__(self, first=None, act=None):
        super().__init__()
        self.first = first if first is not None else nn.Linear(12, 16)
        self.act = act if act is not None else nn.Tanh()
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.drop(self.act(self.first(x))))


class DetachedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 16)
        self.gate = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return self.lin(x) * self.gate.detach()  # the gate is cut out of the graph


class ItemLeak(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 16)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.temperature.item()  # a Python float: no gradient path


def bugs():
    """(name, factory, expected event kind, tensor with the bug)."""
    return [
        (
            "scaled-0.98",
            lambda: BuggyNet(first=CustomLinear(_linear_fn(scale_w=0.98))),
            "mismatch",
            "first.weight",
        ),
        (
            "scaled-0.9",
            lambda: BuggyNet(first=CustomLinear(_linear_fn(scale_w=0.9))),
            "mismatch",
            "first.weight",
        ),
        (
            "sign-flip-bias",
            lambda: BuggyNet(first=CustomLinear(_linear_fn(scale_b=-1.0))),
            "mismatch",
            "first.bias",
        ),
        (
            "missing-bias-grad",
            lambda: BuggyNet(first=CustomLinear(_linear_fn(drop_bias=True))),
            "disconnected",
            "first.bias",
        ),
        (
            "missing-term",
            lambda: BuggyNet(act=Activation(SwishMissingTermFn)),
            "mismatch",
            "first.weight",
        ),
        (
            "wrong-derivative",
            lambda: BuggyNet(act=Activation(BadSoftplusFn)),
            "mismatch",
            "first.weight",
        ),
        ("detach", lambda: BuggyNet(first=DetachedWeight()), "disconnected", "first.gate"),
        ("item-leak", lambda: BuggyNet(first=ItemLeak()), "disconnected", "first.temperature"),
    ]
