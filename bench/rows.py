#!/usr/bin/env python3
"""Helpers of bench/run.sh (python3 stdlib only): the inputs it makes once, the rows that are
easier in Python than in a shell, and the table it prints. One subcommand per job:

  inputs WORK                      tree.tar (2,600 files) and repo/ (git, 5,000 files) in WORK
  mkfiles DIR N DIRS THREADS       N empty files in DIRS directories under DIR, THREADS at once
  ttfb FILE SAMPLES                seconds from open() to the first 4 KiB at a random offset of a
                                   cold FILE: median over SAMPLES offsets (each in its own 64 MiB)
  sqlite DB ROWS TXS               ROWS inserts in TXS transactions, WAL mode (synchronous=FULL)
  fio JSON                         "IOPS MEAN_LATENCY_SECONDS" of fio's --output-format=json
  fold                             perf script on stdin -> folded stacks (flamegraph.pl input)
  table RESULTS RAW_GET_S          the Markdown table of run.sh's results file
"""

import concurrent.futures
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter


def inputs(work):
    """A tarball of ~2,600 files and a git repository of ~5,000 files (source-like sizes:
    log-normal, median ~1.8 KB, a few up to 200 KB)."""
    rnd = random.Random(42)

    def tree(top, files, dirs):
        for d in range(dirs):
            os.makedirs(os.path.join(top, f"pkg{d % 17}", f"mod{d}"), exist_ok=True)
        for i in range(files):
            d = i % dirs
            size = int(rnd.lognormvariate(7.5, 1.3)) % 200_000
            with open(os.path.join(top, f"pkg{d % 17}", f"mod{d}", f"file{i}.py"), "wb") as f:
                f.write(rnd.randbytes(size // 2 + 1).hex().encode()[:size])

    tree(os.path.join(work, "src-tree"), 2600, 160)
    with tarfile.open(os.path.join(work, "tree.tar"), "w") as t:
        t.add(os.path.join(work, "src-tree"), arcname="tree")
    repo = os.path.join(work, "repo")
    tree(repo, 5000, 300)
    git = ["git", "-C", repo, "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", "init", "-q", repo], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "bench"], check=True)
    subprocess.run(git + ["gc", "-q"], check=True)


def mkfiles(top, count, dirs, threads):
    """Empty files d000/f000000 ... made by THREADS workers (each its own directories, so a
    metadata engine sees no conflicting transactions): the setup of the ls -lR row, not timed."""
    count, dirs, threads = int(count), int(dirs), int(threads)
    paths = [os.path.join(top, f"d{d:03d}") for d in range(dirs)]
    for p in paths:
        os.makedirs(p, exist_ok=True)

    def create(d, i):
        os.close(os.open(os.path.join(paths[d], f"f{i:06d}"), os.O_WRONLY | os.O_CREAT, 0o644))

    def work(worker):
        if dirs >= threads:  # each worker its own directories: file i lives in directory i % dirs
            for d in range(worker, dirs, threads):
                for i in range(d, count, dirs):
                    create(d, i)
        else:
            for i in range(worker, count, threads):
                create(i % dirs, i)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, w) for w in range(threads)]:
            f.result()


def ttfb(path, samples):
    """Each offset lies in its own 64 MiB stretch, so no sample is served by an earlier one's
    read-ahead."""
    samples = int(samples)
    size = os.path.getsize(path)
    span = max(size // samples, 4096)
    rnd = random.Random(7)
    times = []
    for k in range(samples):
        lo = k * span
        off = (lo + rnd.randrange(max(span - 4096, 1))) // 4096 * 4096
        started = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        data = os.pread(fd, 4096, off)
        times.append(time.monotonic() - started)
        os.close(fd)
        if not data:
            raise SystemExit(f"ttfb: read nothing at {off} of {path}")
    print(f"{statistics.median(times):.6f}")


def sqlite_inserts(path, rows, txs):
    rows, txs = int(rows), int(txs)
    rnd = random.Random(3)
    db = sqlite3.connect(path, isolation_level=None)
    if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
        raise SystemExit("sqlite: WAL mode refused")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
    db.execute("CREATE INDEX t_k ON t (k)")
    per_tx = rows // txs
    for _ in range(txs):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                       [(rnd.randbytes(8).hex(), rnd.randbytes(100)) for _ in range(per_tx)])
        db.execute("COMMIT")
    got = db.execute("SELECT count(*) FROM t").fetchone()[0]
    db.close()
    if got != per_tx * txs:
        raise SystemExit(f"sqlite: {got} rows, expected {per_tx * txs}")


