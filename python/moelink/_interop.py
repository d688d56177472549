"""Arrays of any library in and out of moelink's public entry points, through DLPack.

moelink works on torch tensors inside. Every public entry point that takes arrays (codecs, layout,
``Buffer`` dispatch/combine, ``moelink.autograd``) is wrapped once with :func:`accepts_arrays`:

- **In.** An argument that is not a ``torch.Tensor`` but exports ``__dlpack__`` (NumPy on the host,
  CuPy on the GPU, JAX, ...) becomes a torch tensor with ``torch.from_dlpack``: zero-copy, same
  memory, same strides (validation then treats it like any tensor). Pairs such as an FP8 ``(codes,
  scales)`` payload or a ``(bias0, bias1)`` bias are converted element by element.
- **Out.** When the call received a foreign array, every tensor it returns (also inside tuples,
  lists and NamedTuples) goes back through ``<library>.from_dlpack``, where ``<library>`` is the
  top-level module of the first foreign array of the call (``numpy``, ``cupy``, ...): zero-copy
  again. Objects that are not tensors (the dispatch handle, events, Python lists) are returned as
  they are.
- **Dtypes a library lacks.** NumPy has no bfloat16 and no float8. Such values cross as their raw
  bits, zero-copy both ways: moelink returns bfloat16 as ``uint16`` and float8 as ``uint8`` arrays
  of the same shape, and an entry point declares, per argument, which dtype raw bits it receives
  stand for (``bits={"x": torch.bfloat16}``): a ``uint16``/``int16`` array passed there is read as
  bfloat16, a ``uint8`` array where FP8 is expected as ``float8_e4m3fn``.

A call whose arrays are all torch tensors takes the fast path: one scan of the arguments and no
conversion. Torch tensors mixed into a call with foreign arrays are used as they are.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .errors import InvalidType, argument_error

__all__ = ["accepts_arrays", "to_torch", "from_torch", "is_foreign_array", "library_of"]

# Dtypes a library may not be able to import, and the unsigned type of the same size their bits
# travel as.
_RAW_BITS = {
    torch.bfloat16: torch.uint16,
    **{d: torch.uint8 for d in (getattr(torch, n, None) for n in
                                ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d},
}


def is_foreign_array(value: object) -> bool:
    """True for an array of another library: not a torch tensor, but a DLPack exporter."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "__dlpack__") and not isinstance(value, type)


def library_of(value: object) -> str:
    """Top-level module of ``value``'s type (``"numpy"`` for ``numpy.ndarray``)."""
    return type(value).__module__.split(".")[0]


_SAME_SIZE_INTS = {torch.uint16: (torch.uint16, torch.int16), torch.uint8: (torch.uint8, torch.int8)}


def _reinterpret(tensor: torch.Tensor, want: Optional[torch.dtype]) -> torch.Tensor:
    """Raw bits (an unsigned or signed integer array of the same size) of a dtype the exporting
    library lacks, viewed as ``want`` (zero-copy); anything else is returned unchanged."""
    raw = _RAW_BITS.get(want)
    if raw is not None and tensor.dtype in _SAME_SIZE_INTS[raw]:
        return tensor.view(want)
    return tensor


def to_torch(name: str, value: Any, bits: Optional[torch.dtype] = None) -> torch.Tensor:
    """``value`` (a DLPack exporter) as a torch tensor sharing its memory; raw bits of a dtype the
    library lacks are read as ``bits``. Raises :class:`moelink.errors.InvalidType` naming ``name``
    if the export fails."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        tensor = torch.from_dlpack(value)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise argument_error(InvalidType, name, "a torch.Tensor or an array exporting __dlpack__ that torch can import",
                             f"{type(value).__module__}.{type(value).__qualname__} ({exc})") from exc
    return _reinterpret(tensor, bits)


def from_torch(tensor: torch.Tensor, library: str) -> Any:
    """``tensor`` as an array of ``library`` (zero-copy through ``library.from_dlpack``); a dtype
    the library cannot import leaves as its raw bits (``_RAW_BITS``)."""
    module = importlib.import_module(library)
    try:
        return module.from_dlpack(tensor)
    except (BufferError, RuntimeError, TypeError, ValueError):
        raw = _RAW_BITS.get(tensor.dtype)
        if raw is None:
            raise
        return module.from_dlpack(tensor.view(raw))


def _convert_out(value: Any, library: str) -> Any:
    if isinstance(value, torch.Tensor):
        return from_torch(value, library)
    if isinstance(value, tuple):
        items = [_convert_out(v, library) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list) and any(isinstance(v, torch.Tensor) for v in value):
        return [_convert_out(v, library) for v in value]
    return value


def _has_foreign(value: Any) -> bool:
    if isinstance(value, tuple):
        return any(is_foreign_array(v) for v in value)
    return is_foreign_array(value)


def _first_foreign(value: Any) -> Optional[object]:
    if isinstance(value, tuple):
        return next((v for v in value if is_foreign_array(v)), None)
    return value if is_foreign_array(value) else None


def _convert_in(name: str, value: Any, bits: Optional[torch.dtype]) -> Any:
    if isinstance(value, tuple):
        # A pair's first element carries the payload dtype hint; the others (scales, bias[1]) are
        # taken as they come, except a bias pair, where both halves share the hint.
        return tuple(_convert_in(f"{name}[{i}]", v, bits if i == 0 or name == "bias" else None)
                     for i, v in enumerate(value))
    return to_torch(name, value, bits) if is_foreign_array(value) else value


def accepts_arrays(fn: Optional[Callable] = None, *, bits: Optional[Dict[str, torch.dtype]] = None,
                   returns_torch: bool = False) -> Callable:
    """Decorator: ``fn`` accepts DLPack arrays for any argument and returns arrays of the caller's
    library (module docstring). ``bits`` maps argument names to the dtype their raw-bit arrays stand
    for. ``returns_torch``: outputs stay torch tensors (autograd, whose graph lives in torch)."""
    hints = dict(bits or {})

    def wrap(function: Callable) -> Callable:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not any(_has_foreign(v) for v in args) and not any(_has_foreign(v) for v in kwargs.values()):
                return function(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            library = None
            for name, value in list(bound.arguments.items()):
                first = _first_foreign(value)
                if first is None:
                    continue
                library = library or library_of(first)
                bound.arguments[name] = _convert_in(name, value, hints.get(name))
            result = function(*bound.args, **bound.kwargs)
            return result if returns_torch else _convert_out(result, library)

        wrapper.__moelink_accepts_arrays__ = True
        return wrapper

    return wrap(fn) if fn is not None else wrap


def wrap_module_functions(namespace: dict, names: Tuple[str, ...], **options) -> None:
    """Applies :func:`accepts_arrays` to the functions ``names`` of a module namespace (for modules
    whose functions are defined elsewhere in the file: one line at its end)."""
    for name in names:
        namespace[name] = accepts_arrays(namespace[name], **options.get(name, {}))
