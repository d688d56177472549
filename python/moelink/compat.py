"""Run unmodified DeepEP framework code on moelink: ``install_deep_ep_alias()``.

    import moelink.compat
    moelink.compat.install_deep_ep_alias()   # before the framework imports deep_ep
    import deep_ep                           # -> moelink's Buffer, Config, EventOverlap, ...

Megatron-LM (``fused_a2a``), SGLang (``DeepEPDispatcher``, normal mode) and vLLM
(``DeepEPHTPrepareAndFinalize``) import ``deep_ep`` and ``deep_ep.utils`` and quietly disable
their DeepEP path when the import fails. The alias registers these modules in ``sys.modules``:

- ``deep_ep``: ``Buffer``, ``Config``, ``EventOverlap``, ``EventHandle``, ``topk_idx_t``,
  ``__version__``;
- ``deep_ep.utils``: ``EventOverlap``, ``EventHandle``, ``check_nvlink_connections``;
- ``deep_ep.buffer``: ``Buffer``.

What works is moelink's subset: the intranode normal mode (docs/quickstart.md says what else
differs, docs/semantics.md why). Calls of modes moelink does not have yet (internode,
low-latency) raise with a message saying so rather than being emulated.

The alias refuses to replace a real ``deep_ep`` that is already imported
(:class:`moelink.errors.AliasConflict`); installed but not yet imported, the alias takes its place
for this process. ``uninstall_deep_ep_alias()`` removes it.
"""

from __future__ import annotations

import sys
import types
from typing import Optional

from . import __version__
from .buffer import Buffer
from .config import Config
from .errors import AliasConflict
from .event import EventOverlap

__all__ = ["install_deep_ep_alias", "uninstall_deep_ep_alias", "EventHandle", "MODULE_NAMES"]

MODULE_NAMES = ("deep_ep", "deep_ep.utils", "deep_ep.buffer")
_MARK = "__moelink_alias__"


class EventHandle:
    """DeepEP's ``EventHandle``: an event recorded on the current stream when constructed.

    On the host target every moelink operation has completed when its call returns, so there is
    nothing to record and :meth:`current_stream_wait` returns at once. (The GPU target will record
    a CUDA event here.)"""

    def __init__(self) -> None:
        self.event = None

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the event: nothing to wait for on the host target."""

    def __repr__(self) -> str:
        return "EventHandle(host: complete)"


def check_nvlink_connections(group) -> None:
    """DeepEP checks that PCIe-attached GPUs are NVLink-connected; the host target has no GPUs."""


def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__dict__.update(attrs)
    setattr(module, _MARK, True)
    return module


def install_deep_ep_alias() -> types.ModuleType:
    """Registers ``deep_ep``, ``deep_ep.utils`` and ``deep_ep.buffer`` as moelink; returns the
    ``deep_ep`` module. Idempotent. Raises :class:`moelink.errors.AliasConflict` if a real
    ``deep_ep`` (or one of its submodules) is already imported."""
    present = {name: sys.modules[name] for name in MODULE_NAMES if sys.modules.get(name) is not None}
    real = [name for name, module in present.items() if not getattr(module, _MARK, False)]
    if real:
        where = getattr(present[real[0]], "__file__", None) or "an unknown location"
        raise AliasConflict(
            f"deep_ep: expected no real deep_ep imported before moelink's alias, got {real[0]} from {where}; "
            "call moelink.compat.install_deep_ep_alias() before anything imports deep_ep, or use DeepEP itself")
    if "deep_ep" in present:
        return present["deep_ep"]
    utils = _module("deep_ep.utils", "moelink's stand-in for deep_ep.utils.", EventOverlap=EventOverlap,
                    EventHandle=EventHandle, check_nvlink_connections=check_nvlink_connections)
    buffer = _module("deep_ep.buffer", "moelink's stand-in for deep_ep.buffer.", Buffer=Buffer,
                     EventOverlap=EventOverlap, EventHandle=EventHandle, Config=Config)
    from . import topk_idx_t

    package = _module("deep_ep", "moelink, registered as deep_ep by moelink.compat.install_deep_ep_alias().",
                      Buffer=Buffer, Config=Config, EventOverlap=EventOverlap, EventHandle=EventHandle,
                      topk_idx_t=topk_idx_t, utils=utils, buffer=buffer,
                      __version__=f"{__version__}+moelink", __path__=[],
                      __all__=["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"])
    sys.modules.update({"deep_ep": package, "deep_ep.utils": utils, "deep_ep.buffer": buffer})
    return package


def uninstall_deep_ep_alias() -> Optional[types.ModuleType]:
    """Removes the alias from ``sys.modules`` (a real ``deep_ep`` is left alone); returns the
    removed ``deep_ep`` module, or None if none was installed."""
    removed = None
    for name in MODULE_NAMES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, _MARK, False):
            del sys.modules[name]
            removed = module if name == "deep_ep" else removed
    return removed
