"""``GradWatch`` for Lightning: ``Trainer(callbacks=[GradWatch()])``.

Example:
    >>> from gradwatch.lightning import GradWatch
    >>> cb = GradWatch(check_every_n_steps=50, on_explode="halt")
    >>> cb.config.on_explode
    'halt'
"""

from gradwatch._extras import missing_extra

try:
    import lightning.pytorch  # noqa: F401
    import torch  # noqa: F401
except ModuleNotFoundError as _exc:
    raise missing_extra(_exc, "lightning") from _exc

from gradwatch.lightning.callback import GradWatch

__all__ = ["GradWatch"]
