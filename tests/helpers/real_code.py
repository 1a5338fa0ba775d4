"""Models and losses written the way real training code is (issue 11): the step makes or casts float32.

Each model takes ``scale``: 1.0 is correct, anything else plants a backward bug (its weight gradient
multiplied by ``scale`` in a custom autograd function, the forward unchanged).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers.torch_zoo import CustomLinear, _linear_fn


def linear(d_in: int, d_out: int, scale: float = 1.0) -> nn.Module:
    """``nn.Linear``'s function; with ``scale != 1`` its weight gradient is scaled (a planted bug)."""
    if scale == 1.0:
        return nn.Linear(d_in, d_out)
    return CustomLinear(_linear_fn(scale_w=scale), d_in, d_out)


class Binary(nn.Module):
    """A binary classifier: one logit per row."""

    def __init__(self, d: int = 6, scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(linear(d, 8, scale), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def bce_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The most common binary-classification line there is: integer labels made float."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y.float())


def gan_step(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """A discriminator's loss on real samples: targets made in the step with the default dtype."""
    logits = model(batch)
    return F.binary_cross_entropy_with_logits(logits, torch.ones(batch.shape[0], 1))


class Denoiser(nn.Module):
    """A diffusion-style network: the timestep drawn in the step goes through its own Linear."""

    def __init__(self, d: int = 6, scale: float = 1.0) -> None:
        super().__init__()
        self.inp = linear(d, 8, scale)
        self.time = nn.Linear(1, 8)
        self.out = nn.Linear(8, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x) + self.time(t[:, None])))


def diffusion_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Noise and timestep drawn inside the step, as diffusion training does."""
    t = torch.rand(x.shape[0], device=x.device)
    noise = torch.randn_like(x)
    noisy = (1 - t[:, None]) * x + t[:, None] * noise
    return F.mse_loss(model(noisy, t), noise)


class Constants(nn.Module):
    """Float32 constants the float64 copy does not convert: a plain attribute and a cast buffer."""

    def __init__(self, d: int = 6, scale: float = 1.0) -> None:
        super().__init__()
        self.lin = linear(d, 8, scale)
        g = torch.Generator().manual_seed(0)
        self.mix = torch.randn(8, 8, generator=g) / 3  # a plain attribute: .to() leaves it
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x)) @ self.mix
        return self.head(h * self.gain.to(torch.float32))


class RMSNorm(nn.Module):
    """The RMSNorm of public transformer libraries: computed in float32, cast back."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


class TinyCausalLM(nn.Module):
    """A library-style causal LM: embeddings, RMSNorm, an MLP block, a tied-free head."""

    def __init__(self, vocab: int = 17, d: int = 8, scale: float = 1.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm1 = RMSNorm(d)
        self.up = linear(d, 16, scale)
        self.down = nn.Linear(16, d)
        self.norm2 = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        n = self.norm1(h)
        up = self.up(n.reshape(-1, n.shape[-1])).reshape(*n.shape[:-1], -1)
        h = h + self.down(F.gelu(up))
        return self.head(self.norm2(h))


def lm_step(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss computed on ``logits.float()``, as public libraries' losses do."""
    logits = model(ids[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def binary_batch(n: int = 16, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g)


def token_batch(n: int = 4, length: int = 9, vocab: int = 17, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


class _ScaledReLUFn(torch.autograd.Function):
    """ReLU whose backward is multiplied by ``scale`` (a planted bug when ``scale != 1``)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x)
        ctx.scale = scale
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0).to(g.dtype) * ctx.scale, None


class ScaledReLU(nn.Module):
    """An activation module: ReLU's forward, its backward scaled by ``scale``."""

    def __init__(self, scale: float = 0.9) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledReLUFn.apply(x, self.scale)


class Decoder(nn.Module):
    """``nn.TransformerDecoderLayer(activation=<a module>)``: ``copy.deepcopy`` gives it back with
    ``F.relu`` in the module's place (its ``__setstate__``), so a float64 copy computes another
    function's gradient."""

    def __init__(self, activation: nn.Module, d_model: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.decoder = nn.TransformerDecoderLayer(
            d_model, 2, dim_feedforward=32, dropout=dropout, activation=activation, batch_first=True
        )
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.decoder(h, h)).mean(1)


def regression_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def sequence_batch(n: int = 4, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, 8, generator=g), torch.randn(n, 1, generator=g)
