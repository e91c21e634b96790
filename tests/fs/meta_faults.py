#!/usr/bin/env python3
"""Metadata faults: real FUSE mounts whose metadata engine fails under them.

- PostgreSQL restarted under load (its own throw-away server from tests/harness/postgres.sh):
  writer threads create, write+fsync, close and rename files while the server is restarted in
  `fast` and in `immediate` shutdown mode, then stopped for longer than the mount's retry
  window (--meta-retry-timeout). Operations succeed after a bounded retry or fail with EIO,
  never hang past the bound; the mount recovers by itself (no remount), and the time until an
  fsync succeeds again is measured.
- Lock timeouts: another session holds a PostgreSQL table lock (`LOCK TABLE`) or a row lock
  (`SELECT ... FOR UPDATE`) on the volume's schema, another process the SQLite write lock
  (`BEGIN EXCLUSIVE`), for longer than --meta-lock-timeout: callers fail with ETIMEDOUT after
  about that long (not before, never much later), unlocked reads keep answering, and once the
  lock is released everything works.
- Disk full (small loop-mounted ext4 file systems, removed afterwards): the SQLite metadata
  file's, then PostgreSQL's data directory, filled up: writers get ENOSPC (SQLite: never EIO;
  PostgreSQL may also crash when its WAL cannot grow: EIO), never a hang; once space is freed
  (and PostgreSQL restarted if it died) the same mount works again, and a descriptor whose
  fsync failed flushes its data. The --cache-dir and --spool-dir on a full disk: the block
  cache is skipped (reads and writes work), and an unmount that cannot spool says the data is
  lost (an error, non-zero exit) rather than claiming it kept it.
Every acknowledged (fsynced and closed) file is compared at the end and fsck must be clean.
Prints a table: fault, cases, operations, data lost, time to recover.

Needs root, the environment of tests/harness/rgw.sh and CELLAR_BIN (default target/release/cellar).
"""

import concurrent.futures
import errno
import os
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
import faultproxy  # noqa: E402
from volume import Volume, VolumeError, is_mounted  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LOCK_SECS = 3
RETRY_SECS = 6
META_TIMEOUTS = ["--meta-lock-timeout", f"{LOCK_SECS}s", "--meta-retry-timeout", f"{RETRY_SECS}s"]
# One operation runs one or two metadata transactions, each bounded by the retry window (an
# outage) or the lock timeout; the rest is slack for a loaded machine.
OP_BOUND = 2 * RETRY_SECS + LOCK_SECS + 10
# A lock wait ends at the lock timeout: not much before (the bound is honoured), not much after.
LOCK_MIN = LOCK_SECS * 0.8
LOCK_MAX = 2 * LOCK_SECS + 6
RECOVER_BOUND = 60
PG_FS_MIB = 256
SMALL_FS_MIB = 32

pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)


class Failure(Exception):
    pass


def bounded(what, seconds, fn, *args):
    """fn(*args) in a thread; a Failure if it takes longer than `seconds` (a hang)."""
    future = pool.submit(fn, *args)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise Failure(f"{what} did not answer within {seconds} s") from None


def errno_of(fn, *args):
    """(None, value) or (errno, None) of fn(*args)."""
    try:
        return None, fn(*args)
    except OSError as e:
        return e.errno, None


