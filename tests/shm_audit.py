"""Where moelink's shared memory can be seen from outside: for tests that prove nothing leaks.

Segments are memfds named ``moelink-<tag>-<32 hex>`` (csrc/transport/host/shm_segment.h). They have
no name in any namespace; a process holds one through a descriptor (``/proc/<pid>/fd``) or a
mapping (``/proc/<pid>/maps``), and the memory is gone once no process does. So "nothing leaked"
is: ``/dev/shm`` holds no moelink name at all, and no process holds a segment of the tag.
"""

from __future__ import annotations

import os
from typing import Optional


def dev_shm_names(tag: Optional[str] = None) -> list[str]:
    """moelink names of ``tag`` in /dev/shm (there should never be one; without a tag, every
    moelink name, which on a shared machine includes other users' runs of older versions)."""
    prefix = f"moelink-{tag}-" if tag else "moelink"
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _memfd(tag: Optional[str]) -> str:
    return f"/memfd:moelink-{tag}-" if tag else "/memfd:moelink-"


def descriptors(pid="self", tag: Optional[str] = None) -> list[str]:
    """Link targets of the descriptors of ``pid`` that are moelink segments of ``tag``."""
    out = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(_memfd(tag)):
            out.append(target)
    return sorted(out)


def mappings(pid="self", tag: Optional[str] = None) -> list[str]:
    """Distinct moelink segments of ``tag`` mapped by ``pid``."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return sorted({line.split(None, 5)[-1] for line in lines if _memfd(tag) in line})


def holders(tag: str) -> dict[int, list[str]]:
    """Every process of the machine that still holds (maps or has open) a segment of ``tag``."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            held = descriptors(entry, tag) + mappings(entry, tag)
            if held:
                out[int(entry)] = held
    return out


def open_fds(pid="self") -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
