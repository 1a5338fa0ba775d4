"""The words a message uses for the user's framework: the adapters name theirs, the core speaks it.

Example:
    >>> vocabulary("keras").graph_cuts
    'ops.stop_gradient, a .numpy() or NumPy round trip, a cast to an integer dtype or a non-differentiable operation'
    >>> vocabulary("lightning").framework
    'torch'
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FRAMEWORKS", "Vocabulary", "vocabulary"]


@dataclass(frozen=True)
class Vocabulary:
    """Framework-specific phrases of gradwatch's messages.

    Attributes:
        framework: ``"torch"`` or ``"keras"``.
        graph_cuts: What cuts a tensor out of the autodiff graph, as a list of suspects.
        check_gradients: The standalone check to run on one batch.
    """

    framework: str
    graph_cuts: str
    check_gradients: str


_TORCH = Vocabulary(
    framework="torch",
    graph_cuts=".detach(), .item(), .data or a non-differentiable operation",
    check_gradients="gradwatch.torch.check_gradients(model, batch, loss_fn)",
)
_KERAS = Vocabulary(
    framework="keras",
    graph_cuts=(
        "ops.stop_gradient, a .numpy() or NumPy round trip, a cast to an integer dtype or a "
        "non-differentiable operation"
    ),
    check_gradients="gradwatch.keras.check_gradients(model, x, y)",
)
#: Framework names the adapters pass (Lightning speaks torch).
FRAMEWORKS: dict[str, Vocabulary] = {"torch": _TORCH, "lightning": _TORCH, "keras": _KERAS}


def vocabulary(framework: str) -> Vocabulary:
    """The vocabulary of ``framework`` (``"torch"``, ``"lightning"`` or ``"keras"``).

    Raises:
        ValueError: An unknown framework name.
    """
    try:
        return FRAMEWORKS[framework]
    except KeyError:
        raise ValueError(
            f"framework must be one of {', '.join(map(repr, FRAMEWORKS))}; got {framework!r}"
        ) from None