def write_file(path, data):
    """Create, write, fsync, close: acknowledged once it returns."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_uncached(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def run(*cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kwargs)


class LoopFs:
    """A small ext4 file system on a loop device (no reserved blocks: root fills it too)."""

    def __init__(self, path, mib):
        self.path = Path(path)
        self.image = self.path.with_name(self.path.name + ".img")
        self.filler = self.path / "filler"
        run("truncate", "-s", f"{mib}M", str(self.image))
        run("mkfs.ext4", "-q", "-F", "-m", "0", str(self.image))
        self.path.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", "loop", str(self.image), str(self.path))
        self.path.chmod(0o755)

    def fill(self):
        """Writes a file until the file system is full (4 KiB steps at the end)."""
        with open(self.filler, "ab", buffering=0) as f:
            for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
                while True:
                    try:
                        f.write(chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
            try:
                os.fsync(f.fileno())
            except OSError:
                pass

    def free(self):
        self.filler.unlink(missing_ok=True)
        os.sync()

    def remove(self):
        if is_mounted(self.path):
            if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        self.image.unlink(missing_ok=True)


class Postgres:
    """This suite's own PostgreSQL (tests/harness/postgres.sh), restarted and stopped at will."""

    def __init__(self, dir):
        self.dir = Path(dir)
        self.data = self.dir / "data"
        run("bash", str(REPO / "tests/harness/postgres.sh"), "start", str(self.dir))
        env = dict(line.split("=", 1) for line in (self.dir / "env").read_text().split())
        self.url = env["CELLAR_TEST_POSTGRES_URL"]
        # postgres://cellar:PASS@127.0.0.1:PORT/postgres
        credentials, address = self.url.removeprefix("postgres://").split("@", 1)
        self.password = credentials.split(":", 1)[1]
        host_port = address.split("/", 1)[0]
        self.port = host_port.rsplit(":", 1)[1]
        # The options it was started with, for a start after a stop.
        argv = shlex.split((self.data / "postmaster.opts").read_text())
        options = [a for i, a in enumerate(argv[1:], 1) if a != "-D" and argv[i - 1] != "-D"]
        self.options = shlex.join(options)

    def ctl(self, *args, check=True):
        binary = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
        return subprocess.run(
            ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
             str(binary), "-D", str(self.data), *args],
            check=check, capture_output=True, text=True, timeout=120,
        )

    def restart(self, mode):
        self.ctl("-m", mode, "-w", "-t", "60", "-l", str(self.dir / "postgres.log"), "restart")

    def stop(self, mode="fast"):
        self.ctl("-m", mode, "-w", "-t", "60", "stop")

    def running(self):
        return self.ctl("status", check=False).returncode == 0

    def start(self):
        self.ctl("-w", "-t", "60", "-l", str(self.dir / "postgres.log"), "-o", self.options, "start")

    def psql(self):
        """A psql session (commands on its stdin, unaligned output on its stdout)."""
        return subprocess.Popen(
            ["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             f"host=127.0.0.1 port={self.port} user=cellar dbname=postgres"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PGPASSWORD": self.password},
        )

    def destroy(self):
        run("bash", str(REPO / "tests/harness/postgres.sh"), "stop", str(self.dir))


class Stats:
    def __init__(self):
        self.rows = {}

    def add(self, fault, ops, recover_secs=None):
        row = self.rows.setdefault(fault, {"cases": 0, "ops": 0, "recover": []})
        row["cases"] += 1
        row["ops"] += ops
        if recover_secs is not None:
            row["recover"].append(recover_secs)

    def print(self, lost):
        print(f"{'fault':<40}{'cases':>6}{'ops':>7}{'lost':>6}{'max recover s':>15}")
        for fault, row in self.rows.items():
            rec = f"{max(row['recover']):.1f}" if row["recover"] else "-"
            print(f"{fault:<40}{row['cases']:>6}{row['ops']:>7}{lost.get(fault, 0):>6}{rec:>15}")


