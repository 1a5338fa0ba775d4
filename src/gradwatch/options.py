"""Every argument validated once: the standalone checks' and the callbacks'.

Every error is a ``ValueError`` naming the argument, the allowed values and the value given.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gradwatch.core.check import MODES
from gradwatch.core.health import HealthThresholds
from gradwatch.core.policy import STOPPING, Policy, validate_policy

__all__ = [
    "CHECK_MODES",
    "DTYPES",
    "CheckOptions",
    "DType",
    "Mode",
    "Policy",
    "WatchConfig",
    "check_dtype",
    "check_mode",
    "check_optional_bool",
    "check_path",
    "check_period",
    "check_positive_float",
    "check_positive_int",
    "check_seed",
    "check_selection",
    "compile_patterns",
    "pattern_strings",
]

DTYPES: tuple[str | None, ...] = ("float64", "float32", None)

#: The argument types the callbacks declare, so a LightningCLI/jsonargparse config is checked
#: when it is parsed and ``--help`` lists the choices (the values are validated at run time too).
Mode = Literal["coordinate", "directional", "modules"]
DType = Literal["float64", "float32"]


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


def check_period(
    argument: str, value: object, *, minimum: int, none: str, zero: str | None = None
) -> int | None:
    """``None`` (meaning ``none``) or an integer ≥ ``minimum`` (``0`` meaning ``zero``).

    Example:
        >>> check_period("check_every_n_steps", 0, minimum=1, none="cost budget")
        Traceback (most recent call last):
        ...
        ValueError: check_every_n_steps must be None (cost budget) or an integer >= 1, got 0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        zero_text = f", 0 ({zero})" if zero is not None else ""
        raise ValueError(
            f"{argument} must be None ({none}){zero_text} or an integer >= {max(minimum, 1)}, "
            f"got {value!r}"
        )
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


#: What ``mode=`` accepts: the engine's modes on whole-model losses, and ``"modules"`` (each
#: module's own backward checked alone, see :mod:`gradwatch.localization`).
CHECK_MODES: tuple[str, ...] = (*MODES, "modules")


def check_mode(value: object) -> str:
    """``"coordinate"``, ``"directional"`` or ``"modules"``.

    Example:
        >>> check_mode("modules")
        'modules'
    """
    if value not in CHECK_MODES:
        allowed = ", ".join(repr(m) for m in CHECK_MODES)
        raise ValueError(f"mode must be one of {allowed}; got {value!r}")
    return str(value)


def check_dtype(value: object) -> str | None:
    """``"float64"``, ``"float32"`` or ``None`` (the model's own dtype)."""
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of 'float64', 'float32', None; got {value!r}")
    return value  # type: ignore[return-value]


