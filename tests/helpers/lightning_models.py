"""LightningModules and data shared by the Lightning tests and the DDP script."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F


def loader(n=256, d=12, classes=4, batch_size=32, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1) + 0) % classes
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )


def image_loader(n=128, batch_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05, optimizer: str = "sgd"):
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer = optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def sigmoid_stack(depth=14, width=16, d_in=12, classes=4):
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def exploding_stack(depth=8, width=16, d_in=12, classes=4, gain=3.0):
    torch.manual_seed(0)
    layers = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.normal_(lin.weight, std=gain / d**0.5)
        layers.append(lin)
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


class ScaledGradFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, scale):
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, ctx.scale * (g.t() @ x), None


class BuggyLinear(nn.Module):
    """A linear layer whose weight gradient is multiplied by ``scale`` (1.0: correct)."""

    def __init__(self, d_in=12, d_out=16, scale=0.9):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(d_in, d_out).weight.detach().clone())
        self.scale = scale

    def forward(self, x):
        return ScaledGradFn.apply(x, self.weight, self.scale)


def buggy_net(scale=0.9):
    return nn.Sequential(BuggyLinear(scale=scale), nn.Tanh(), nn.Linear(16, 4))


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
