#!/usr/bin/env python3
"""Cross-host visibility: how long after close() on host A a reader polling on host B sees the
change, p50/p99/max over N changes, for a volume whose metadata is on PostgreSQL (and, for
comparison, on SQLite: one database file that both "hosts" open, which only namespaces of one
kernel can do). A measurement, not a test. See bench/README.md.

  python3 bench/crosshost.py [--changes N] [--engines "postgres sqlite"] [--interval SECONDS]

Two hosts (tests/harness/hosts.sh), PostgreSQL and Ceph RGW on this machine's address on their
network, one volume mounted by `cellar mount` on each host. Rows (each N changes):
  content (open+read)  A rewrites a 4 KiB file with new bytes of the same size; B re-opens and
                       reads it until it holds them
  size (stat)          A rewrites the file with a new size; B stat()s it until it has that size
  listing (readdir)    A creates a new file; B lists the directory until the name is in it
Latency = monotonic time when B first saw the change - monotonic time right after A's close()
returned (one kernel, one clock). B sleeps --interval between polls (default 1 ms) so the
polling loop leaves CPU to the daemons on a small machine.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests/multihost"))
from lib import Cluster, MountVolume, fresh_work_dir, note, remove_work_dir  # noqa: E402


def percentile(values, p):
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def measure(cluster, vol, changes, interval):
    a, b = cluster.worker(1), cluster.worker(2)
    root_a, root_b = vol.path(1) / "x", vol.path(2) / "x"
    a.call("mkdir", path=str(root_a))
    a.call("write", path=str(root_a / "f"), data="-" * 4096)
    b.call("poll_content", path=str(root_b / "f"), expect="-" * 4096, within=60, interval=interval)
    rows = {"content (open+read)": [], "size (stat)": [], "listing (readdir)": []}
    for k in range(changes):
        data = f"{k:08d}".ljust(4096, "abcdefgh"[k % 8])
        b.send("poll_content", path=str(root_b / "f"), expect=data, within=30, interval=interval)
        closed = a.call("write", path=str(root_a / "f"), data=data)["closed_ns"]
        seen = b.receive("poll_content", timeout=40)["seen_ns"]
        rows["content (open+read)"].append((seen - closed) / 1e6)

        size = 100 + k % 3000
        b.send("poll_stat", path=str(root_b / "f"), size=size, within=30, interval=interval)
        closed = a.call("write", path=str(root_a / "f"), data="s" * size)["closed_ns"]
        seen = b.receive("poll_stat", timeout=40)["seen_ns"]
        rows["size (stat)"].append((seen - closed) / 1e6)

        name = f"new-{k}"
        b.send("poll_listing", path=str(root_b), name=name, within=30, interval=interval)
        closed = a.call("write", path=str(root_a / name), data="n")["closed_ns"]
        seen = b.receive("poll_listing", timeout=40)["seen_ns"]
        rows["listing (readdir)"].append((seen - closed) / 1e6)
        if (k + 1) % 250 == 0:
            note(f"{k + 1}/{changes} changes")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--engines", default="postgres sqlite")
    parser.add_argument("--interval", type=float, default=0.001)
    args = parser.parse_args()
    results = {}
    for engine in args.engines.split():
        work = fresh_work_dir("crosshost")
        try:
            with Cluster(work, n_hosts=2, meta=engine) as cluster:
                vol = MountVolume(cluster, (1, 2))
                started = time.monotonic()
                results[engine] = measure(cluster, vol, args.changes, args.interval)
                note(f"{engine}: {args.changes} x 3 changes in {time.monotonic() - started:.0f}s")
        finally:
            remove_work_dir(work)
    print()
    print(f"Cross-host visibility, ms from close() on host A to seen on host B ({args.changes} changes per row, "
          f"B polls every {args.interval * 1000:g} ms)")
    print()
    print("| row | engine | p50 | p99 | max |")
    print("|---|---|---:|---:|---:|")
    for engine, rows in results.items():
        for row, values in rows.items():
            print(f"| {row} | {engine} | {statistics.median(values):.1f} | {percentile(values, 99):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
