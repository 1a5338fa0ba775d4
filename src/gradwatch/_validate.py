"""Argument validation shared by the standalone checks and the callbacks.

Every error is a ``ValueError`` naming the argument, the allowed values and the value given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DTYPES",
    "CheckOptions",
    "check_dtype",
    "check_mode",
    "check_optional_bool",
    "check_positive_float",
    "check_positive_int",
    "check_seed",
    "compile_patterns",
]

DTYPES: tuple[str | None, ...] = ("float64", "float32", None)
MODES: tuple[str, ...] = ("coordinate", "directional")


def check_positive_int(argument: str, value: object, *, allow_none: bool = False) -> int | None:
    """An integer ≥ 1 (or ``None`` where allowed).

    Example:
        >>> check_positive_int("num_params", 4)
        4
        >>> check_positive_int("num_params", 0)
        Traceback (most recent call last):
        ...
        ValueError: num_params must be an integer >= 1, got 0
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{argument} must be an integer >= 1{extra}, got {value!r}")
    return value


def check_positive_float(argument: str, value: object, *, allow_none: bool = False) -> float | None:
    """A finite number > 0 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{argument} must be a finite number > 0{extra}, got {value!r}")
    return float(value)


def check_mode(value: object) -> str:
    """``"coordinate"`` or ``"directional"``."""
    if value not in MODES:
        raise ValueError(f"mode must be one of 'coordinate', 'directional'; got {value!r}")
    return str(value)


def check_dtype(value: object) -> str | None:
    """``"float64"``, ``"float32"`` or ``None`` (the model's own dtype)."""
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of 'float64', 'float32', None; got {value!r}")
    return value  # type: ignore[return-value]


def compile_patterns(argument: str, value: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    """Regular expressions from a string or a sequence of strings.

    Example:
        >>> [p.pattern for p in compile_patterns("include", r"fc\\d")]
        ['fc\\\\d']
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    patterns = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(
                f"{argument} must be a regular expression or a list of them, got {item!r}"
            )
        try:
            patterns.append(re.compile(item))
        except re.error as exc:
            raise ValueError(
                f"{argument} has an invalid regular expression {item!r}: {exc}"
            ) from exc
    return patterns


def selected(
    name: str, include: Sequence[re.Pattern[str]], exclude: Sequence[re.Pattern[str]]
) -> bool:
    """Whether a parameter name passes ``include`` (any matches, or none given) and ``exclude``."""
    if include and not any(p.search(name) for p in include):
        return False
    return not any(p.search(name) for p in exclude)


def check_seed(value: object) -> int:
    """An integer seed.

    Example:
        >>> check_seed(3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return value


def check_optional_bool(argument: str, value: object) -> bool | None:
    """``True``, ``False`` or ``None``.

    Example:
        >>> check_optional_bool("vectorize", None) is None
        True
        >>> check_optional_bool("vectorize", "yes")
        Traceback (most recent call last):
        ...
        ValueError: vectorize must be True, False or None, got 'yes'
    """
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"{argument} must be True, False or None, got {value!r}")


@dataclass(frozen=True)
class CheckOptions:
    """The validated arguments every gradient check takes (torch and Keras alike)."""

    num_params: int
    mode: str
    dtype: str | None
    eps: float | None
    rtol: float | None
    seed: int
    include: list[re.Pattern[str]]
    exclude: list[re.Pattern[str]]

    @classmethod
    def validate(
        cls,
        *,
        num_params: object,
        mode: object,
        dtype: object,
        eps: object,
        rtol: object,
        seed: object,
        include: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
    ) -> CheckOptions:
        """``ValueError`` naming the first bad argument; else the options."""
        return cls(
            num_params=int(check_positive_int("num_params", num_params) or 1),
            mode=check_mode(mode),
            dtype=check_dtype(dtype),
            eps=check_positive_float("eps", eps, allow_none=True),
            rtol=check_positive_float("rtol", rtol, allow_none=True),
            seed=check_seed(seed),
            include=compile_patterns("include", include),
            exclude=compile_patterns("exclude", exclude),
        )
