"""Writers of gradwatch records. The JSON-lines file is readable by ``gradwatch inspect``.

Each line is one record: ``{"type": "norms", "step", "values": {param: norm}, "global"}``,
``{"type": "report", "step", "report": CheckReport.to_dict()}`` or
``{"type": "event", "step", "event": GradientEvent.to_dict()}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from gradwatch.report import CheckReport, GradientEvent, json_float

__all__ = ["JsonlSink"]


class JsonlSink:
    """Appends records to a JSON-lines file, opened lazily on the first write.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "gw.jsonl")
        >>> sink = JsonlSink(path)
        >>> sink.write_norms(1, {"w": 0.5}, 0.5); sink.close()
        >>> open(path).read().count("\\n")
        1
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: IO[str] | None = None

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(record, allow_nan=False) + "\n")

    def write_norms(self, step: int, norms: Mapping[str, float], global_norm: float) -> None:
        """One norms record."""
        self._write(
            {
                "type": "norms",
                "step": int(step),
                "values": {k: json_float(v) for k, v in norms.items()},
                "global": json_float(global_norm),
            }
        )

    def write_report(self, report: CheckReport) -> None:
        """One report record."""
        self._write({"type": "report", "step": report.step, "report": report.to_dict()})

    def write_event(self, event: GradientEvent) -> None:
        """One event record."""
        self._write({"type": "event", "step": event.step, "event": event.to_dict()})

    def flush(self) -> None:
        """Flush to disk."""
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        """Close the file (a later write reopens it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
