"""Peak memory of a whole process tree: ``python scripts/peak_rss.py [--every S] -- COMMAND ...``.

``/usr/bin/time -v`` reports the largest single process, which for a Spark preparation misses the JVM
(py4j starts it as a child of the Python driver) and the Python workers it forks. This samples the
resident set size of the command and all of its descendants every ``--every`` seconds (from /proc, Linux)
and prints the peak of their sum, with the wall time and the exit status. A sampled peak can only miss a
spike shorter than the interval, so it is a lower bound of the true peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def tree_rss_kb(root: int) -> int:
    """Summed VmRSS (kB) of ``root`` and its descendants, read from /proc."""
    children: dict = {}
    rss: dict = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue  # a process that ended while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(d.name), int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to measure after --")
    start = time.monotonic()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid))
        time.sleep(args.every)
    wall = time.monotonic() - start
    print(
        f"peak tree RSS: {peak / 1024:.0f} MB  wall: {wall:.0f} s  exit: {proc.returncode}  ({os.path.basename(cmd[0])})",
        file=sys.stderr,
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
