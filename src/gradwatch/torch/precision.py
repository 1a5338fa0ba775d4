"""The float64 guard: a check's loss evaluations stay in float64 whatever the step creates or casts.

A float64 copy of the model is not enough: real training steps make floating tensors of their own
(``torch.ones(B, 1)`` targets, ``torch.rand(B)`` timesteps, ``y.float()`` labels, ``logits.float()``
in a loss, an RMSNorm's ``x.float()``, ``dtype=torch.float32`` arguments, float32 tensors kept as
plain attributes). Each of them turns the check into a float32 computation judged against a float64
floor (false mismatches) or into a dtype error (checks switched off). :class:`Float64Guard` is a
``torch.overrides.TorchFunctionMode`` that sees every torch call made while a check evaluates
(forward and backward) and keeps it in float64:

- factories use float64 by default (``torch.set_default_dtype``), and a ``dtype=`` argument naming
  a lower-precision float (float32, float16, bfloat16) becomes float64;
- ``.float()``, ``.half()``, ``.bfloat16()``, ``.to(<low float>)``, ``.to(other)``, ``.type(...)``
  and ``.type_as(...)`` give float64 where they would have given a lower-precision float;
- an op whose floating tensor arguments mix float64 with lower-precision floats gets the lower ones
  widened (float32 constants made before the check: attributes, closures, numpy arrays);
- random draws (``torch.rand``, ``torch.randn``, their ``_like`` forms, ``torch.normal`` with a size,
  ``Tensor.uniform_`` / ``Tensor.normal_``) are drawn in the model's own dtype and then widened, so
  they read the generator exactly as the model's step does (a float64 draw consumes it differently).

Integer, bool and complex tensors are left as they are, ``Tensor.view(dtype)`` (a bitcast) too.
Everything global is restored on exit, exceptions included. The default dtype is process-wide:
another thread that makes tensors while a check runs sees float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["LOW_FLOATS", "Float64Guard", "mixes_precisions", "widen"]

#: Floating dtypes below float64: what the guard widens.
LOW_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

Handler = Callable[["Float64Guard", Any, tuple[Any, ...], dict[str, Any]], Any]


def widen(x: Any) -> Any:
    """``x`` in float64 if it is a lower-precision floating tensor, else ``x`` itself.

    Lists and tuples are widened one level deep (``torch.cat([a, b])``, ``torch.stack``).

    Example:
        >>> widen(torch.ones(2)).dtype, widen(torch.ones(2, dtype=torch.int64)).dtype
        (torch.float64, torch.int64)
    """
    if isinstance(x, torch.Tensor):
        return x.to(torch.float64) if x.dtype in LOW_FLOATS else x
    if isinstance(x, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype in LOW_FLOATS for t in x
    ):
        return type(x)(widen(t) for t in x) if type(x) in (list, tuple) else x
    return x


def _dtypes(values: Sequence[Any] | Any) -> Any:
    for a in values:
        if isinstance(a, torch.Tensor):
            yield a.dtype
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor):
                    yield t.dtype


def mixes_precisions(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """Whether the tensor arguments hold both float64 and a lower-precision float.

    Example:
        >>> mixes_precisions((torch.ones(2, dtype=torch.float64), torch.ones(2)), {})
        True
        >>> mixes_precisions((torch.ones(2), torch.ones(2)), {})
        False
    """
    wide = low = False
    for d in _dtypes(args):
        wide, low = wide or d is torch.float64, low or d in LOW_FLOATS
    if kwargs:
        for d in _dtypes(kwargs.values()):
            wide, low = wide or d is torch.float64, low or d in LOW_FLOATS
    return wide and low


def _wide_dtype(dtype: Any) -> Any:
    return torch.float64 if dtype in LOW_FLOATS else dtype


_IN_PLACE_DUNDERS = frozenset(
    f"__i{op}__"
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or")
) | {"__setitem__"}


def _in_place(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``__iadd__``, ``__setitem__``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS


# -- handlers of the calls that make or cast floating tensors --------------------------------------


def _double(guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``.float()`` / ``.half()`` / ``.bfloat16()`` → ``.double()``."""
    return args[0].double(**kwargs)


