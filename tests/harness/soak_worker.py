"""One sandbox's share of the soak (tests/fs/soak.py): runs inside the sandbox, as its user, on the
volume shared by all the soak's sandboxes, until a deadline. Every operation checks its own result;
a failure is recorded (never fatal) in the status file the host reads.

  python3 soak_worker.py VOLUME_DIR INDEX COUNT SECONDS SEED STATUS_FILE

Operations: git init/commit (with git fsck now and then), SQLite transactions (a database of its
own in WAL mode, and one shared by all sandboxes in rollback-journal mode, so its fcntl locks are
contended), untar of generated archives (every file compared), appends to a log of its own,
atomic replacement by rename of a file and of a directory, a counter shared by all sandboxes
incremented under flock, fcntl byte-range locks on a shared slot file, reads of the other
sandboxes' files (each must be internally consistent), and multi-block files read back.
"""

import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
import traceback

root, index, count, seconds, seed, status_path = (
    sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
rng = random.Random(seed * 1000 + index)
mine = os.path.join(root, f"s{index}")
shared = os.path.join(root, "shared")
os.makedirs(mine, exist_ok=True)
os.makedirs(shared, exist_ok=True)
GIT = ["git", "-c", "user.name=soak", "-c", "user.email=soak@example.invalid", "-c", "gc.auto=0"]
SLOT = 64

state = {"ops": {}, "errors": [], "counter_increments": 0, "shared_rows": 0, "own_rows": 0,
         "commits": 0, "done": False}


class Mismatch(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise Mismatch(message)


def digest(data):
    return hashlib.sha256(data).hexdigest()


def write_synced(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def op_git():
    repo = os.path.join(mine, "repo")
    if not os.path.isdir(os.path.join(repo, ".git")):
        os.makedirs(repo, exist_ok=True)
        subprocess.run(GIT + ["init", "-q", repo], check=True, capture_output=True)
    name = f"f{rng.randrange(40)}.txt"
    with open(os.path.join(repo, name), "a") as f:
        f.write(f"{time.time()} {rng.randbytes(rng.randrange(10, 4000)).hex()}\n")
    subprocess.run(GIT + ["-C", repo, "add", name], check=True, capture_output=True)
    subprocess.run(GIT + ["-C", repo, "commit", "-q", "-m", f"commit {state['commits'] + 1}"], check=True,
                   capture_output=True)
    state["commits"] += 1
    log = subprocess.run(GIT + ["-C", repo, "rev-list", "--count", "HEAD"], check=True, capture_output=True, text=True)
    expect(int(log.stdout) == state["commits"], f"git: {log.stdout.strip()} commits, expected {state['commits']}")
    if state["commits"] % 25 == 0:
        subprocess.run(GIT + ["-C", repo, "fsck", "--no-progress"], check=True, capture_output=True)


def op_sqlite_own():
    db = sqlite3.connect(os.path.join(mine, "own.sqlite"), timeout=60)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        with db:
            for _ in range(rng.randrange(1, 20)):
                db.execute("INSERT INTO t (body) VALUES (?)", (rng.randbytes(rng.randrange(10, 3000)),))
                state["own_rows"] += 1
        (rows,) = db.execute("SELECT count(*) FROM t").fetchone()
        expect(rows == state["own_rows"], f"own sqlite: {rows} rows, expected {state['own_rows']}")
        if rng.random() < 0.1:
            (check,) = db.execute("PRAGMA integrity_check").fetchone()
            expect(check == "ok", f"own sqlite integrity_check: {check}")
    finally:
        db.close()


def op_sqlite_shared():
    db = sqlite3.connect(os.path.join(shared, "shared.sqlite"), timeout=120)
    try:
        db.execute("PRAGMA busy_timeout=120000")
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS t (sandbox INTEGER NOT NULL, seq INTEGER NOT NULL, "
                       "PRIMARY KEY (sandbox, seq))")
        with db:
            db.execute("INSERT INTO t VALUES (?, ?)", (index, state["shared_rows"] + 1))
        state["shared_rows"] += 1
        (rows,) = db.execute("SELECT count(*) FROM t WHERE sandbox = ?", (index,)).fetchone()
        expect(rows == state["shared_rows"], f"shared sqlite: {rows} rows of mine, expected {state['shared_rows']}")
    finally:
        db.close()


def op_untar():
    files = {f"d{n % 4}/file{n}": rng.randbytes(rng.choice([0, 100, 5000, 70_000, 300_000])) for n in range(30)}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    base = os.path.join(mine, "untar")
    target = os.path.join(base, f"t{rng.randrange(1 << 30)}")
    os.makedirs(base, exist_ok=True)
    archive_path = target + ".tar.gz"
    write_synced(archive_path, archive.getvalue())
    subprocess.run(["tar", "-xzf", archive_path, "-C", base + "/", "--one-top-level=" + os.path.basename(target)],
                   check=True, capture_output=True)
    for name, data in files.items():
        with open(os.path.join(target, name), "rb") as f:
            expect(digest(f.read()) == digest(data), f"untar: {name} differs from the archive")
    for old in os.listdir(base):
        path = os.path.join(base, old)
        if path not in (target, archive_path):
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def op_append():
    path = os.path.join(shared, f"append-{index}.log")
    seq = state["ops"].get("append", 0) + 1
    body = rng.randbytes(rng.randrange(1, 200)).hex()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{seq} {digest(body.encode())[:16]} {body}\n".encode())
    finally:
        os.close(fd)
    if seq % 20 == 0:
        with open(path) as f:
            lines = f.read().splitlines()
        expect(len(lines) == seq, f"append log: {len(lines)} lines, expected {seq}")
        for number, line in enumerate(lines, 1):
            fields = line.split(" ")
            expect(len(fields) == 3 and fields[0] == str(number) and digest(fields[2].encode())[:16] == fields[1],
                   f"append log: line {number} is torn: {line[:80]!r}")


def versioned(body):
    return f"{digest(body)}\n".encode() + body


def check_versioned(data, what):
    header, _, body = data.partition(b"\n")
    expect(header.decode(errors="replace") == digest(body), f"{what}: content does not match its checksum")


def op_rename():
    body = rng.randbytes(rng.randrange(10, 200_000))
    tmp = os.path.join(mine, "latest.tmp")
    write_synced(tmp, versioned(body))
    os.rename(tmp, os.path.join(mine, "latest"))
    # A directory replaced as a whole: built aside, then renamed over the previous one's name.
    staging = os.path.join(mine, "tree.new")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for n in range(rng.randrange(1, 6)):
        write_synced(os.path.join(staging, f"part{n}"), versioned(rng.randbytes(rng.randrange(10, 5000))))
    current = os.path.join(mine, "tree")
    if os.path.isdir(current):
        os.rename(current, os.path.join(mine, "tree.old"))
    os.rename(staging, current)
    shutil.rmtree(os.path.join(mine, "tree.old"), ignore_errors=True)
    with open(os.path.join(mine, "latest"), "rb") as f:
        check_versioned(f.read(), "latest (own)")


def op_flock_counter():
    path = os.path.join(shared, "counter")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            text = os.pread(fd, 64, 0).decode().strip()
            value = int(text or "0") + 1
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{value}\n".encode(), 0)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    state["counter_increments"] += 1


def op_fcntl_slots():
    path = os.path.join(shared, "slots")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, SLOT, index * SLOT, os.SEEK_SET)
        try:
            seq = state["ops"].get("fcntl", 0) + 1
            record = f"{index} {seq}".encode().ljust(SLOT - 17) + f" {digest(str(seq).encode())[:15]}\n".encode()
            os.pwrite(fd, record, index * SLOT)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, SLOT, index * SLOT, os.SEEK_SET)
        other = rng.randrange(count)
        fcntl.lockf(fd, fcntl.LOCK_SH, SLOT, other * SLOT, os.SEEK_SET)
        try:
            data = os.pread(fd, SLOT, other * SLOT)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, SLOT, other * SLOT, os.SEEK_SET)
        if data.strip(b"\0"):
            fields = data.split()
            expect(len(fields) == 3 and fields[0] == str(other).encode()
                   and digest(fields[1])[:15] == fields[2].decode(), f"slot {other} is torn: {data!r}")
    finally:
        os.close(fd)


