"""Tiny models written the way public model libraries write them, correct and with planted bugs.

Used by ``benchmarks/zoo_sweep.py`` (issues 11 and 13). The idioms that break a naive float64 check
are kept on purpose: an RMSNorm and a LayerNorm that cast to float32 and back, a causal mask made
with ``torch.ones``/``torch.tril`` in ``forward``, rotary angles and position ids made with
``torch.arange`` in ``forward`` (the inverse frequencies a float32 buffer), a softmax with
``dtype=torch.float32``, tied embeddings, a loss on ``logits.float()``, a BCE loss on ``y.float()``,
and a diffusion step drawing ``t = torch.rand(B)`` and its noise inside the step.

Each model takes ``bug``: ``None`` (correct) or one of :data:`BUG_KINDS`, planted in one module:

- ``"activation"``: an activation whose forward is the library's and whose backward (a custom
  ``torch.autograd.Function``) is multiplied by 0.9;
- ``"norm"``: a normalisation computed by a custom ``autograd.Function`` whose input gradient drops
  the term that comes through the mean square (RMSNorm) or the variance (LayerNorm);
- ``"detached"``: a parameter used through ``.detach()``: it never receives a gradient.

:func:`cases` lists, per model, the module that holds each bug and the event a check must raise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

BUG_KINDS = ("activation", "norm", "detached")


# --- planted bugs ---------------------------------------------------------------------------------


class _ScaledBackwardFn(torch.autograd.Function):
    """``fn(x)`` forward; backward: autodiff's derivative of ``fn`` times ``scale``."""

    @staticmethod
    def forward(ctx, x, fn, scale):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        ctx.fn, ctx.scale = fn, scale
        return fn(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(ctx.fn(xx), xx, g)
        return ctx.scale * d, None, None


class ScaledActivation(nn.Module):
    """An activation module with a hand-written backward scaled by ``scale`` (1.0: correct)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], scale: float = 0.9) -> None:
        super().__init__()
        self.fn = fn
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledBackwardFn.apply(x, self.fn, self.scale)


class _RMSNormFn(torch.autograd.Function):
    """``x * rsqrt(mean(x²) + eps)``; ``drop_term`` forgets ``- x r³ mean(g x)`` in the backward."""

    @staticmethod
    def forward(ctx, x, eps, drop_term):  # type: ignore[no-untyped-def]
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, r)
        ctx.drop_term = drop_term
        return x * r

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        x, r = ctx.saved_tensors
        dx = g * r
        if not ctx.drop_term:
            dx = dx - x * r.pow(3) * (g * x).mean(-1, keepdim=True)
        return dx, None, None


class _LayerNormFn(torch.autograd.Function):
    """``(x - mean) * rsqrt(var + eps)``; ``drop_term`` forgets ``- x̂ mean(g x̂)`` in the backward."""

    @staticmethod
    def forward(ctx, x, eps, drop_term):  # type: ignore[no-untyped-def]
        mean = x.mean(-1, keepdim=True)
        inv = torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)
        xhat = (x - mean) * inv
        ctx.save_for_backward(xhat, inv)
        ctx.drop_term = drop_term
        return xhat

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        xhat, inv = ctx.saved_tensors
        dx = g - g.mean(-1, keepdim=True)
        if not ctx.drop_term:
            dx = dx - xhat * (g * xhat).mean(-1, keepdim=True)
        return dx * inv, None, None


# --- library building blocks ----------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama's RMSNorm: computed in float32, cast back to the input dtype, then scaled.

    ``bug="norm"``: the normalisation's backward drops a term; ``bug="detached"``: the weight is
    used detached.
    """

    def __init__(self, d: int, eps: float = 1e-6, bug: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps
        self.bug = bug

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        if self.bug == "norm":
            hidden_states = _RMSNormFn.apply(hidden_states, self.variance_epsilon, True)
        else:
            variance = hidden_states.pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        weight = self.weight.detach() if self.bug == "detached" else self.weight
        return weight * hidden_states.to(input_dtype)


class LayerNorm(nn.Module):
    """A LayerNorm that computes its mean and variance in float32 (``x.float()``, ``type_as``)."""

    def __init__(self, d: int, eps: float = 1e-12, bug: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.bug == "norm":
            h = _LayerNormFn.apply(h, self.eps, True)
        else:
            mean = h.mean(-1, keepdim=True)
            variance = (h - mean).pow(2).mean(-1, keepdim=True)
            h = (h - mean) * torch.rsqrt(variance + self.eps)
        return self.weight * h.type_as(x) + self.bias


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written out as libraries do (``NewGELUActivation``)."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class NewGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return new_gelu(x)


def activation(kind: str, bug: bool) -> nn.Module:
    """The library's activation module, or one with its backward ×0.9 (same forward)."""
    if kind == "silu":
        return ScaledActivation(F.silu) if bug else nn.SiLU()
    return ScaledActivation(new_gelu) if bug else NewGELU()


# --- a Llama-style causal LM ----------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary angles from a float32 ``inv_freq`` buffer and ``position_ids`` made in ``forward``."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = (
            p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + mask
        attn = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, d: int, inner: int, bug: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inner, bias=False)
        self.up_proj = nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)
        self.act_fn = activation("silu", bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, d: int, heads: int, inner: int, bugs: dict[str, str | None]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(d, bug=bugs.get("input_layernorm"))
        self.self_attn = LlamaAttention(d, heads)
        self.post_attention_layernorm = RMSNorm(d, bug=bugs.get("post_attention_layernorm"))
        self.mlp = LlamaMLP(d, inner, bug=bugs.get("mlp") == "activation")

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyLlama(nn.Module):
    """Embeddings, 2 pre-norm layers (RoPE attention, SwiGLU), final RMSNorm, tied LM head.

    Bugs: ``activation`` in ``layers.1.mlp.act_fn``, ``norm`` in ``layers.0.input_layernorm``,
    ``detached`` the weight of ``layers.1.post_attention_layernorm``.
    """

    CULPRITS: ClassVar[dict[str, str]] = {
        "activation": "layers.1.mlp.act_fn",
        "norm": "layers.0.input_layernorm",
        "detached": "layers.1.post_attention_layernorm",
    }
    DETACHED = "layers.1.post_attention_layernorm.weight"

    def __init__(
        self, vocab: int = 32, d: int = 16, heads: int = 2, layers: int = 2, bug: str | None = None
    ) -> None:
        super().__init__()
        plan: list[dict[str, str | None]] = [{} for _ in range(layers)]
        if bug == "activation":
            plan[1]["mlp"] = "activation"
        elif bug == "norm":
            plan[0]["input_layernorm"] = "norm"
        elif bug == "detached":
            plan[1]["post_attention_layernorm"] = "detached"
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaLayer(d, heads, 2 * d, p) for p in plan)
        self.norm = RMSNorm(d)
        self.rotary_emb = RotaryEmbedding(d // heads)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        h = self.embed_tokens(input_ids)
        position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, -1)
        cos, sin = self.rotary_emb(h, position_ids)
        causal = torch.tril(torch.ones(t, t, device=h.device))
        mask = torch.zeros(t, t, device=h.device).masked_fill(causal == 0, float("-inf"))
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.norm(h))


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on ``logits.float()``, as the libraries' LM losses compute it."""
    logits = model(input_ids).float()
    shift_logits = logits[:, :-1, :].contiguous()
    labels = input_ids[:, 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.shape[-1]), labels.view(-1))


