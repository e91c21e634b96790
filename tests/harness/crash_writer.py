"""The write workload of tests/fs/crash_loops.py, and the model that checks what survived a crash.

As a program (on the host, or inside a sandbox: standard library only):

  python3 crash_writer.py ROOT JOURNAL SEED ERRORS

runs random operations under ROOT until killed: files created, appended to, overwritten and
truncated (each ending with fsync or a plain close), files and whole directories renamed (also
over an existing file), hard links, unlinks, mkdirs, and SQLite transactions on a WAL database
under ROOT/sqlite (synchronous=FULL). Before each operation it appends its intent to JOURNAL (on
local disk, fsynced), and once the operation returned its acknowledgement: at most one operation
is ever unacknowledged. A file's old content is read and compared with the model before it is
changed. A failed check goes to ERRORS as a line starting with MISMATCH; any other failure (the
mount going away) as a line starting with ERROR; then the writer exits 1.

As a module: `replay(journal)` gives the model of the acknowledged operations and the pending
one; `check(model, pending, root)` compares a tree with it and says how the pending operation
ended, which `resolve` records in the journal before the next writer starts.
"""

import hashlib
import json
import os
import random
import sqlite3
import sys
import time
import traceback

CHUNK = 256 * 1024
SIZES = [0, 10, 3_000, 70_000, 300_000, 1_000_000, 4_194_304 + 17]
SIZE_WEIGHTS = [1, 4, 4, 3, 2, 1, 1]
MAX_FILES = 40
MAX_DIRS = 8
TREE = "w"
DATA_OPS = ("create", "append", "overwrite", "truncate")


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Mismatch(Exception):
    pass


class Model:
    """What ROOT must hold: files (path under ROOT/w -> inode), the inodes' (size, sha256), the
    directories, and the committed SQLite row ids."""

    def __init__(self):
        self.files = {}
        self.inodes = {}
        self.dirs = {""}
        self.rows = set()
        self.next_ino = 1
        self.next_row = 1

    def copy(self):
        other = Model()
        other.files, other.inodes, other.dirs = dict(self.files), dict(self.inodes), set(self.dirs)
        other.rows, other.next_ino, other.next_row = set(self.rows), self.next_ino, self.next_row
        return other

    def drop(self, path):
        ino = self.files.pop(path, None)
        if ino is not None and ino not in self.files.values():
            del self.inodes[ino]

    def apply(self, op):
        kind = op["op"]
        if kind == "mkdir":
            self.dirs.add(op["path"])
        elif kind == "create":
            self.files[op["path"]] = op["ino"]
            self.inodes[op["ino"]] = tuple(op["content"])
            self.next_ino = max(self.next_ino, op["ino"] + 1)
        elif kind in DATA_OPS:
            self.inodes[self.files[op["path"]]] = tuple(op["content"])
        elif kind == "rename":
            ino = self.files.pop(op["src"])
            self.drop(op["dst"])
            self.files[op["dst"]] = ino
        elif kind == "rename_dir":
            src, dst = op["src"], op["dst"]
            moved = lambda path: dst + path[len(src):] if path == src or path.startswith(src + "/") else path
            self.dirs = {moved(d) for d in self.dirs}
            self.files = {moved(p): ino for p, ino in self.files.items()}
        elif kind == "link":
            self.files[op["dst"]] = self.files[op["src"]]
        elif kind == "unlink":
            self.drop(op["path"])
        elif kind == "sqlite":
            self.rows.update(op["rows"])
            self.next_row = max(self.next_row, max(op["rows"], default=0) + 1)
        else:
            raise ValueError(f"unknown operation {kind}")

    def paths_of(self, ino):
        return sorted(p for p, i in self.files.items() if i == ino)


