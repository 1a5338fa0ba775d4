"""``GradWatch`` for Lightning: ``Trainer(callbacks=[GradWatch()])``.

Example:
    >>> from gradwatch.lightning import GradWatch
    >>> cb = GradWatch(check_every_n_steps=50, on_explode="halt")
    >>> cb.config.on_explode
    'halt'
"""

from gradwatch.lightning.callback import GradWatch

__all__ = ["GradWatch"]
