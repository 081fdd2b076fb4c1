"""A command's memory over time, summed over its whole process tree: what the machine must hold while a build runs
its stages in one process and its bench in child processes (a single process's maximum RSS misses the parent that
waits beside a child).

    python benchmarks/tree_memory.py [--every 2] [--timeline FILE] -- edgekit build --model DIR ...

Samples VmRSS of the command and every descendant (/proc, Linux) every --every seconds; prints the peak when the
command ends and exits with its exit code. The timeline file has one line a sample: seconds since start, processes,
GiB. A peak between two samples is missed, so the figure is a lower bound; pair it with each process's own
high-water mark (`/usr/bin/time -v`) for the largest single process.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from edgekit.devices.bench import status_mib

MIB_PER_GIB = 1024


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # gone between two reads
        return []


def tree_rss(root: int) -> tuple[int, float]:
    """(processes, MiB resident) of `root` and its descendants now."""
    todo, count, total = [root], 0, 0.0
    while todo:
        pid = todo.pop()
        rss = status_mib("VmRSS", pid)  # NaN: ended since its parent listed it, or a zombie
        count, total = count + 1, total + (0.0 if math.isnan(rss) else rss)
        todo += _children(pid)
    return count, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--timeline", type=Path, help="write every sample here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command: put it after --")
    start, peak, peak_at = time.monotonic(), 0, 0.0
    proc = subprocess.Popen(command)
    with open(args.timeline or "/dev/null", "w") as timeline:
        while proc.poll() is None:
            count, total = tree_rss(proc.pid)
            elapsed = time.monotonic() - start
            if total > peak:
                peak, peak_at = total, elapsed
            timeline.write(f"{elapsed:.0f} {count} {total / MIB_PER_GIB:.3f}\n")
            timeline.flush()
            time.sleep(args.every)
    print(f"peak {peak / MIB_PER_GIB:.2f} GiB at {peak_at:.0f} s of {time.monotonic() - start:.0f} s", file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