class Load:
    """Writer threads on a directory of the mount: create + write + fsync + close, and renames
    of what they wrote. Records the acknowledged files, counts the errors by errno, and fails
    on any errno outside `allowed` or any operation that outlives OP_BOUND (the watchdog)."""

    def __init__(self, dir, allowed, threads=3, seed=11):
        self.dir = Path(dir)
        self.dir.mkdir(exist_ok=True)
        self.allowed = set(allowed)
        self.threads = threads
        self.seed = seed
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.acked = {}  # name -> data
        self.renamed = {}  # (old, new) of a rename whose outcome is unknown -> data
        self.errors = {}
        self.ops = 0
        self.failures = []
        self.busy = {}  # thread -> (what, since)
        self.workers = []

    def start(self):
        self.workers = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                        for i in range(self.threads)]
        for worker in self.workers:
            worker.start()

    def op(self, i, what, fn, *args):
        self.busy[i] = (what, time.monotonic())
        code, value = errno_of(fn, *args)
        took = time.monotonic() - self.busy.pop(i)[1]
        with self.lock:
            self.ops += 1
            if code is not None:
                self.errors[code] = self.errors.get(code, 0) + 1
                if code not in self.allowed:
                    self.failures.append(f"{what}: {errno.errorcode.get(code, code)}")
            if took > OP_BOUND:
                self.failures.append(f"{what} took {took:.1f} s (bound {OP_BOUND} s)")
        return code, value

    def worker(self, i):
        rng = random.Random(self.seed * 100 + i)
        n = 0
        mine = []
        while not self.stopping.is_set():
            n += 1
            name = f"w{i}-{n}"
            data = rng.randbytes(rng.choice([3000, 40_000, 300_000]))
            code, _ = self.op(i, f"write {name}", write_file, self.dir / name, data)
            if code is None:
                with self.lock:
                    self.acked[name] = data
                mine.append(name)
            if n % 4 == 0 and mine:
                old = mine.pop(rng.randrange(len(mine)))
                new = f"{old}.r"
                with self.lock:
                    data = self.acked.pop(old)
                    self.renamed[(old, new)] = data
                code, _ = self.op(i, f"rename {old}", os.rename, self.dir / old, self.dir / new)
                if code is None:
                    with self.lock:
                        del self.renamed[(old, new)]
                        self.acked[new] = data
            time.sleep(0.02)

    def check_live(self):
        """Fails if an operation runs past the bound (a hang)."""
        now = time.monotonic()
        for what, since in list(self.busy.values()):
            if now - since > OP_BOUND + 5:
                raise Failure(f"{what} hangs ({now - since:.0f} s, bound {OP_BOUND} s)")
        if self.failures:
            raise Failure(f"load: {self.failures[:5]}")

    def run_for(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_live()
            time.sleep(0.2)

    def stop(self):
        self.stopping.set()
        deadline = time.monotonic() + OP_BOUND + 10
        for worker in self.workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()))
            if worker.is_alive():
                raise Failure(f"a writer did not stop within {OP_BOUND + 10} s: {self.busy}")
        self.check_live()

    def errors_text(self):
        return ", ".join(f"{errno.errorcode.get(k, k)} {v}" for k, v in sorted(self.errors.items())) or "none"