def op_read_others():
    other = rng.randrange(count)
    base = os.path.join(root, f"s{other}")
    try:
        with open(os.path.join(base, "latest"), "rb") as f:
            check_versioned(f.read(), f"latest of sandbox {other}")
        for name in os.listdir(os.path.join(base, "tree")):
            with open(os.path.join(base, "tree", name), "rb") as f:
                check_versioned(f.read(), f"tree/{name} of sandbox {other}")
    except FileNotFoundError:
        pass  # not written yet, or its tree replaced between the listing and the open


def op_big():
    data = rng.randbytes(rng.choice([1, 4, 9]) << 20)
    path = os.path.join(mine, "big")
    write_synced(path, data)
    with open(path, "rb") as f:
        expect(digest(f.read()) == digest(data), "big file read back differs")


OPS = [(op_git, "git", 3), (op_sqlite_own, "sqlite", 3), (op_sqlite_shared, "sqlite_shared", 2),
       (op_untar, "untar", 1), (op_append, "append", 4), (op_rename, "rename", 3),
       (op_flock_counter, "flock", 3), (op_fcntl_slots, "fcntl", 3), (op_read_others, "read_others", 4),
       (op_big, "big", 1)]


def save_status():
    tmp = status_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.rename(tmp, status_path)


deadline = time.monotonic() + seconds
saved = 0.0
while time.monotonic() < deadline:
    function, name, _ = rng.choices(OPS, weights=[w for _, _, w in OPS])[0]
    try:
        function()
        state["ops"][name] = state["ops"].get(name, 0) + 1
    except Exception as error:  # every failure is reported, the soak goes on
        state["errors"].append(f"{time.strftime('%H:%M:%S')} {name}: {error!r} "
                               f"{traceback.format_exc().splitlines()[-3:]}")
        state["errors"] = state["errors"][-50:]
        state["error_count"] = state.get("error_count", 0) + 1
    if time.monotonic() - saved > 5:
        save_status()
        saved = time.monotonic()
state["done"] = True
save_status()
