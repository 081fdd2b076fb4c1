"""Byte counts for people: binary units for model parts (as `inspect` shows them), decimal units for memory budgets
(as boards and phones are sold: 8 GB = 8e9 bytes)."""

from __future__ import annotations

_SYSTEMS = {  # base, units, decimals
    "binary": (1024, ("B", "KiB", "MiB", "GiB", "TiB"), 1),
    "decimal": (1000, ("B", "KB", "MB", "GB", "TB"), 2),
}


def human_bytes(n: float, system: str = "binary") -> str:
    """'1.5 GiB' (binary) or '1.61 GB' (decimal); whole bytes below the first unit."""
    base, units, decimals = _SYSTEMS[system]
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= base
    return f"{n:.{decimals}f} {units[-1]}"