def token_ids(seed: int, n: int = 2, length: int = 8, vocab: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + seed)
    return torch.randint(0, vocab, (n, length), generator=g)


# --- a BERT-style encoder classifier --------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word + position (``torch.arange`` in forward) + token type (``zeros_like``), LayerNorm."""

    def __init__(self, vocab: int, d: int, max_len: int, detached: bool = False) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_len, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.LayerNorm = LayerNorm(d)
        self.dropout = nn.Dropout(0.1)
        self.detached = detached

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        token_type_ids = torch.zeros_like(input_ids)
        if self.detached:  # the bug: the position table never learns
            positions = F.embedding(position_ids, self.position_embeddings.weight.detach())
        else:
            positions = self.position_embeddings(position_ids)
        h = self.word_embeddings(input_ids) + positions
        h = h + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(h))


class BertSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = (
            p(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for p in (self.query, self.key, self.value)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + extended_mask
        probs = self.dropout(F.softmax(scores, dim=-1))
        return (probs @ v).transpose(1, 2).reshape(b, t, d)


class BertOutput(nn.Module):
    """Dense, dropout, residual, LayerNorm (post-norm)."""

    def __init__(self, d_in: int, d: int, norm_bug: str | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.dropout = nn.Dropout(0.1)
        self.LayerNorm = LayerNorm(d, bug=norm_bug)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, inner: int, act_bug: bool, norm_bug: str | None) -> None:
        super().__init__()
        self.attention = BertSelfAttention(d, heads)
        self.attention_output = BertOutput(d, d)
        self.intermediate = nn.Linear(d, inner)
        self.intermediate_act_fn = activation("gelu", act_bug)
        self.output = BertOutput(inner, d, norm_bug)

    def forward(self, h: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        h = self.attention_output(self.attention(h, extended_mask), h)
        return self.output(self.intermediate_act_fn(self.intermediate(h)), h)


class TinyBert(nn.Module):
    """A BERT-style sequence classifier: padding mask, 2 post-norm layers, pooler, classifier.

    Bugs: ``activation`` in ``layers.0.intermediate_act_fn``, ``norm`` in
    ``layers.1.output.LayerNorm``, ``detached`` the position table (used detached in
    ``embeddings``).
    """

    CULPRITS: ClassVar[dict[str, str]] = {
        "activation": "layers.0.intermediate_act_fn",
        "norm": "layers.1.output.LayerNorm",
        "detached": "embeddings",
    }
    DETACHED = "embeddings.position_embeddings.weight"

    def __init__(
        self,
        vocab: int = 32,
        d: int = 16,
        heads: int = 2,
        classes: int = 3,
        max_len: int = 16,
        bug: str | None = None,
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, d, max_len, detached=bug == "detached")
        self.layers = nn.ModuleList(
            BertLayer(
                d,
                heads,
                2 * d,
                bug == "activation" and k == 0,
                "norm" if bug == "norm" and k == 1 else None,
            )
            for k in range(2)
        )
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids)
        extended = (1.0 - attention_mask[:, None, None, :].to(dtype=h.dtype)) * torch.finfo(
            h.dtype
        ).min
        for layer in self.layers:
            h = layer(h, extended)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


def bert_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits.float(), batch["labels"])


def bert_batch(seed: int, n: int = 4, length: int = 8, vocab: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, length), generator=g) * mask  # 0 pads
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


