#!/usr/bin/env python3
"""What the multi-host tests run ON a host (through tests/harness/hosts.sh exec), on a path of a
volume mounted there. Python 3 stdlib only.

  worker.py serve                       JSON-lines RPC on stdin/stdout (see OPS); one answer per
                                        request: {"ok": RESULT} or {"error": "...", "errno": N}
  worker.py writers DIR TAG N SIZE      create DIR/TAG-K (K < N) with SIZE bytes derived from
                                        (TAG, K), each closed before the next
  worker.py verify DIR TAGS N SIZE      every DIR/TAG-K (TAG in the comma-separated TAGS) holds
                                        what `writers` wrote, and DIR lists exactly those names
  worker.py renames ROOT SEED N         N renames of random directories between random parents
                                        under ROOT (ENOENT/EINVAL/ENOTEMPTY/EEXIST are expected
                                        losses of races with other hosts); prints the tally
  worker.py counter PATH N              N times: flock(LOCK_EX), read the counter (see
                                        counter_bytes; its length changes as it grows), write it
                                        + 1, truncate to it, fsync, unlock
  worker.py sqlite_init DB               create table t (writer, n, payload) in a new database
  worker.py sqlite_check DB              print {"integrity": ..., "counts": {WRITER: ROWS}}
  worker.py sqlite DB WRITER N          N transactions, each inserting one row (WRITER, K) into
                                        table t of an SQLite database in rollback-journal mode
  worker.py hold_flock PATH             take flock(LOCK_EX) on PATH, print "locked", then write
                                        to PATH-data forever (until killed)
Monotonic timestamps are comparable across hosts: the hosts are namespaces of one kernel.
"""

import errno
import fcntl
import json
import os
import random
import sqlite3
import sys
import time