def _to(guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``.to(...)`` with any lower-precision float target (positional, keyword, another tensor)."""
    fixed: list[Any] = []
    for a in args[1:]:
        if isinstance(a, torch.Tensor):  # x.to(other): other's device and dtype
            fixed += [a.device, _wide_dtype(a.dtype)]
        else:
            fixed.append(_wide_dtype(a))
    if "dtype" in kwargs:
        kwargs = {**kwargs, "dtype": _wide_dtype(kwargs["dtype"])}
    return func(args[0], *fixed, **kwargs)


def _cast_then_widen(
    guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``.type(...)`` / ``.type_as(...)``: cast as asked; a lower float result comes as float64."""
    if func is torch.Tensor.type and args[1:2] and isinstance(args[1], torch.dtype):
        return args[0].type(_wide_dtype(args[1]), *args[2:], **kwargs)
    out = func(*args, **kwargs)
    if isinstance(out, torch.Tensor) and out.dtype in LOW_FLOATS:
        return args[0].to(device=out.device, dtype=torch.float64)
    return out


def _draw(guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch.rand``/``randn``/``normal(mean, std, size)`` drawn in the model's dtype, widened."""
    if "out" in kwargs or (func is torch.normal and len(args) < 3 and "size" not in kwargs):
        return func(*args, **kwargs)  # tensor-mean normal: its dtype follows the (float64) mean
    return _widened_draw(guard, func, args, kwargs)


def _widened_draw(
    guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The draw made in the model's dtype (or the low float asked for), then widened to float64;
    a draw asked for in another dtype is left as it is."""
    dtype = kwargs.get("dtype")
    if dtype is not None and dtype not in LOW_FLOATS:
        return func(*args, **kwargs)
    grad = bool(kwargs.get("requires_grad", False))
    kw = {**kwargs, "dtype": dtype or guard.draw_dtype, "requires_grad": False}
    out = func(*args, **kw).to(torch.float64)
    return out.requires_grad_() if grad else out


def _draw_like(
    guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``torch.rand_like``/``randn_like`` of a floating tensor: the model's dtype, widened."""
    dtype = kwargs.get("dtype")
    source = args[0]
    if dtype is None and not (isinstance(source, torch.Tensor) and source.is_floating_point()):
        return func(*args, **kwargs)
    return _widened_draw(guard, func, args, kwargs)


def _fill_random(
    guard: Float64Guard, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``Tensor.uniform_`` / ``normal_`` on a float64 tensor: drawn in the model's dtype, copied."""
    target = args[0]
    if target.dtype is not torch.float64 or guard.draw_dtype is torch.float64:
        return func(*args, **kwargs)
    draw = torch.empty(target.shape, dtype=guard.draw_dtype, device=target.device)
    func(draw, *args[1:], **kwargs)
    return target.copy_(draw)


_HANDLERS: dict[Any, Handler] = {
    torch.Tensor.float: _double,
    torch.Tensor.half: _double,
    torch.Tensor.bfloat16: _double,
    torch.Tensor.to: _to,
    torch.Tensor.type: _cast_then_widen,
    torch.Tensor.type_as: _cast_then_widen,
    torch.rand: _draw,
    torch.randn: _draw,
    torch.normal: _draw,
    torch.rand_like: _draw_like,
    torch.randn_like: _draw_like,
    torch.Tensor.uniform_: _fill_random,
    torch.Tensor.normal_: _fill_random,
}

#: Calls whose ``dtype`` argument is not a computation dtype (a bitcast).
_KEEP_DTYPE = frozenset({torch.Tensor.view})


class Float64Guard(TorchFunctionMode):
    """Keep every floating tensor a computation makes in float64 while the guard is on.

    Use it around evaluations of a float64 copy (forward and backward). On entry the default dtype
    becomes float64; on exit it is put back, exceptions included.

    Args:
        draw_dtype: The dtype random draws are made in before being widened: the model's own
            floating dtype, so a check reads the generator as the model's step does (default:
            the default dtype at construction, usually float32).

    Example:
        >>> with Float64Guard():
        ...     a = torch.ones(2, 1)
        ...     b = torch.tensor([1, 0]).float()
        ...     c = torch.rand(2, dtype=torch.float32)
        >>> a.dtype, b.dtype, c.dtype, torch.get_default_dtype()
        (torch.float64, torch.float64, torch.float64, torch.float32)
    """

    def __init__(self, draw_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        floating = draw_dtype is not None and draw_dtype.is_floating_point
        self.draw_dtype = draw_dtype if floating else torch.get_default_dtype()
        self._saved_default: list[torch.dtype] = []

    def __enter__(self) -> Float64Guard:
        self._saved_default.append(torch.get_default_dtype())
        try:
            super().__enter__()  # type: ignore[no-untyped-call]
        except BaseException:
            self._saved_default.pop()
            raise
        torch.set_default_dtype(torch.float64)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        finally:
            torch.set_default_dtype(self._saved_default.pop())

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(self, func, args, kwargs)
        if kwargs.get("dtype") in LOW_FLOATS and func not in _KEEP_DTYPE:
            kwargs = {**kwargs, "dtype": torch.float64}
        if mixes_precisions(args, kwargs) and "out" not in kwargs:
            if _in_place(func):  # the tensor written to must stay itself
                args = (args[0], *(widen(a) for a in args[1:]))
            else:
                args = tuple(widen(a) for a in args)
            kwargs = {k: widen(x) for k, x in kwargs.items()}
        return func(*args, **kwargs)