# --- a binary classifier trained with BCE on y.float() --------------------------------------------


class LogitHead(nn.Module):
    """``dense(h) * exp(logit_scale)``; ``detached=True`` uses the scale detached."""

    def __init__(self, d: int, detached: bool = False) -> None:
        super().__init__()
        self.dense = nn.Linear(d, 1)
        self.logit_scale = nn.Parameter(torch.tensor(0.3))
        self.detached = detached

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.detach() if self.detached else self.logit_scale
        return self.dense(h) * scale.exp()


class BinaryClassifier(nn.Module):
    """proj → LayerNorm (float32) → GELU → dropout → head with a learned logit scale.

    Bugs: ``activation`` in ``act``, ``norm`` in ``norm``, ``detached`` ``head.logit_scale``.
    """

    CULPRITS: ClassVar[dict[str, str]] = {"activation": "act", "norm": "norm", "detached": "head"}
    DETACHED = "head.logit_scale"

    def __init__(self, d_in: int = 10, hidden: int = 16, bug: str | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.norm = LayerNorm(hidden, eps=1e-5, bug=bug if bug == "norm" else None)
        self.act = activation("gelu", bug == "activation")
        self.dropout = nn.Dropout(0.1)
        self.head = LogitHead(hidden, detached=bug == "detached")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.act(self.norm(self.proj(x)))))