def read_journal(path):
    """The journal's entries; a torn last line (the writer died writing it) is dropped."""
    entries = []
    try:
        text = open(path).read()
    except FileNotFoundError:
        return entries
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def resolve(path, resolution):
    """Records how the pending operation ended (None: it did not happen), after cutting a torn
    last line, so that the next writer starts from a complete journal."""
    with open(path, "r+b") as f:
        text = f.read()
        f.truncate(text.rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write(json.dumps({"resolve": resolution}).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def replay(entries):
    """(model of every acknowledged or resolved operation, the pending operation or None, the
    number of acknowledged operations)."""
    model, pending, acked = Model(), None, 0
    for entry in entries:
        if "intent" in entry:
            pending = entry["intent"]
        elif "ack" in entry:
            model.apply(pending)
            pending, acked = None, acked + 1
        elif "resolve" in entry:
            if entry["resolve"] is not None:
                model.apply(entry["resolve"])
            pending = None
    return model, pending, acked


# ---- checking a tree against the model (host side)

def observe(root):
    """{relative dir}, {relative file: (st_ino, size, sha256)} of ROOT/w (SQLite files excluded)."""
    base = os.path.join(root, TREE)
    dirs, files = set(), {}
    if not os.path.isdir(base):
        return dirs, files
    for current, subdirs, names in os.walk(base):
        relative = os.path.relpath(current, base)
        dirs.add("" if relative == "." else relative)
        for name in names:
            path = os.path.join(current, name)
            with open(path, "rb") as f:
                data = f.read()
            files[os.path.relpath(path, base)] = (os.stat(path).st_ino, len(data), sha(data))
    return dirs, files


def differences(model, observed):
    """How `observed` differs from `model`."""
    dirs, files = observed
    problems = []
    if dirs != model.dirs:
        problems.append(f"directories: missing {sorted(model.dirs - dirs)[:5]}, unexpected {sorted(dirs - model.dirs)[:5]}")
    if set(files) != set(model.files):
        problems.append(f"files: missing {sorted(set(model.files) - set(files))[:5]}, "
                        f"unexpected {sorted(set(files) - set(model.files))[:5]}")
    inode_of = {}
    for path, ino in model.files.items():
        if path not in files:
            continue
        st_ino, size, digest = files[path]
        if (size, digest) != model.inodes[ino]:
            problems.append(f"{path}: {size} bytes sha256 {digest[:12]}, acknowledged "
                            f"{model.inodes[ino][0]} bytes sha256 {model.inodes[ino][1][:12]}")
        if inode_of.setdefault(ino, st_ino) != st_ino:
            problems.append(f"{path}: no longer the same file as {model.paths_of(ino)} (hard links)")
    if len(set(inode_of.values())) != len(inode_of):
        problems.append("distinct files share an inode")
    return problems


def check_sqlite(model, pending, root):
    """(problems, rows of the pending transaction that committed)."""
    path = os.path.join(root, "sqlite", "db.sqlite")
    if not os.path.exists(path):
        return ([] if not model.rows else [f"SQLite database missing ({len(model.rows)} committed rows)"]), []
    # A mount replacing a killed one releases the locks the killed one held at once; a writer
    # stopped in a transaction may hold a lock for a moment.
    deadline = time.monotonic() + 20
    while True:
        try:
            db = sqlite3.connect(path, timeout=10)
            try:
                (integrity,) = db.execute("PRAGMA integrity_check").fetchone()
                tables = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()[0]
                rows = {row for (row,) in db.execute("SELECT id FROM t")} if tables else set()
            finally:
                db.close()
            break
        except sqlite3.OperationalError as error:
            if time.monotonic() > deadline:
                return [f"SQLite database unreadable: {error}"], []
            time.sleep(1)
    problems = [] if integrity == "ok" else [f"SQLite integrity_check: {integrity}"]
    possible = set(pending["rows"]) if pending and pending["op"] == "sqlite" else set()
    if model.rows - rows:
        problems.append(f"SQLite: {len(model.rows - rows)} committed rows lost, e.g. {sorted(model.rows - rows)[:5]}")
    if rows - model.rows - possible:
        problems.append(f"SQLite: rows never committed are present: {sorted(rows - model.rows - possible)[:5]}")
    committed = sorted(rows & possible)
    if committed and set(committed) != possible:
        problems.append(f"SQLite: the pending transaction is half there ({len(committed)} of {len(possible)} rows)")
    return problems, committed


def check(model, pending, root):
    """Compares ROOT with the model: every acknowledged operation must be there; the pending one
    may have happened or not (a pending data operation may leave its file with any content: the
    writes were never acknowledged). Returns (problems, resolution: the operation that is now
    durable in place of the pending one, or None)."""
    observed = observe(root)
    sqlite_problems, committed_rows = check_sqlite(model, pending, root)
    if pending is None or pending["op"] == "sqlite":
        resolution = dict(pending, rows=committed_rows) if pending and committed_rows else None
        return differences(model, observed) + sqlite_problems, resolution
    if pending["op"] in DATA_OPS:
        path = pending["path"]
        if path not in observed[1]:
            # Never there (a create that did not happen) or lost: the model tells which.
            return differences(model, observed) + sqlite_problems, None
        resolved = dict(pending, content=list(observed[1][path][1:]))
        candidate = model.copy()
        candidate.apply(resolved)
        return differences(candidate, observed) + sqlite_problems, resolved
    after = model.copy()
    after.apply(pending)
    if not differences(after, observed):
        return sqlite_problems, pending
    before = differences(model, observed)
    return (before + sqlite_problems if before else sqlite_problems), None


# ---- the writer

class Writer:
    def __init__(self, root, journal_path, seed):
        self.root = root
        self.base = os.path.join(root, TREE)
        self.rng = random.Random(seed)
        entries = read_journal(journal_path)
        self.model, pending, _ = replay(entries)
        if pending is not None:
            raise SystemExit("crash_writer: the journal ends with an unresolved operation")
        self.journal = open(journal_path, "a")
        os.makedirs(self.base, exist_ok=True)
        os.makedirs(os.path.join(root, "sqlite"), exist_ok=True)

    def log(self, entry):
        self.journal.write(json.dumps(entry) + "\n")
        self.journal.flush()
        os.fsync(self.journal.fileno())

    def abs(self, relative):
        return os.path.join(self.base, relative)

    def new_name(self, prefix):
        parent = self.rng.choice(sorted(self.model.dirs))
        while True:
            name = f"{prefix}{self.rng.randrange(1 << 20)}"
            path = f"{parent}/{name}" if parent else name
            if path not in self.model.files and path not in self.model.dirs:
                return path

    def read_checked(self, path):
        with open(self.abs(path), "rb") as f:
            data = f.read()
        expected = self.model.inodes[self.model.files[path]]
        if (len(data), sha(data)) != tuple(expected):
            raise Mismatch(f"{path} read back {len(data)} bytes sha256 {sha(data)[:12]} before changing it, "
                           f"acknowledged {expected[0]} bytes sha256 {expected[1][:12]}")
        return data

    def finish(self, fd):
        if self.rng.random() < 0.6:
            os.fsync(fd)
        os.close(fd)

    def write_all(self, fd, data, offset):
        # In pieces, so that a kill lands in the middle of a file.
        for start in range(0, len(data), CHUNK):
            os.pwrite(fd, data[start:start + CHUNK], offset + start)

    def choose(self):
        m = self.model
        files = sorted(m.files)
        weights = {"create": 4 if len(files) < MAX_FILES else 0, "mkdir": 1 if len(m.dirs) < MAX_DIRS else 0,
                   "sqlite": 3, "rename_dir": 1 if len(m.dirs) > 1 else 0}
        if files:
            weights.update(append=3, overwrite=3, truncate=2, rename=3, link=1,
                           unlink=4 if len(files) >= MAX_FILES else 1)
        kinds = sorted(weights)
        return self.rng.choices(kinds, weights=[weights[k] for k in kinds])[0], files

    def step(self):
        kind, files = self.choose()
        rng, m = self.rng, self.model
        if kind == "create":
            data = rng.randbytes(rng.choices(SIZES, SIZE_WEIGHTS)[0])
            op = {"op": kind, "path": self.new_name("f"), "ino": m.next_ino, "content": [len(data), sha(data)]}
            self.log({"intent": op})
            fd = os.open(self.abs(op["path"]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.write_all(fd, data, 0)
            self.finish(fd)
        elif kind in ("append", "overwrite", "truncate"):
            path = rng.choice(files)
            old = self.read_checked(path)
            if kind == "append":
                extra = rng.randbytes(rng.choice([1, 100, 5_000, 100_000, 700_000]))
                new, offset, piece = old + extra, len(old), extra
            elif kind == "overwrite":
                offset = rng.randrange(len(old) + 1)
                piece = rng.randbytes(rng.choice([1, 100, 5_000, 100_000, 700_000]))
                new = old[:offset] + b"\0" * max(0, offset - len(old)) + piece + old[offset + len(piece):]
            else:
                size = rng.choice([0, len(old) // 2, len(old) + 5_000, rng.randrange(len(old) + 1)])
                new = old[:size] + b"\0" * max(0, size - len(old))
            op = {"op": kind, "path": path, "content": [len(new), sha(new)]}
            self.log({"intent": op})
            fd = os.open(self.abs(path), os.O_WRONLY | (os.O_APPEND if kind == "append" else 0))
            if kind == "truncate":
                os.ftruncate(fd, len(new))
            elif kind == "append":
                for start in range(0, len(piece), CHUNK):
                    os.write(fd, piece[start:start + CHUNK])
            else:
                self.write_all(fd, piece, offset)
            self.finish(fd)
        elif kind == "rename":
            src = rng.choice(files)
            others = [p for p in files if m.files[p] != m.files[src]]
            dst = rng.choice(others) if others and rng.random() < 0.3 else self.new_name("r")
            op = {"op": kind, "src": src, "dst": dst}
            self.log({"intent": op})
            os.rename(self.abs(src), self.abs(dst))
        elif kind == "rename_dir":
            src = rng.choice(sorted(d for d in m.dirs if d))
            parents = [d for d in m.dirs if d != src and not d.startswith(src + "/")]
            parent = rng.choice(sorted(parents))
            while True:
                dst = (f"{parent}/" if parent else "") + f"d{rng.randrange(1 << 20)}"
                if dst not in m.dirs and dst not in m.files:
                    break
            op = {"op": kind, "src": src, "dst": dst}
            self.log({"intent": op})
            os.rename(self.abs(src), self.abs(dst))
        elif kind == "link":
            op = {"op": kind, "src": rng.choice(files), "dst": self.new_name("l")}
            self.log({"intent": op})
            os.link(self.abs(op["src"]), self.abs(op["dst"]))
        elif kind == "unlink":
            op = {"op": kind, "path": rng.choice(files)}
            self.log({"intent": op})
            os.unlink(self.abs(op["path"]))
        elif kind == "mkdir":
            op = {"op": kind, "path": self.new_name("d")}
            self.log({"intent": op})
            os.mkdir(self.abs(op["path"]))
        else:
            rows = list(range(m.next_row, m.next_row + rng.randrange(1, 30)))
            op = {"op": "sqlite", "rows": rows}
            self.log({"intent": op})
            self.sqlite_insert(rows)
        m.apply(op)
        self.log({"ack": True})

    def sqlite_insert(self, rows):
        # A connection per transaction: every one opens the WAL database again (and recovers it
        # after a crash).
        db = sqlite3.connect(os.path.join(self.root, "sqlite", "db.sqlite"), timeout=120)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            with db:
                for row in rows:
                    db.execute("INSERT INTO t VALUES (?, ?)", (row, self.rng.randbytes(self.rng.randrange(10, 5000))))
        finally:
            db.close()


def main(argv):
    root, journal, seed, errors = argv[1], argv[2], int(argv[3]), argv[4]
    writer = Writer(root, journal, seed)
    try:
        while True:
            writer.step()
    except Exception as error:
        kind = "MISMATCH" if isinstance(error, Mismatch) else "ERROR"
        with open(errors, "a") as f:
            f.write(f"{kind} {error!r} {traceback.format_exc().splitlines()[-4:]}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