class Suite:
    def __init__(self, work):
        self.work = work
        self.stats = Stats()
        self.expected = []  # (volume, fault, path relative to the root, data)
        self.ambiguous = []  # (volume, fault, old, new, data): one of the two names holds it
        self.volumes = []
        self.loops = []
        self.pg = None

    def volume(self, name, engine, extra_args=(), meta_url=None):
        os.environ["CELLAR_TEST_META"] = engine
        volume = Volume(self.work / name, mount_args=[*META_TIMEOUTS, *extra_args])
        if meta_url:
            volume.meta_url = meta_url
        self.volumes.append(volume)
        volume.mount()
        return volume

    def loop(self, name, mib):
        fs = LoopFs(self.work / name, mib)
        self.loops.append(fs)
        return fs

    def keep(self, volume, fault, load):
        root = volume.mount_point
        for name, data in load.acked.items():
            self.expected.append((volume, fault, (load.dir / name).relative_to(root), data))
        for (old, new), data in load.renamed.items():
            self.ambiguous.append((volume, fault, load.dir.relative_to(root), old, new, data))

    def recover(self, fault, root):
        """Seconds until a create + write + fsync + close succeeds again (no remount)."""
        started = time.monotonic()
        probe = root / f"probe-{fault.replace(' ', '-')}-{time.monotonic_ns()}"
        while True:
            code, _ = bounded(f"{fault}: probe", OP_BOUND, errno_of, write_file, probe, b"probe")
            if code is None:
                probe.unlink()
                return time.monotonic() - started
            if time.monotonic() - started > RECOVER_BOUND:
                raise Failure(f"{fault}: the mount did not recover within {RECOVER_BOUND} s ({errno.errorcode.get(code)})")
            time.sleep(0.2)

    # ---- PostgreSQL restarted under load ----------------------------------------------------

    def postgres_restarts(self):
        fs = self.loop("pgfs", PG_FS_MIB)
        self.pg = Postgres(fs.path)
        os.environ["CELLAR_TEST_POSTGRES_URL"] = self.pg.url
        volume = self.volume("pgvol", "postgres")
        root = volume.mount_point
        for mode in ("fast", "immediate"):
            fault = f"PostgreSQL restart ({mode})"
            load = Load(root / f"load-{mode}", allowed={errno.EIO})
            load.start()
            load.run_for(3)
            started = time.monotonic()
            bounded(f"{fault}: pg_ctl restart", 120, self.pg.restart, mode)
            down = time.monotonic() - started
            recover = self.recover(fault, root)
            load.run_for(3)
            load.stop()
            self.keep(volume, fault, load)
            self.stats.add(fault, load.ops + 1, recover)
            print(f"{fault}: down {down:.1f} s, fsync ok again {recover:.1f} s after it was back; "
                  f"{load.ops} ops, errors: {load.errors_text()}")

        fault = f"PostgreSQL stopped {RETRY_SECS + 6} s"
        load = Load(root / "load-stop", allowed={errno.EIO})
        load.start()
        load.run_for(2)
        bounded(f"{fault}: pg_ctl stop", 120, self.pg.stop, "fast")
        before = dict(load.errors)
        load.run_for(RETRY_SECS + 6)
        # Past the retry window the writers must have been told.
        if load.errors.get(errno.EIO, 0) <= before.get(errno.EIO, 0):
            raise Failure(f"{fault}: no operation failed with EIO while the server was down")
        bounded(f"{fault}: pg_ctl start", 120, self.pg.start)
        recover = self.recover(fault, root)
        load.run_for(3)
        load.stop()
        self.keep(volume, fault, load)
        self.stats.add(fault, load.ops + 1, recover)
        print(f"{fault}: EIO while down, fsync ok again {recover:.1f} s after the start; "
              f"{load.ops} ops, errors: {load.errors_text()}")
        return volume

    # ---- Lock timeouts ----------------------------------------------------------------------

    def lock_case(self, fault, volume, hold, release, reads_pass):
        """While `hold` keeps a lock, a create fails with ETIMEDOUT after about the lock
        timeout and (if `reads_pass`: the lock leaves readers alone) listing and stat answer;
        after `release`, all works again."""
        root = volume.mount_point
        existing = root / f"before-{fault.split()[0]}-{time.monotonic_ns()}"
        data = os.urandom(5000)
        write_file(existing, data)
        self.expected.append((volume, fault, existing.relative_to(root), data))
        hold()
        try:
            ops = 0
            for i in range(2):
                started = time.monotonic()
                code, _ = bounded(f"{fault}: create", LOCK_MAX + 10, errno_of, write_file,
                                  root / f"locked-{i}-{time.monotonic_ns()}", b"x")
                took = time.monotonic() - started
                ops += 1
                if code != errno.ETIMEDOUT:
                    raise Failure(f"{fault}: a create under the lock gave {errno.errorcode.get(code, code)}, not ETIMEDOUT")
                if not LOCK_MIN <= took <= LOCK_MAX:
                    raise Failure(f"{fault}: the create failed after {took:.1f} s (lock timeout {LOCK_SECS} s)")
            if reads_pass:
                names = bounded(f"{fault}: readdir", LOCK_MAX, os.listdir, root)
                if existing.name not in names:
                    raise Failure(f"{fault}: readdir under the lock lost {existing.name}")
                if bounded(f"{fault}: stat", LOCK_MAX, os.stat, existing).st_size != len(data):
                    raise Failure(f"{fault}: stat under the lock is wrong")
                ops += 2
        finally:
            release()
        recover = self.recover(fault, root)
        self.stats.add(fault, ops + 1, recover)
        print(f"{fault}: creates failed with ETIMEDOUT after ~{took:.1f} s; ok again {recover:.1f} s after release")

    def postgres_locks(self, volume):
        schema = '"vol_' + volume.name + '"'
        # An ACCESS EXCLUSIVE table lock blocks readers too (they time out as well).
        for fault, statement, reads_pass in [
            ("PostgreSQL LOCK TABLE", f"LOCK TABLE {schema}.inodes, {schema}.dentries IN ACCESS EXCLUSIVE MODE", False),
            ("PostgreSQL row lock", f"SELECT ino FROM {schema}.inodes WHERE ino = 1 FOR UPDATE", True),
        ]:
            session = {}

            def hold():
                psql = self.pg.psql()
                session["psql"] = psql
                psql.stdin.write(f"BEGIN;\n{statement};\nSELECT 'held';\n")
                psql.stdin.flush()
                while (line := psql.stdout.readline()) and line.strip() != "held":
                    pass
                if not line:
                    raise Failure(f"{fault}: psql: {psql.stderr.read()}")

            def release():
                psql = session["psql"]
                psql.stdin.write("COMMIT;\n\\q\n")
                psql.stdin.flush()
                psql.wait(timeout=30)

            self.lock_case(fault, volume, hold, release, reads_pass)

    def sqlite_lock(self):
        volume = self.volume("sqlitevol", "sqlite")
        path = volume.meta_url.removeprefix("sqlite://")
        session = {}

        def hold():
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")
            session["conn"] = conn

        def release():
            session["conn"].execute("COMMIT")
            session["conn"].close()

        # WAL mode: readers go on past another process's write lock.
        self.lock_case("SQLite BEGIN EXCLUSIVE", volume, hold, release, True)

    # ---- Disk full --------------------------------------------------------------------------

    def disk_full(self, fault, volume, fs, allowed, after_free=None):
        """Fills `fs` under a writing mount: writers get an allowed errno (ENOSPC), never a
        hang; a descriptor whose fsync failed keeps its data and flushes it once space is freed."""
        root = volume.mount_point
        load = Load(root / f"full-{fault.split()[0]}", allowed=allowed, threads=1)
        for i in range(3):
            name = f"before-{i}"
            data = os.urandom(30_000)
            write_file(load.dir / name, data)
            load.acked[name] = data
        fs.fill()
        held = None  # (fd, name, data): written, its fsync failed, kept open
        codes = {}
        ops = 0
        for i in range(400):
            name = f"f{i}"
            data = os.urandom(48_000)
            opened = []

            def attempt():
                fd = os.open(load.dir / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
                opened.append(fd)
                os.write(fd, data)
                os.fsync(fd)

            code, _ = bounded(f"{fault}: write {name}", OP_BOUND, errno_of, attempt)
            ops += 1
            if code is None:
                code, _ = bounded(f"{fault}: close {name}", OP_BOUND, errno_of, os.close, opened.pop())
                if code is None:
                    load.acked[name] = data
                    continue
            if code not in allowed:
                raise Failure(f"{fault}: {name}: {errno.errorcode.get(code, code)}, expected one of {sorted(errno.errorcode[a] for a in allowed)}")
            codes[code] = codes.get(code, 0) + 1
            if opened and held is None:
                held = (opened.pop(), name, data)
            for fd in opened:
                errno_of(os.close, fd)
            if sum(codes.values()) >= 4:
                break
        if not codes:
            raise Failure(f"{fault}: 400 writes on a full disk all succeeded")
        fs.free()
        freed = time.monotonic()
        if after_free:
            after_free()
        recover = self.recover(fault, root)
        if held:
            fd, name, data = held
            code, _ = bounded(f"{fault}: fsync after freeing", OP_BOUND, errno_of, os.fsync, fd)
            if code is not None:
                raise Failure(f"{fault}: the fsync that failed on the full disk fails again: {errno.errorcode.get(code)}")
            os.close(fd)
            load.acked[name] = data
            ops += 1
        self.keep(volume, fault, load)
        self.stats.add(fault, ops + 1, time.monotonic() - freed)
        failures = ", ".join(f"{errno.errorcode[k]} {v}" for k, v in codes.items())
        print(f"{fault}: writes failed with {failures}, {len(load.acked)} acknowledged; "
              f"working again {recover:.1f} s after freeing")

    def sqlite_disk_full(self):
        fs = self.loop("sqlitefs", SMALL_FS_MIB)
        os.environ["CELLAR_TEST_META"] = "sqlite"
        volume = self.volume("sqlitefull", "sqlite", meta_url=f"sqlite://{fs.path / 'meta.db'}")
        self.disk_full("SQLite disk full", volume, fs, allowed={errno.ENOSPC})

    def postgres_disk_full(self, volume):
        fs = self.loops[0]

        def restart_if_dead():
            if not self.pg.running():
                print("PostgreSQL died on the full disk; starting it again")
                self.pg.start()

        # A crash of the server when its WAL cannot grow is an outage: EIO.
        self.disk_full("PostgreSQL disk full", volume, fs, allowed={errno.ENOSPC, errno.EIO},
                       after_free=restart_if_dead)

    def cache_and_spool_full(self):
        fault = "cache and spool dirs full"
        fs = self.loop("cachefs", SMALL_FS_MIB)
        proxy, store_url = faultproxy.in_front_of_rgw()
        real_store = os.environ["CELLAR_TEST_S3_URL"]
        os.environ["CELLAR_TEST_S3_URL"] = store_url
        try:
            volume = self.volume("cachevol", "sqlite", [
                "--cache-dir", str(fs.path / "cache"), "--spool-dir", str(fs.path / "spool"),
                "--store-connect-timeout", "1s", "--store-request-timeout", "3s",
                "--store-retry-timeout", "3s", "--store-operation-timeout", "5s",
                "--shutdown-timeout", "5s",
            ])
            root = volume.mount_point
            fs.fill()
            data = os.urandom(3 << 20)
            bounded(f"{fault}: write", OP_BOUND, write_file, root / "kept.bin", data)
            self.expected.append((volume, fault, Path("kept.bin"), data))
            if bounded(f"{fault}: read", OP_BOUND, read_uncached, root / "kept.bin") != data:
                raise Failure(f"{fault}: read back wrong with the cache disk full")
            # Unflushable writes (the store refuses), then an unmount that cannot spool them.
            proxy.set("refuse")
            code, _ = bounded(f"{fault}: close", OP_BOUND, errno_of, write_file,
                              root / "unflushed.bin", os.urandom(200_000))
            if code != errno.EIO:
                raise Failure(f"{fault}: a close against a refusing store gave {errno.errorcode.get(code, code)}")
            result = volume.run_cellar("umount", str(root), check=False, timeout=120)
            if result.returncode == 0 or "lost (could not spool them)" not in result.stderr:
                raise Failure(f"{fault}: umount did not report the writes it could not spool: {result.stderr!r}")
            proxy.set("pass")
            fs.free()
            started = time.monotonic()
            volume.mount()
            recover = time.monotonic() - started
            volume.umount()  # the final check mounts it again, without the proxy
            self.stats.add(fault, 5, recover)
            print(f"{fault}: cache skipped; umount said: {result.stderr.strip()}")
        finally:
            proxy.set("pass")
            os.environ["CELLAR_TEST_S3_URL"] = real_store
            if is_mounted(self.volumes[-1].mount_point):
                self.volumes[-1].cleanup()
            proxy.stop()

    # ---- The end ------------------------------------------------------------------------------

    def final_check(self):
        """Every acknowledged file intact after a fresh mount of its volume; fsck clean."""
        lost = {}
        checked = 0
        for volume in self.volumes:
            if is_mounted(volume.mount_point):
                volume.umount()
            volume.mount()
            root = volume.mount_point
            for v, fault, rel, data in self.expected:
                if v is volume:
                    checked += 1
                    path = root / rel
                    if not path.exists() or read_uncached(path) != data:
                        lost[fault] = lost.get(fault, 0) + 1
                        print(f"LOST: {rel} (written under {fault})")
            for v, fault, rel, old, new, data in self.ambiguous:
                if v is volume:
                    checked += 1
                    held = [p for p in (root / rel / old, root / rel / new) if p.exists()]
                    if len(held) != 1 or read_uncached(held[0]) != data:
                        lost[fault] = lost.get(fault, 0) + 1
                        print(f"LOST: {rel}/{old} renamed to {new} under {fault}: {held}")
            volume.umount()
            code, output = volume.fsck()
            if code != 0:
                raise Failure(f"fsck of {volume.name} is not clean: {output}")
        print(f"final: {checked} acknowledged files checked, fsck clean on {len(self.volumes)} volumes")
        return lost

    def cleanup(self):
        for volume in self.volumes:
            volume.cleanup()
        if self.pg:
            self.pg.destroy()
        for fs in self.loops:
            fs.remove()


def main():
    work = Path(tempfile.mkdtemp(prefix="meta-faults-"))
    work.chmod(0o755)  # PostgreSQL runs as user postgres
    suite = Suite(work)
    started = time.monotonic()
    failed = None
    try:
        pg_volume = suite.postgres_restarts()
        suite.postgres_locks(pg_volume)
        suite.sqlite_lock()
        suite.sqlite_disk_full()
        suite.postgres_disk_full(pg_volume)
        suite.cache_and_spool_full()
        lost = suite.final_check()
        suite.stats.print(lost)
        if lost:
            raise Failure(f"data lost: {lost}")
    except (Failure, VolumeError, OSError, subprocess.SubprocessError) as error:
        failed = error
    finally:
        suite.cleanup()
    if failed:
        print(f"meta_faults: FAILED: {failed} (scratch: {work})", file=sys.stderr)
        os._exit(1)  # a hung operation's thread cannot be joined
    shutil.rmtree(work)
    print(f"meta_faults: ok in {time.monotonic() - started:.0f} s")
    pool.shutdown(wait=False)


if __name__ == "__main__":
    main()