def bce_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y.float())


def binary_batch(seed: int, n: int = 16, d: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4000 + seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g)


# --- a diffusion-style denoiser: t and noise drawn in the step ------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, frequencies made with ``torch.arange(dtype=torch.float32)``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / half)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(features)))``; ``detached=True`` uses ``linear_1.weight`` detached."""

    def __init__(self, d_in: int, d: int, detached: bool = False) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d)
        self.linear_2 = nn.Linear(d, d)
        self.detached = detached

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.detached:
            h = F.linear(features, self.linear_1.weight.detach(), self.linear_1.bias)
        else:
            h = self.linear_1(features)
        return self.linear_2(F.silu(h))


class Denoiser(nn.Module):
    """x_t, t → predicted noise: input projection + timestep embedding, RMSNorm, SiLU, output.

    Bugs: ``activation`` in ``act``, ``norm`` in ``norm``, ``detached`` ``time_embedding``'s
    ``linear_1.weight``.
    """

    CULPRITS: ClassVar[dict[str, str]] = {
        "activation": "act",
        "norm": "norm",
        "detached": "time_embedding",
    }
    DETACHED = "time_embedding.linear_1.weight"

    def __init__(self, d: int = 8, hidden: int = 16, bug: str | None = None) -> None:
        super().__init__()
        self.time_features = hidden
        self.inp = nn.Linear(d, hidden)
        self.time_embedding = TimestepEmbedding(hidden, hidden, detached=bug == "detached")
        self.norm = RMSNorm(hidden, bug=bug if bug == "norm" else None)
        self.act = activation("silu", bug == "activation")
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(timestep_embedding(t * 1000, self.time_features))
        h = self.inp(x) + emb
        h = h + self.mid(self.act(self.norm(h)))
        return self.out(h)


def diffusion_loss(model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """A DDPM-style step: ``t = torch.rand(B)`` and the noise drawn here, a cosine schedule."""
    t = torch.rand(x0.shape[0], device=x0.device)
    noise = torch.randn_like(x0)
    alpha_bar = torch.cos(t * math.pi / 2).pow(2)[:, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    return F.mse_loss(model(x_t, t), noise)


def data_batch(seed: int, n: int = 16, d: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(5000 + seed)
    return torch.randn(n, d, generator=g)


# --- the list the sweep runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One library-style model: how to build it (with or without a bug), its batch and loss."""

    name: str
    model: Callable[..., nn.Module]
    batch: Callable[[int], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]

    def build(self, seed: int, bug: str | None = None) -> nn.Module:
        torch.manual_seed(seed)
        return self.model(bug=bug)

    def culprit(self, bug: str) -> str:
        """The module holding ``bug``: the one ``localize`` must name."""
        return self.model.CULPRITS[bug]  # type: ignore[attr-defined,no-any-return]

    def expected(self, bug: str) -> tuple[str, str | None]:
        """The event a check must raise: (kind, tensor or ``None`` for any tensor)."""
        if bug == "detached":
            return "disconnected", self.model.DETACHED  # type: ignore[attr-defined]
        return "mismatch", None


def cases() -> list[Case]:
    return [
        Case("llama-lm", TinyLlama, token_ids, causal_lm_loss),
        Case("bert-cls", TinyBert, bert_batch, bert_loss),
        Case("bce-y.float", BinaryClassifier, binary_batch, bce_loss),
        Case("diffusion-rand-t", Denoiser, data_batch, diffusion_loss),
    ]
