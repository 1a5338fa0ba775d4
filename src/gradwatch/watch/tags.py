"""The log vocabulary: tag names and records turned into loggable values.

The sinks write through this module, and ``gradwatch inspect`` reads back through it, so the
names live in exactly one place.

Example:
    >>> norm_tag("fc.weight"), rel_error_tag("fc.weight"), EVENTS_TAG
    ('gradwatch/grad_norm/fc.weight', 'gradwatch/rel_error/fc.weight', 'gradwatch/events')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gradwatch.report import CheckReport, GradientEvent

__all__ = [
    "EVENTS_TAG",
    "GLOBAL_NAME",
    "GLOBAL_NORM_TAG",
    "MAX_NAME",
    "MAX_REL_ERROR_TAG",
    "META_TAG",
    "PREFIX",
    "SCHEDULE_TAG",
    "custom_scalars_layout",
    "event_count_scalars",
    "event_count_tag",
    "event_text",
    "hist_tag",
    "norm_scalars",
    "norm_tag",
    "rel_error_tag",
    "report_scalars",
]

PREFIX = "gradwatch"
NORM_PREFIX = f"{PREFIX}/grad_norm/"
REL_ERROR_PREFIX = f"{PREFIX}/rel_error/"
HIST_PREFIX = f"{PREFIX}/grad_hist/"
#: The name of the whole-model series: the global norm, the maximum relative error.
GLOBAL_NAME = "global"
MAX_NAME = "max"
GLOBAL_NORM_TAG = f"{NORM_PREFIX}{GLOBAL_NAME}"
MAX_REL_ERROR_TAG = f"{REL_ERROR_PREFIX}{MAX_NAME}"
EVENTS_TAG = f"{PREFIX}/events"
#: Scalars ``gradwatch/events/<kind>``: how many events of that kind the run has had so far.
EVENT_COUNT_PREFIX = f"{EVENTS_TAG}/"
#: Text summary written once per run: parameter shapes and the thresholds in force (JSON).
META_TAG = f"{PREFIX}/meta"
#: Text summary after each check: when the next check is due and why.
SCHEDULE_TAG = f"{PREFIX}/schedule"


def norm_tag(param: str) -> str:
    """Scalar tag of a parameter's gradient L2 norm."""
    return f"{NORM_PREFIX}{param}"


def rel_error_tag(param: str) -> str:
    """Scalar tag of a parameter's worst relative error in a check."""
    return f"{REL_ERROR_PREFIX}{param}"


def hist_tag(param: str) -> str:
    """Histogram tag of a parameter's gradient values."""
    return f"{HIST_PREFIX}{param}"


def event_count_tag(kind: str) -> str:
    """Scalar tag of the running count of one kind of event."""
    return f"{EVENT_COUNT_PREFIX}{kind}"


def event_count_scalars(counts: Mapping[str, int]) -> dict[str, float]:
    """Running event counts per kind as ``{tag: value}`` (so loggers without texts see events).

    Example:
        >>> event_count_scalars({"exploding": 2})
        {'gradwatch/events/exploding': 2.0}
    """
    return {event_count_tag(kind): float(n) for kind, n in counts.items()}


def norm_scalars(norms: Mapping[str, float], global_norm: float) -> dict[str, float]:
    """Per-parameter and global gradient norms as ``{tag: value}``.

    Example:
        >>> norm_scalars({"w": 3.0}, 3.0)
        {'gradwatch/grad_norm/w': 3.0, 'gradwatch/grad_norm/global': 3.0}
    """
    out = {norm_tag(name): float(value) for name, value in norms.items()}
    out[GLOBAL_NORM_TAG] = float(global_norm)
    return out


def report_scalars(report: CheckReport) -> dict[str, float]:
    """Worst relative error per checked parameter, and the maximum, as ``{tag: value}``."""
    out = {rel_error_tag(name): value for name, value in report.worst_by_param().items()}
    if report.max_rel_error is not None:
        out[MAX_REL_ERROR_TAG] = float(report.max_rel_error)
    return out


def event_text(event: GradientEvent) -> str:
    """The text summary of an event: its ``to_dict()`` as JSON."""
    return json.dumps(event.to_dict(), allow_nan=False)


def custom_scalars_layout() -> Any:
    """A TensorBoard custom-scalars layout (a ``Summary`` proto; needs the ``tensorboard`` package).

    One chart with the gradient norms of all layers, one with the relative errors of all checks,
    so a run's gradients read at a glance in TensorBoard's *Custom Scalars* tab.
    """
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, regex: str) -> Any:
        return layout_pb2.Chart(
            title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex])
        )

    layout = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title="gradwatch",
                chart=[
                    chart("gradient norm per layer", r"gradwatch/grad_norm/.*"),
                    chart("relative error per checked tensor", r"gradwatch/rel_error/.*"),
                ],
            )
        ]
    )
    value = summary_pb2.Summary.Value(
        tag="custom_scalars__config__",
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="custom_scalars")
        ),
        tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            string_val=[layout.SerializeToString()],
        ),
    )
    return summary_pb2.Summary(value=[value])