def pattern_strings(argument: str, value: object) -> str | tuple[str, ...] | None:
    """``None``, one pattern string, or a tuple of pattern strings (any iterable of them given).

    Example:
        >>> pattern_strings("include", ["fc1", "fc2"])
        ('fc1', 'fc2')
        >>> pattern_strings("include", 5)
        Traceback (most recent call last):
        ...
        ValueError: include must be a regular expression or a list of them, got 5
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ValueError(
            f"{argument} must be a regular expression or a list of them, got {value!r}"
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(
                f"{argument} must be a regular expression or a list of them, got {item!r}"
            )
    return items


def compile_patterns(argument: str, value: object) -> list[re.Pattern[str]]:
    """Regular expressions from a string or a sequence of strings.

    Example:
        >>> [p.pattern for p in compile_patterns("include", r"fc\\d")]
        ['fc\\\\d']
    """
    strings = pattern_strings(argument, value)
    if strings is None:
        return []
    patterns = []
    for item in [strings] if isinstance(strings, str) else strings:
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


def check_selection(
    names: Sequence[str],
    include: Sequence[re.Pattern[str]],
    exclude: Sequence[re.Pattern[str]],
    *,
    what: str = "parameter",
) -> list[str]:
    """The names ``include``/``exclude`` select; ``ValueError`` when they select none of ``names``.

    An empty ``names`` (a model with nothing trainable, or not built yet) selects nothing and
    raises nothing: that is not the patterns' fault.

    Example:
        >>> names = ["fc1.weight", "fc1.bias", "out.weight"]
        >>> check_selection(names, compile_patterns("include", "fc1"), [])
        ['fc1.weight', 'fc1.bias']
        >>> check_selection(names, compile_patterns("include", "conv"), [])
        Traceback (most recent call last):
        ...
        ValueError: include/exclude left no parameter to check (include=['conv']); the 3 trainable parameters are ['fc1.weight', 'fc1.bias', 'out.weight']
    """
    chosen = [n for n in names if selected(n, include, exclude)]
    if names and not chosen:
        given = ", ".join(
            f"{argument}={[p.pattern for p in patterns]!r}"
            for argument, patterns in (("include", include), ("exclude", exclude))
            if patterns
        )
        shown = list(names[:10])
        more = f" (first 10 of {len(names)})" if len(names) > 10 else ""
        raise ValueError(
            f"include/exclude left no {what} to check ({given}); the {len(names)} trainable "
            f"{what}s are {shown!r}{more}"
        )
    return chosen


def check_seed(value: object) -> int:
    """An integer ≥ 0 (numpy's ``SeedSequence`` takes no negative entropy).

    Example:
        >>> check_seed(3)
        3
        >>> check_seed(-1)
        Traceback (most recent call last):
        ...
        ValueError: seed must be an integer >= 0, got -1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed must be an integer >= 0, got {value!r}")
    return value


def check_path(argument: str, value: object) -> str | None:
    """``None`` or a non-empty path (``str`` or ``os.PathLike``), as a string.

    Example:
        >>> check_path("log_dir", None) is None
        True
        >>> check_path("log_dir", 5)
        Traceback (most recent call last):
        ...
        ValueError: log_dir must be a path (str or os.PathLike) or None, got 5
    """
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ValueError(f"{argument} must be a path (str or os.PathLike) or None, got {value!r}")
    return path


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
        checked_mode, checked_dtype = check_mode(mode), check_dtype(dtype)
        if checked_mode == "modules" and checked_dtype != "float64":
            raise ValueError(
                f"dtype must be 'float64' with mode='modules' (each module is checked on a "
                f"float64 copy), got {dtype!r}"
            )
        return cls(
            num_params=int(check_positive_int("num_params", num_params) or 1),
            mode=checked_mode,
            dtype=checked_dtype,
            eps=check_positive_float("eps", eps, allow_none=True),
            rtol=check_positive_float("rtol", rtol, allow_none=True),
            seed=check_seed(seed),
            include=compile_patterns("include", include),
            exclude=compile_patterns("exclude", exclude),
        )


@dataclass(frozen=True)
class WatchConfig:
    """Validated constructor arguments shared by the Lightning and Keras callbacks.

    Example:
        >>> WatchConfig.create(check_every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: check_every_n_steps must be None (cost budget) or an integer >= 1, got 0
    """

    check_every_n_steps: int | None = None
    num_params: int = 32
    mode: str = "coordinate"
    dtype: str | None = "float64"
    enable_checks: bool = True
    enable_norms: bool = True
    norm_every_n_steps: int = 1
    log_every_n_steps: int | None = None
    vanish_threshold: float = HealthThresholds.vanish_threshold
    explode_threshold: float = HealthThresholds.explode_threshold
    patience: int = HealthThresholds.patience
    on_mismatch: Policy = "warn"
    on_vanish: Policy = "warn"
    on_explode: Policy = "warn"
    on_nonfinite: Policy = "halt"
    max_overhead: float = 0.02
    seed: int = 0
    eps: float | None = None
    rtol: float | None = None
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    jsonl_path: str | None = None

    @classmethod
    def create(cls, **kwargs: Any) -> WatchConfig:
        """Validate every argument (``ValueError`` naming the argument) and build the config."""
        c = cls(**kwargs)
        check_period("check_every_n_steps", c.check_every_n_steps, minimum=1, none="cost budget")
        check_positive_int("num_params", c.num_params)
        check_mode(c.mode)
        check_dtype(c.dtype)
        for name in ("enable_checks", "enable_norms"):
            if not isinstance(getattr(c, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(c, name)!r}")
        if not c.enable_checks and not c.enable_norms:
            raise ValueError(
                "GradWatch would do nothing with enable_checks=False and enable_norms=False: "
                "remove the callback, or set enable_checks=True or enable_norms=True"
            )
        check_positive_int("norm_every_n_steps", c.norm_every_n_steps)
        check_period(
            "log_every_n_steps",
            c.log_every_n_steps,
            minimum=0,
            none="the framework's period",
            zero="only steps with an event",
        )
        check_positive_float("vanish_threshold", c.vanish_threshold)
        check_positive_float("explode_threshold", c.explode_threshold)
        if c.vanish_threshold >= c.explode_threshold:
            raise ValueError(
                f"vanish_threshold must be below explode_threshold, got "
                f"vanish_threshold={c.vanish_threshold!r} and "
                f"explode_threshold={c.explode_threshold!r}"
            )
        check_positive_int("patience", c.patience)
        for name in ("on_mismatch", "on_vanish", "on_explode", "on_nonfinite"):
            validate_policy(name, getattr(c, name))
        if (
            isinstance(c.max_overhead, bool)
            or not isinstance(c.max_overhead, (int, float))
            or not 0 < c.max_overhead <= 1
        ):
            raise ValueError(f"max_overhead must be a number in (0, 1], got {c.max_overhead!r}")
        check_seed(c.seed)
        check_positive_float("eps", c.eps, allow_none=True)
        check_positive_float("rtol", c.rtol, allow_none=True)
        compile_patterns("include", c.include)
        compile_patterns("exclude", c.exclude)
        if c.jsonl_path is not None and (not isinstance(c.jsonl_path, str) or not c.jsonl_path):
            # from_arguments turns an os.PathLike into its string; the config holds strings only.
            raise ValueError(f"jsonl_path must be a path string or None, got {c.jsonl_path!r}")
        return c

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> WatchConfig:
        """Validated config from a callback's constructor arguments (extra keys are ignored).

        Sequences of patterns become tuples and paths become strings, so the config stays hashable
        and serialisable.
        """
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in arguments.items() if k in names}
        for key in ("include", "exclude"):
            if key in kwargs:
                kwargs[key] = pattern_strings(key, kwargs[key])
        if "jsonl_path" in kwargs:
            kwargs["jsonl_path"] = check_path("jsonl_path", kwargs["jsonl_path"])
        return cls.create(**kwargs)

    @property
    def check_arguments(self) -> dict[str, Any]:
        """The arguments every checker takes, as this config holds them.

        Example:
            >>> sorted(WatchConfig.create().check_arguments)
            ['dtype', 'eps', 'exclude', 'include', 'mode', 'num_params', 'rtol', 'seed']
        """
        return {
            "num_params": self.num_params,
            "mode": self.mode,
            "dtype": self.dtype,
            "eps": self.eps,
            "rtol": self.rtol,
            "seed": self.seed,
            "include": self.include,
            "exclude": self.exclude,
        }

    @property
    def policies(self) -> dict[str, Policy]:
        """The four policies by argument name."""
        return {
            "on_mismatch": self.on_mismatch,
            "on_vanish": self.on_vanish,
            "on_explode": self.on_explode,
            "on_nonfinite": self.on_nonfinite,
        }

    def stops(self, argument: str) -> bool:
        """Whether the policy given as ``argument`` (``"on_nonfinite"``...) halts or raises.

        Example:
            >>> WatchConfig.create().stops("on_nonfinite"), WatchConfig.create().stops("on_vanish")
            (True, False)
        """
        return self.policies[argument] in STOPPING

    @property
    def thresholds(self) -> HealthThresholds:
        """Health thresholds from this config."""
        return HealthThresholds(
            vanish_threshold=self.vanish_threshold,
            explode_threshold=self.explode_threshold,
            patience=self.patience,
        )

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments (for ``get_config`` and ``state_key``)."""
        return asdict(self)