def content(tag, k, size):
    """Deterministic bytes of file (tag, k): a header line, then filler."""
    head = f"{tag}:{k}\n".encode()
    filler = (f"{tag}-{k}-" * (size // 8 + 1)).encode()
    return (head + filler)[:size] if size >= len(head) else head


def write_file(path, data, fsync=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic_ns()


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# ---- RPC operations (arguments by name; bytes travel as latin-1 strings)

def op_write(path, data, fsync=False):
    return {"closed_ns": write_file(path, data.encode("latin-1"), fsync)}


def op_read(path):
    return read_file(path).decode("latin-1")


def op_stat(path):
    st = os.stat(path)
    return {"size": st.st_size, "mode": st.st_mode, "ino": st.st_ino, "nlink": st.st_nlink}


def op_listdir(path):
    return sorted(os.listdir(path))


def op_mkdir(path):
    os.mkdir(path)


def op_now():
    return time.monotonic_ns()


def op_poll_content(path, expect, within, interval=0):
    """Opens and reads `path` until it holds `expect`; returns when it was first seen."""
    want = expect.encode("latin-1")
    deadline = time.monotonic() + within
    polls = 0
    while True:
        polls += 1
        try:
            if read_file(path) == want:
                return {"seen_ns": time.monotonic_ns(), "polls": polls}
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not hold the expected {len(want)} bytes within {within}s")
        time.sleep(interval)


def op_poll_stat(path, size, within, interval=0):
    """stat()s `path` until its size is `size`, then reads it; returns when the size was seen."""
    deadline = time.monotonic() + within
    polls = 0
    while True:
        polls += 1
        try:
            if os.stat(path).st_size == size:
                return {"seen_ns": time.monotonic_ns(), "polls": polls}
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not reach size {size} within {within}s")
        time.sleep(interval)


def op_poll_listing(path, name, within, interval=0):
    """Lists `path` until `name` is in it."""
    deadline = time.monotonic() + within
    polls = 0
    while True:
        polls += 1
        if name in os.listdir(path):
            return {"seen_ns": time.monotonic_ns(), "polls": polls}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not appear in {path} within {within}s")
        time.sleep(interval)


def op_walk(path, limit=10000):
    """Every directory under `path`, relative, as os.walk finds them (at most `limit`: a loop
    in the tree must not make this run forever)."""
    found = []
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            found.append(os.path.relpath(os.path.join(dirpath, name), path))
        if len(found) > limit:
            raise RuntimeError(f"more than {limit} directories under {path}")
    return sorted(found)


HELD = {}


def op_flock_try(path):
    """flock(LOCK_EX | LOCK_NB): True if taken (then kept until flock_release), False if busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    HELD[path] = fd
    return True


def op_flock_release(path):
    os.close(HELD.pop(path))


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = {"ok": OPS[request.pop("op")](**request)}
        except OSError as error:
            answer = {"error": f"{type(error).__name__}: {error}", "errno": error.errno}
        except Exception as error:  # the driver reports it; the worker keeps serving
            answer = {"error": f"{type(error).__name__}: {error}", "errno": None}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


# ---- batch commands

def writers(directory, tag, n, size):
    for k in range(int(n)):
        write_file(os.path.join(directory, f"{tag}-{k}"), content(tag, k, int(size)))
    print(f"wrote {n} files")


def verify(directory, tags, n, size):
    expected = {f"{tag}-{k}": (tag, k) for tag in tags.split(",") for k in range(int(n))}
    listed = set(os.listdir(directory))
    if listed != set(expected):
        missing, extra = sorted(set(expected) - listed), sorted(listed - set(expected))
        sys.exit(f"{directory}: {len(missing)} missing ({missing[:5]}), {len(extra)} unexpected ({extra[:5]})")
    for name, (tag, k) in sorted(expected.items()):
        if read_file(os.path.join(directory, name)) != content(tag, k, int(size)):
            sys.exit(f"{directory}/{name}: wrong content")
    print(f"verified {len(expected)} files")


RENAME_RACES = (errno.ENOENT, errno.EINVAL, errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY)


def renames(root, seed, n):
    """Directories d0..d11 start as root's children (created by the driver); every step moves a
    random one under a random other (or back under root). Moving a directory under its own
    descendant must fail with EINVAL, on every host, whatever the others do."""
    rng = random.Random(int(seed))
    tally = {"ok": 0}
    names = [f"d{i}" for i in range(12)]

    def where(name):
        for dirpath, dirnames, _ in os.walk(root):
            if name in dirnames:
                return os.path.join(dirpath, name)
        return None

    for _ in range(int(n)):
        src_name, dst_name = rng.sample(names, 2)
        src = where(src_name)
        parent = root if rng.random() < 0.25 else where(dst_name)
        if src is None or parent is None:
            tally["lost"] = tally.get("lost", 0) + 1
            continue
        try:
            os.rename(src, os.path.join(parent, src_name))
            tally["ok"] += 1
        except OSError as error:
            if error.errno not in RENAME_RACES:
                raise
            key = errno.errorcode[error.errno]
            tally[key] = tally.get(key, 0) + 1
    print(json.dumps(tally))


def counter_bytes(value):
    """The counter file: the value, a newline and value % 13 '#': its length changes with
    almost every increment, so a reader with a stale size or stale pages reads a malformed or
    an old value."""
    return f"{value}\n{'#' * (value % 13)}".encode()


def counter_value(data):
    """The value of counter file content; ValueError if it is not exactly counter_bytes(value)."""
    value = int(data.split(b"\n", 1)[0] or b"0")
    if data not in (b"", b"0") and data != counter_bytes(value):
        raise ValueError(f"the counter file holds {data!r}, not a counter value")
    return value


def counter(path, n):
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(int(n)):
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            data = os.pread(fd, 64, 0)
            if len(data) != size:
                raise ValueError(f"fstat says {size} bytes, read returned {data!r}")
            data = counter_bytes(counter_value(data) + 1)
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    print(f"incremented {n} times")


def sqlite_init(db):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("CREATE TABLE t (writer INTEGER, n INTEGER, payload TEXT, UNIQUE (writer, n))")
    conn.close()


def sqlite_check(db):
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    integrity = conn.execute("PRAGMA integrity_check").fetchall()
    counts = dict(conn.execute("SELECT writer, count(*) FROM t GROUP BY writer ORDER BY writer"))
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    print(json.dumps({"integrity": [row[0] for row in integrity], "counts": counts, "journal_mode": mode}))


def sqlite_writer(db, writer, n):
    conn = sqlite3.connect(db, timeout=300, isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
    if mode != "delete":
        sys.exit(f"journal_mode is {mode}, not delete")
    for k in range(int(n)):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (writer, n, payload) VALUES (?, ?, ?)", (int(writer), k, "x" * 200))
        conn.execute("COMMIT")
    conn.close()
    print(f"writer {writer}: {n} transactions")


def hold_flock(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    k = 0
    while True:
        write_file(f"{path}-data", content("hold", k, 256 * 1024))
        k += 1


COMMANDS = {
    "writers": writers,
    "verify": verify,
    "renames": renames,
    "counter": counter,
    "sqlite_init": sqlite_init,
    "sqlite_check": sqlite_check,
    "sqlite": sqlite_writer,
    "hold_flock": hold_flock,
}

if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "serve":
        serve()
    elif len(sys.argv) >= 2 and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    else:
        sys.exit(__doc__)
