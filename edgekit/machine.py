"""What this machine has now, for choices that must fit it: the export's preflight, the runtimes' float16 handling.
Standard library only, so the device runtimes can read it too."""

from __future__ import annotations

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
