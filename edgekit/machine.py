"""What this machine has now, for choices that must fit it: the export's preflight, the runtimes' float16 handling;
the house's working-set rule; giving freed memory back. Standard library only, so the device runtimes can read it."""

from __future__ import annotations

import ctypes
import gc
from functools import cache
from pathlib import Path


def available_memory() -> int | None:
    """The kernel's MemAvailable in bytes, or None where there is no /proc/meminfo (not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


WORKING_SET_SHARE = 0.2  # of the weights' bytes: what a process may hold beside its weights,
WORKING_SET_FLOOR = 256 << 20  # or this much, for small models, whose process is mostly libraries anyway


def working_set_allowance(weight_bytes: int) -> int:
    """What a process holding `weight_bytes` of weights may hold beside them, by design rather than by what this
    machine has, so a step does the same everywhere: a scan's batch of activations and KV cache, a runtime's float32
    copy of float16 weights. A fifth of the weights plus the libraries' 0.4 GiB is within 1.3x of the checkpoint from
    about 4 GiB of weights up; below, the libraries take the margin (4-layer 7B widths, 2.6 GiB: the build's scan
    peaked at 3.57 GiB, 1.37x; the full 7B's at 1.13x)."""
    return int(max(WORKING_SET_SHARE * weight_bytes, WORKING_SET_FLOOR))


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory(collect: bool = True) -> None:
    """Collect what the last step dropped (`collect`: a full collection, about 0.1 s with torch loaded) and give its
    pages back to the system. glibc keeps freed CPU tensors in its heap, where the holes between live blocks still
    count as resident: without this, each model a process loads after another (a stage, a runtime under the gate) or
    each recomputed layer of an update stacks on the last."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
