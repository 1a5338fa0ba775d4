"""Does a float64 evaluation compute the model's function? Its loss and gradient against the model's own.

A float64 copy of a model is only worth checking if it is the model's function: ``copy.deepcopy``
of ``nn.TransformerDecoderLayer(activation=<a module>)`` gives back ``F.relu`` in the module's place,
and a check of that copy passes a real bug in the module. Before each check the adapter evaluates
the model itself — in its own dtype, on the same batch and seed — and hands the numbers here: the
two losses and, per checked tensor, the norms of both gradients and of their difference.

The tolerance follows the precision the model's own pass really computed in (the lowest floating
dtype it saved for backward: bfloat16 under a bf16 autocast even when the parameters are float32).
Measured (torch 2.13 CPU; the torch zoo in train mode — MLP with dropout, BatchNorm, CNN, LSTM,
GRU with a sparse embedding, Transformer — seeds 0-2, and the real-code models: BCE with
``y.float()``, a tiny causal LM, a diffusion step), the float64 copy against the model's own pass:
float32 models agree to ≤ 2.2e-7 in the loss and ≤ 3.5e-7 in the gradient; float16 autocast to
≤ 1.4e-4 and ≤ 2.1e-3; bfloat16 (autocast, or bfloat16 parameters) only to ≤ 1.1e-2 and
≤ 8.6e-2. A ``TransformerDecoderLayer`` whose x0.9-backward activation module the deep copy
replaced by ``F.relu`` agrees in the loss (3.7e-8: same forward) and differs by 2.0e-2 in the
gradient. The gradient is the stronger test, and at bfloat16 precision such a copy cannot be told
from rounding.

Only numpy and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Agreement", "Tolerance", "agreement", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """How far a float64 evaluation may be from the model's own pass in one precision.

    Attributes:
        precision: The dtype name the model's pass computed in (``"float32"``, ``"bfloat16"``...).
        loss: Relative tolerance on the loss.
        gradient: Relative tolerance on the gradient (L2 over the checked tensors).
    """

    precision: str
    loss: float
    gradient: float


#: Relative (loss, gradient) tolerances by the precision of the model's pass: for float32 about
#: 500 and 3000 x the largest differences measured between correct copies and the model (well
#: below the 2e-2 of a copy that lost a module), for 16-bit floats 3-15 x (see the module text).
_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (2e-3, 2e-2),
    "bfloat16": (5e-2, 0.25),
}


def tolerance_for(precision: str) -> Tolerance:
    """The tolerance for a model whose own pass computed in ``precision``.

    Unknown names (8-bit floats...) get the 16-bit tolerances.

    Example:
        >>> tolerance_for("float32")
        Tolerance(precision='float32', loss=0.0001, gradient=0.001)
    """
    loss, gradient = _TOLERANCES.get(precision, _TOLERANCES["bfloat16"])
    return Tolerance(precision=precision, loss=loss, gradient=gradient)


@dataclass(frozen=True)
class Agreement:
    """A float64 evaluation against the model's own pass, at the same point, batch and seed.

    Attributes:
        loss_error: ``|L64 − L| / max(|L64|, |L|, tiny)`` (NaN when a loss is not finite).
        gradient_error: ``‖g64 − g‖ / max(‖g64‖, ‖g‖)`` over the checked tensors (0 when both are
            zero; NaN when a gradient is not finite).
        worst_tensor: The tensor with the largest share of the gradient difference.
        tolerance: What the errors are judged against.
    """

    loss_error: float
    gradient_error: float
    worst_tensor: str | None
    tolerance: Tolerance

    @property
    def agrees(self) -> bool:
        """Both errors finite and within tolerance."""
        return (
            self.loss_error <= self.tolerance.loss
            and self.gradient_error <= self.tolerance.gradient
        )

    def describe(self) -> str:
        """The disagreement in words, to follow "the float64 copy's" (empty when they agree).

        Example:
            >>> a = Agreement(3.1e-2, 0.0, None, tolerance_for("float32"))
            >>> "the float64 copy's " + a.describe()
            "the float64 copy's loss differs from the model's by 3.1e-02 (relative; tolerance 1e-04 for a float32 model)"
        """
        tol = self.tolerance
        where = f" for a {tol.precision} model"
        if not self.loss_error <= tol.loss:
            return (
                f"loss differs from the model's by {_number(self.loss_error)} "
                f"(relative; tolerance {tol.loss:.0e}{where})"
            )
        if not self.gradient_error <= tol.gradient:
            worst = f", most in {self.worst_tensor}" if self.worst_tensor else ""
            return (
                f"gradient differs from the model's own by {_number(self.gradient_error)} "
                f"(relative L2 over the checked tensors{worst}; tolerance {tol.gradient:.0e}"
                f"{where})"
            )
        return ""


def _number(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else "a non-finite amount"


def agreement(
    loss: float,
    model_loss: float,
    norms: Sequence[tuple[str, float, float, float]],
    precision: str,
) -> Agreement:
    """Compare a float64 evaluation with the model's own pass.

    Args:
        loss: The float64 evaluation's loss.
        model_loss: The model's own loss (its dtype, same batch and seed).
        norms: Per checked tensor: ``(name, ‖g64‖, ‖g‖, ‖g64 − g‖)``, norms computed in float64
            (a tensor without a gradient contributes zeros).
        precision: The dtype name the model's pass computed in (see :func:`tolerance_for`).

    Example:
        >>> a = agreement(1.0, 1.0, [("w", 1.0, 1.0, 0.1)], "float32")
        >>> a.agrees, a.gradient_error, a.worst_tensor
        (False, 0.1, 'w')
        >>> agreement(1.0, 1.0 + 1e-8, [("w", 1.0, 1.0, 1e-7)], "float32").agrees
        True
    """
    tol = tolerance_for(precision)
    loss_error = _relative(loss, model_loss)
    table = np.asarray([n[1:] for n in norms], dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(table)):
        return Agreement(loss_error, math.nan, None, tol)
    ours, theirs, diff = (float(np.sqrt(np.sum(np.square(table[:, k])))) for k in range(3))
    scale = max(ours, theirs)
    gradient_error = diff / scale if scale > 0 else 0.0
    worst = None
    if diff > 0:
        worst = norms[int(np.argmax(table[:, 2]))][0]
    return Agreement(loss_error, gradient_error, worst, tol)


def _relative(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    scale = max(abs(a), abs(b), np.finfo(np.float64).tiny)
    return abs(a - b) / scale