def fio(path):
    import json
    with open(path) as f:
        job = json.load(f)["jobs"][0]["read"]
    lat = job.get("lat_ns", job.get("clat_ns", {})).get("mean", 0) / 1e9
    print(f"{job['iops']:.1f} {lat:.6f}")


def fold():
    """perf script's output: one sample per paragraph, a header line then frames, leaf first."""
    stacks = Counter()
    comm, frames = None, []

    def flush():
        if comm is not None:
            stacks[";".join([comm] + frames[::-1])] += 1

    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            flush()
            comm, frames = None, []
        elif not line[0].isspace():
            flush()
            comm, frames = line.split()[0], []
        else:
            parts = line.split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = sym.rsplit(" (", 1)[0]  # drop " (/path/to/dso)"
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)  # one frame per function, not per address
            frames.append(sym.replace(";", ":") or "[unknown]")
    flush()
    for stack, n in stacks.most_common():
        print(f"{stack} {n}")


def numeric(v):
    try:
        float(v.split()[0])
        return True
    except (ValueError, IndexError):
        return False


def fmt(v):
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}" if v >= 0.01 else f"{v:.4f}"


def table(results, raw_get):
    """results: lines `system<TAB>row<TAB>value<TAB>kind<TAB>label`; value is seconds, `>N` (the
    row timeout stopped it), `failed`, `skipped`, or for kind iops `IOPS MEAN_LATENCY_S`; kind
    `mib` is a memory figure (no ratio)."""
    systems, rows, cell = [], [], {}
    with open(results) as f:
        for line in f:
            s, row, value, kind, label = line.rstrip("\n").split("\t")
            if s not in systems:
                systems.append(s)
            if (row, kind, label) not in rows:
                rows.append((row, kind, label))
            cell[s, row] = value
    print("| workload (seconds, × local) | " + " | ".join(systems) + " |")
    print("|---|" + "---:|" * len(systems))

    def per_op(v, kind):
        """Seconds, or for iops seconds per read: what the ratio compares."""
        if kind == "iops":
            iops = float(v.split()[0])
            return 1 / iops if iops else float("inf")
        return float(v)

    for row, kind, label in rows:
        base = cell.get(("local", row), "")
        out = []
        for s in systems:
            v = cell.get((s, row), "–")
            if kind == "mib" or not (numeric(v) or v[:1] == ">"):
                out.append(v)  # a memory figure, or –, failed, skipped
                continue
            if v[:1] == ">":  # stopped by the row timeout: a lower bound of the seconds
                text, c, gt = f"> {fmt(float(v[1:]))} s" if kind == "iops" else f"> {fmt(float(v[1:]))}", None, "> "
                if kind != "iops":
                    c = float(v[1:])
            else:
                c, gt = per_op(v, kind), ""
                if kind == "iops":
                    iops, lat = map(float, v.split())
                    text = f"{iops:,.0f} IOPS, {lat * 1000:.2f} ms"
                else:
                    text = fmt(c)
            if c is not None and numeric(base):
                b = per_op(base, kind)
                if b > 0:
                    text += f" ({gt}{c / b:.1f}×)"
            out.append(text)
        print(f"| {label} | " + " | ".join(out) + " |")
    if raw_get and raw_get != "-":
        g = float(raw_get)
        out = []
        for s in systems:
            v = cell.get((s, "read"), "–")
            if numeric(v):
                out.append(f"{float(v) / g:.2f}×")
            elif v.startswith(">"):
                out.append(f"> {float(v[1:]) / g:.2f}×")
            else:
                out.append(v)
        print("| cold read ÷ raw GET (curl) | " + " | ".join(out) + " |")


def main(argv):
    jobs = {"inputs": inputs, "mkfiles": mkfiles, "ttfb": ttfb, "sqlite": sqlite_inserts,
            "fio": fio, "fold": fold, "table": table}
    if not argv or argv[0] not in jobs:
        raise SystemExit(__doc__)
    jobs[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
