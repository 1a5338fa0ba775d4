"""The update guard: the per-step calm test of a step's norms, and skipping its update.

When a stopping policy covers non-finite (``on_nonfinite``) or exploding (``on_explode``)
gradients, every step's norms are compared on their device with each tensor's explode limit before
the optimizer steps (one boolean host read per step). A step that is not calm has its update
skipped whenever a stopping policy covers what its gradients show: the coming ``optimizer.step()``
leaves weights, optimizer state and the running statistics (snapshot at each accumulation
window's start: a NaN batch corrupts them in the forward pass) as they were.
:class:`~gradwatch.lightning.callback.GradWatch` owns one :class:`UpdateGuard`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from lightning.pytorch import LightningModule

from gradwatch.errors import GradientCheckError
from gradwatch.options import WatchConfig
from gradwatch.torch import _compat as torch_compat

__all__ = ["UpdateGuard", "skipped_update_error"]


class UpdateGuard:
    """The calm test's limits, the running statistics a skipped update restores, and the skip.

    Args:
        config: The callback's configuration (which policies stop training).

    Example:
        >>> guard = UpdateGuard(WatchConfig.create(on_explode="halt"))
        >>> guard.on, guard.explode
        (True, True)
        >>> guard.limit(("w",), torch.device("cpu"), lambda names: np.array([2.0])).tolist()
        [2.0]
    """

    def __init__(self, config: WatchConfig) -> None:
        c = config
        self.config = config
        # Judge every step's norms before the optimizer steps (one boolean host read per step)
        # when a non-finite or exploding gradient must stop training before its update.
        self.explode = c.enable_norms and c.stops("on_explode")
        self.on = self.explode or (c.enable_norms and c.stops("on_nonfinite"))
        self._limits: dict[tuple[tuple[str, ...], torch.device], torch.Tensor] = {}
        self.stats: list[torch.Tensor] = []
        self.saved_stats: list[torch.Tensor] = []
        self.snapshot_due = True

    def setup(self, pl_module: LightningModule) -> None:
        """A new fit: no cached limits; the running statistics a skip must restore."""
        self._limits.clear()
        # Running statistics a skipped update must not keep (a NaN batch corrupts them in the
        # forward pass, before any optimizer step): snapshot at each accumulation window's start.
        self.stats = torch_compat.running_stat_buffers(pl_module) if self.on else []
        self.saved_stats = []
        self.snapshot_due = True

    def snapshot(self) -> None:
        """At a batch's start: keep the running statistics if an accumulation window opens."""
        if self.stats and self.snapshot_due:
            if len(self.saved_stats) != len(self.stats):
                self.saved_stats = [b.detach().clone() for b in self.stats]
            else:
                torch_compat.copy_tensors(self.saved_stats, self.stats)
            self.snapshot_due = False

    def limit(
        self,
        names: tuple[str, ...],
        device: torch.device,
        explode_limits: Callable[[Sequence[str]], npt.NDArray[np.float64]],
    ) -> torch.Tensor:
        """Each tensor's explode limit on the norms' device; ``inf`` and NaN always exceed it.

        Without a stopping ``on_explode`` the limit is float32's largest value: only non-finite
        norms (and float32 overflows, which :meth:`GradNorms.exact` resolves) are not calm.
        """
        key = (names, device)
        cached = self._limits.get(key)
        if cached is None:
            top = float(torch.finfo(torch.float32).max)
            limits = explode_limits(names)
            values = np.minimum(top, limits) if self.explode else np.full(len(names), top)
            cached = torch.tensor(values, dtype=torch.float32, device=device)
            self._limits[key] = cached
        return cached

    def stopping_policy(
        self, nonfinite: bool, values: Sequence[float], limits: npt.NDArray[np.float64]
    ) -> str | None:
        """The stopping policy that covers what a step that is not calm shows (``None``: none).

        ``values`` are the step's exact norms, ``limits`` each tensor's explode limit.
        """
        policies = self.config.policies
        if nonfinite and self.config.stops("on_nonfinite"):
            return policies["on_nonfinite"]
        if self.explode and bool((np.asarray(values) > limits).any()):
            return policies["on_explode"]
        return None

    def skip_update(self, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """Make the coming ``optimizer.step()`` leave weights, optimizer state and the running
        statistics as they were before this step."""
        fused = scaler is not None and torch_compat.optimizer_unscales_itself(optimizer)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if fused and p.grad is not None:
                    # A fused optimizer under a GradScaler checks its own gradients for inf
                    # (the scaler asserts that some were checked): NaN makes it skip the step.
                    p.grad.fill_(math.nan)
                else:
                    # An optimizer leaves a parameter whose .grad is None untouched.
                    p.grad = None
        if self.saved_stats:
            torch_compat.copy_tensors(self.stats, self.saved_stats)


def skipped_update_error(step: int, nonfinite: bool) -> GradientCheckError:
    """The error of a ``raise`` policy for a step whose update was skipped in an ongoing episode.

    Example:
        >>> "at step 7 are non-finite" in str(skipped_update_error(7, True))
        True
    """
    what = "non-finite" if nonfinite else "exploding"
    return GradientCheckError(
        f"GradWatch: the gradients at step {step} are {what} (the episode "
        f"began earlier); this update was skipped"
    )
