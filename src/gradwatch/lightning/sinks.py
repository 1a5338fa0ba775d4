"""A :class:`~gradwatch.watch.sinks.Sink` that writes through a Trainer's loggers.

Scalars go to every logger (``log_metrics``); histograms and texts (meta, events, schedule) only
to TensorBoard loggers, whose ``experiment`` is a ``SummaryWriter`` — the base ``Logger`` has no
place for them. Every logger gets the running event counts as scalars (``gradwatch/events/<kind>``),
so a CSV-only run with failures never reads as clean; the events themselves also go to the JSON
lines and ``logging``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from gradwatch.lightning import _compat
from gradwatch.report import CheckReport, GradientEvent
from gradwatch.watch import tags

__all__ = ["LoggersSink"]


class LoggersSink:
    """Writes gradwatch records through ``trainer.loggers``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    @property
    def wants_histograms(self) -> bool:
        """Only TensorBoard loggers take histograms."""
        return bool(self._boards())

    def _boards(self) -> list[Any]:
        return [lg.experiment for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if scalars:
            for lg in self.trainer.loggers:
                lg.log_metrics(dict(scalars), step=step)

    def write_meta(self, step: int, meta: Mapping[str, Any]) -> None:
        for board in self._boards():
            board.add_text(tags.META_TAG, json.dumps(dict(meta)), step)
            with contextlib.suppress(Exception):  # a layout is a nicety, never an error
                _compat.tensorboard_file_writer(board).add_summary(tags.custom_scalars_layout())

    def write_norms(self, step: int, norms: Mapping[str, float], global_norm: float) -> None:
        self._scalars(step, tags.norm_scalars(norms, global_norm))

    def write_histograms(self, step: int, values: Mapping[str, npt.ArrayLike]) -> None:
        for board in self._boards():
            for name, arr in values.items():
                board.add_histogram(tags.hist_tag(name), np.asarray(arr), step)

    def write_report(self, report: CheckReport) -> None:
        self._scalars(report.step or 0, tags.report_scalars(report))

    def write_event(self, event: GradientEvent) -> None:
        for board in self._boards():
            board.add_text(tags.EVENTS_TAG, tags.event_text(event), event.step)

    def write_event_counts(self, step: int, counts: Mapping[str, int]) -> None:
        self._scalars(step, tags.event_count_scalars(counts))

    def write_schedule(self, step: int, text: str) -> None:
        for board in self._boards():
            board.add_text(tags.SCHEDULE_TAG, text, step)

    def flush(self) -> None:
        for board in self._boards():
            board.flush()
        for lg in self.trainer.loggers:
            with contextlib.suppress(Exception):
                lg.save()

    def close(self) -> None:
        return None  # the loggers belong to the Trainer
