"""PyTorch adapter: ``check_gradients`` / ``assert_gradients`` for any ``torch.nn.Module``.

The check runs on a float64 twin of the model (a deep copy; where a model cannot be copied, the
model itself is converted and restored exactly), reseeds every loss evaluation from a private seed
inside ``torch.random.fork_rng``, restores buffers after every evaluation and never touches
``.grad``: parameters, buffers, RNG streams and gradients are bit-identical after the call.

Example:
    >>> import torch
    >>> from gradwatch.torch import check_gradients
    >>> model = torch.nn.Linear(3, 2)
    >>> batch = (torch.randn(4, 3), torch.randn(4, 2))
    >>> def loss_fn(m, b):
    ...     x, y = b
    ...     return torch.nn.functional.mse_loss(m(x), y)
    >>> check_gradients(model, batch, loss_fn).verdict
    'pass'
"""

from gradwatch.torch.checker import assert_gradients, check_gradients
from gradwatch.torch.localize import localize

__all__ = ["assert_gradients", "check_gradients", "localize"]
