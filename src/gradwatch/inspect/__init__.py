"""Read gradwatch logs back: records, tables, JSON and plots (``gradwatch inspect``).

Example:
    >>> from gradwatch.inspect import parse_grad_norm_tag
    >>> parse_grad_norm_tag("grad_2.0_norm/layer.weight")
    'layer.weight'
"""

from gradwatch.inspect.plot import plot, plot_figure
from gradwatch.inspect.read import (
    InspectError,
    RunData,
    SkippedInput,
    judge_foreign,
    load,
    parse_grad_norm_tag,
)
from gradwatch.inspect.summary import ParamSummary, print_tables, summarise, to_json

__all__ = [
    "InspectError",
    "ParamSummary",
    "RunData",
    "SkippedInput",
    "judge_foreign",
    "load",
    "parse_grad_norm_tag",
    "plot",
    "plot_figure",
    "print_tables",
    "summarise",
    "to_json",
]
