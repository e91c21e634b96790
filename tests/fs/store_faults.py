#!/usr/bin/env python3
"""Store faults: a real FUSE mount whose object store sits behind tests/harness/faultproxy.py.

For each fault of the proxy (blackhole, refuse, reset, stop, HTTP 500, 503 SlowDown, truncated
and corrupted GET bodies, a slow store, a flaky one) the suite checks, on a live mount:
- a write's fsync fails with EIO within BOUND_SECS (the mount's store timeouts are shortened
  for speed: an operation is bounded at 9 s), never hangs; reads of data that is not cached
  fail with EIO or return the right bytes, never others;
- while a writer waits on the dead store, metadata and cached data still answer (no livelock);
- once the fault is gone the same descriptor's fsync succeeds (the mount recovers by itself,
  without a remount) and the file reads back intact;
- `cellar umount` and SIGTERM of the daemon during an outage end within a bound, report what
  they could not flush and keep it in the spool, and the next mount applies it.
One case runs with the default timeouts: a blackholed store fails fsync within 60 s.
At the end every file whose data was acknowledged (or spooled and replayed) is compared with
what was written, and `cellar fsck` must be clean. Prints a table: fault, cases, operations,
data lost, time to EIO, time to recover.

Needs the environment of tests/harness/rgw.sh (CELLAR_TEST_S3_URL, CELLAR_TEST_S3_ENDPOINT, keys)
and CELLAR_BIN (default target/release/cellar).
"""

import concurrent.futures
import errno
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
import faultproxy  # noqa: E402
from volume import Volume, VolumeError, is_mounted  # noqa: E402

# Short enough for a quick suite, long enough for a 20 MiB object through the Python proxy on a
# busy machine.
SHORT_TIMEOUTS = [
    "--store-connect-timeout", "1s",
    "--store-request-timeout", "3s",
    "--store-retry-timeout", "6s",
    "--store-operation-timeout", "9s",
    "--shutdown-timeout", "8s",
]
# One store operation (an fsync that waited for a background flush already trying gets that
# flush's outcome: it does not try again itself), plus slack for a loaded machine.
OPERATION_SECS = 9
BOUND_SECS = OPERATION_SECS + 6
# The background flusher takes a file left this long without writes (vfs IDLE_FLUSH_AFTER),
# checking every half second.
IDLE_FLUSH_SECS = 5
# One upload to a blackholed store: its tries end with the retry timeout.
BLACKHOLED_UPLOAD_SECS = 6
# An unmount: the shutdown timeout, one operation under way, closing the session.
UMOUNT_BOUND_SECS = 8 + 9 + 6
DEFAULT_FSYNC_BOUND_SECS = 60
# Any single operation that must not wait for the store.
LIVE_SECS = 5
FILE_BYTES = (3 << 20) // 2
# Written before each write fault: one block, and several blocks of which the first 16 MiB start
# uploading in the background while the application still writes.
WRITE_SIZES = [FILE_BYTES, 20 << 20]

WRITE_FAULTS = [
    ("blackhole", {}),
    ("refuse", {}),
    ("reset", {}),
    ("stop", {}),
    ("error 500", {"mode": "error", "status": 500, "code": "InternalError"}),
    ("error 503 SlowDown", {"mode": "error", "status": 503, "code": "SlowDown"}),
]
READ_FAULTS = [
    ("truncate", {"keep": 0.5}),
    ("corrupt", {"flips": 3}),
]

pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)


class Failure(Exception):
    pass


def bounded(what, seconds, fn, *args):
    """fn(*args) in a thread; a Failure if it takes longer than `seconds` (a hang)."""
    future = pool.submit(fn, *args)
    try:
        return future.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise Failure(f"{what} did not answer within {seconds} s") from None


def eio_or_bytes(fn, *args):
    """('eio', None) or ('ok', value) of fn(*args); other errors propagate."""
    try:
        return "ok", fn(*args)
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return "eio", None


def read_uncached(path):
    """Reads a file around the kernel's page cache of it (FUSE honours DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class Stats:
    def __init__(self):
        self.rows = {}

    def add(self, fault, ops, eio_secs=None, recover_secs=None):
        row = self.rows.setdefault(fault, {"cases": 0, "ops": 0, "eio": [], "recover": []})
        row["cases"] += 1
        row["ops"] += ops
        if eio_secs is not None:
            row["eio"].append(eio_secs)
        if recover_secs is not None:
            row["recover"].append(recover_secs)

    def print(self, lost):
        print(f"{'fault':<28}{'cases':>6}{'ops':>6}{'lost':>6}{'max EIO s':>13}{'max recover s':>15}")
        for fault, row in self.rows.items():
            eio = f"{max(row['eio']):.1f}" if row["eio"] else "-"
            rec = f"{max(row['recover']):.1f}" if row["recover"] else "-"
            print(f"{fault:<28}{row['cases']:>6}{row['ops']:>6}{lost.get(fault, 0):>6}{eio:>13}{rec:>15}")


class Suite:
    def __init__(self, work, proxy):
        self.proxy = proxy
        self.spool = work / "spool"
        self.volume = Volume(
            work / "vol", mount_args=[*SHORT_TIMEOUTS, "--spool-dir", str(self.spool)]
        )
        self.rng = random.Random(int(os.environ.get("CELLAR_FAULTS_SEED", "11")))
        # name -> (fault, bytes) of every file whose data must survive.
        self.expected = {}
        self.stats = Stats()

    @property
    def root(self):
        return self.volume.mount_point

    def data(self, size=FILE_BYTES):
        return self.rng.randbytes(size)

    def write_durably(self, name, fault):
        data = self.data()
        with open(self.root / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        self.expected[name] = (fault, data)

    def setup(self):
        self.volume.mount()
        self.write_durably("reference.bin", "setup")
        self.write_durably("cached.bin", "setup")
        (self.root / "dir").mkdir()

    def remount(self):
        self.proxy.set("pass")
        self.volume.remount()
        # Into the daemon's page cache (the kernel's is bypassed by each check).
        if read_uncached(self.root / "cached.bin") != self.expected["cached.bin"][1]:
            raise Failure("cached.bin read back wrong before any fault")

    def still_live(self, fault):
        """Metadata and cached data answer while the store is faulty. Returns the op count."""
        bounded(f"{fault}: stat", LIVE_SECS, os.stat, self.root / "reference.bin")
        names = bounded(f"{fault}: readdir", LIVE_SECS, os.listdir, self.root)
        if "reference.bin" not in names:
            raise Failure(f"{fault}: readdir lost reference.bin: {names}")
        sub = self.root / "dir" / f"sub-{fault.replace(' ', '-')}-{time.monotonic_ns()}"
        bounded(f"{fault}: mkdir", LIVE_SECS, os.mkdir, sub)
        bounded(f"{fault}: rmdir", LIVE_SECS, os.rmdir, sub)
        got = bounded(f"{fault}: cached read", LIVE_SECS, read_uncached, self.root / "cached.bin")
        if got != self.expected["cached.bin"][1]:
            raise Failure(f"{fault}: a cached read returned other bytes")
        return 5

    def uncached_read(self, fault):
        """A read that must reach the store: EIO (within the bound) or the right bytes."""
        outcome, got = bounded(
            f"{fault}: uncached read", BOUND_SECS, eio_or_bytes, read_uncached_fresh, self
        )
        if outcome == "ok" and got != self.expected["reference.bin"][1]:
            raise Failure(f"{fault}: a read returned corrupt bytes")
        return outcome

    def write_fault(self, fault, params, size):
        """fsync fails with EIO within the bound; the mount stays live; recovery by itself."""
        self.remount()
        name = f"w-{fault.replace(' ', '-')}-{size}.bin"
        data = self.data(size)
        fd = os.open(self.root / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        self.proxy.set(params.get("mode", fault), **{k: v for k, v in params.items() if k != "mode"})
        started = time.monotonic()
        fsync = pool.submit(eio_or_bytes, os.fsync, fd)
        ops = 2 + self.still_live(fault)  # while the fsync waits on the store
        try:
            outcome, _ = fsync.result(timeout=BOUND_SECS)
        except concurrent.futures.TimeoutError:
            raise Failure(f"{fault}: fsync did not fail within {BOUND_SECS} s") from None
        eio_secs = time.monotonic() - started
        if outcome != "eio":
            raise Failure(f"{fault}: fsync succeeded against a dead store")
        self.uncached_read(fault)
        ops += 1
        self.proxy.set("pass")
        recover_secs = self.recover(fault, fd)
        os.close(fd)
        self.expected[name] = (fault, data)
        if read_uncached(self.root / name) != data:
            raise Failure(f"{fault}: the recovered file reads back wrong")
        self.stats.add(fault, ops + 3, eio_secs, recover_secs)
        print(f"{fault}, {size} bytes: fsync EIO after {eio_secs:.1f} s, recovered in {recover_secs:.1f} s")

    def recover(self, fault, fd):
        """Seconds until an fsync of the same descriptor succeeds again (no remount)."""
        started = time.monotonic()
        while True:
            outcome, _ = bounded(f"{fault}: fsync after recovery", BOUND_SECS, eio_or_bytes, os.fsync, fd)
            if outcome == "ok":
                return time.monotonic() - started
            if time.monotonic() - started > 2 * BOUND_SECS:
                raise Failure(f"{fault}: the mount did not recover within {2 * BOUND_SECS} s")
            time.sleep(0.2)

    def read_fault(self, fault, params):
        """Short or corrupt answers are an EIO, never data; partial faults are retried away."""
        ops = 0
        self.remount()
        self.proxy.set(fault, **params)
        started = time.monotonic()
        if self.uncached_read(fault) != "eio":
            raise Failure(f"{fault}: every answer is damaged, yet the read succeeded")
        eio_secs = time.monotonic() - started
        ops += 1 + self.still_live(fault)
        # Half the answers damaged: reads retry them (and are right), or fail; never wrong.
        self.proxy.set(fault, p=0.5, **params)
        outcomes = [self.uncached_read_after_remount(fault) for _ in range(3)]
        ops += len(outcomes)
        self.proxy.set("pass")
        started = time.monotonic()
        if self.uncached_read(fault) != "ok":
            raise Failure(f"{fault}: reads still fail once the store is healthy")
        recover_secs = time.monotonic() - started
        self.stats.add(fault, ops + 1, eio_secs, recover_secs)
        print(f"{fault}: read EIO after {eio_secs:.1f} s; with half damaged: {outcomes}")

    def uncached_read_after_remount(self, fault):
        mode = self.proxy.stats()["mode"]
        self.proxy.set("pass")
        self.volume.remount()
        self.proxy.set(mode, p=0.5)
        return self.uncached_read(fault)

    def slow_and_flaky(self):
        for fault, mode, params in [
            ("delay 300 ms", "delay", {"ms": 300}),
            ("flaky 30% 503", "error", {"status": 503, "code": "SlowDown", "p": 0.3}),
            ("flaky 30% reset", "reset", {"p": 0.3}),
        ]:
            self.remount()
            self.proxy.set(mode, **params)
            started = time.monotonic()
            for i in range(3):
                bounded(f"{fault}: write+fsync", 60, self.write_durably, f"s-{mode}-{i}.bin", fault)
            got = bounded(f"{fault}: read", 60, read_uncached, self.root / "reference.bin")
            if got != self.expected["reference.bin"][1]:
                raise Failure(f"{fault}: a read returned other bytes")
            self.proxy.set("pass")
            self.stats.add(fault, 7)
            print(f"{fault}: 3 fsynced writes and a read in {time.monotonic() - started:.1f} s")

    def close_during_background_retry(self):
        """A close that waits for the background flusher, which is already trying a dead store
        with the file's data, fails with that flush's EIO: within one store operation, not two
        (it used to try again itself once the flusher gave up). The data stays buffered and the
        flusher commits it once the store is back."""
        fault = "close during background flush"
        self.remount()
        name = "background-flush.bin"
        data = self.data()
        fd = os.open(self.root / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, data)
        self.proxy.set("blackhole")
        # Just after the flusher took the idle file: its upload has about 5.5 s to go.
        time.sleep(IDLE_FLUSH_SECS + 0.8)
        started = time.monotonic()
        outcome, _ = bounded(f"{fault}: close", 2 * BOUND_SECS, eio_or_bytes, os.close, fd)
        eio_secs = time.monotonic() - started
        if outcome != "eio":
            raise Failure(f"{fault}: close succeeded against a dead store")
        # What was left of the flusher's upload (about 5.5 s; 5.8 s measured on a quiet
        # machine), never a second upload on top (at least 5.2 + 6 s): 4 s of slack for a
        # loaded one still tells the two apart.
        if eio_secs > BLACKHOLED_UPLOAD_SECS + 4:
            raise Failure(f"{fault}: close failed after {eio_secs:.1f} s: it waited out the "
                          f"flusher's try and then tried again itself")
        self.proxy.set("pass")
        started = time.monotonic()
        while read_uncached(self.root / name) != data:
            if time.monotonic() - started > 2 * BOUND_SECS:
                raise Failure(f"{fault}: the flusher did not commit the buffered data once the store was back")
            time.sleep(0.5)
        recover_secs = time.monotonic() - started
        self.expected[name] = (fault, data)
        self.stats.add(fault, 3, eio_secs, recover_secs)
        print(f"{fault}: close EIO after {eio_secs:.1f} s, committed by the flusher {recover_secs:.1f} s after the store came back")

    def dirty_at_outage(self, fault, mode):
        """Writes whose close failed against a dead store, still buffered. Returns their names."""
        self.remount()
        self.proxy.set(mode)
        names = []
        for i in range(2):
            name = f"spooled-{fault.split()[0]}-{i}.bin"
            data = self.data()

            def write():
                with open(self.root / name, "wb") as f:
                    f.write(data)

            outcome, _ = bounded(f"{fault}: close", BOUND_SECS, eio_or_bytes, write)
            if outcome != "eio":
                raise Failure(f"{fault}: close succeeded against a dead store")
            self.expected[name] = (fault, data)
            names.append(name)
        return names

    def umount_during_outage(self):
        fault = "umount during blackhole"
        names = self.dirty_at_outage(fault, "blackhole")
        started = time.monotonic()
        result = self.volume.run_cellar(
            "umount", str(self.root), check=False, timeout=UMOUNT_BOUND_SECS + 30
        )
        took = time.monotonic() - started
        if took > UMOUNT_BOUND_SECS:
            raise Failure(f"{fault}: umount took {took:.1f} s (bound {UMOUNT_BOUND_SECS} s)")
        if result.returncode == 0 or result.stderr.count("kept in") != len(names):
            raise Failure(f"{fault}: umount did not report the unflushed files: {result.stderr}")
        if is_mounted(self.root):
            raise Failure(f"{fault}: still mounted after umount")
        self.check_spooled_and_replay(fault, names, took, 3)

    def sigterm_during_outage(self):
        fault = "SIGTERM during stop"
        names = self.dirty_at_outage(fault, "stop")
        pid = self.volume.daemon_pid()
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while Path(f"/proc/{pid}").exists() and time.monotonic() - started < UMOUNT_BOUND_SECS + 30:
            time.sleep(0.1)
        took = time.monotonic() - started
        if took > UMOUNT_BOUND_SECS:
            raise Failure(f"{fault}: the daemon took {took:.1f} s to exit on SIGTERM")
        log = self.volume.log_file.read_text()
        if log.count("bytes not flushed, kept in") < len(names):
            raise Failure(f"{fault}: the log does not list the unflushed files")
        self.check_spooled_and_replay(fault, names, took, 3)

    def check_spooled_and_replay(self, fault, names, took, ops):
        spooled = list(self.spool.glob("*/*.spool"))
        if len(spooled) != len(names):
            raise Failure(f"{fault}: {len(spooled)} spool files for {len(names)} unflushed files")
        self.proxy.set("pass")
        started = time.monotonic()
        self.volume.mount()
        for name in names:
            if read_uncached(self.root / name) != self.expected[name][1]:
                raise Failure(f"{fault}: {name} was not replayed from the spool intact")
        recover_secs = time.monotonic() - started
        if list(self.spool.glob("*/*")):
            raise Failure(f"{fault}: spool files left after the replay")
        self.stats.add(fault, ops + len(names) * 3, took, recover_secs)
        print(f"{fault}: ended in {took:.1f} s, {len(names)} files spooled and replayed")

    def default_timeouts(self, work):
        """With the default timeouts, a silent store fails fsync within 60 s."""
        fault = "blackhole, default timeouts"
        volume = Volume(work / "defaults", mount_args=["--spool-dir", str(self.spool)])
        root = volume.mount()
        try:
            data = self.data()
            fd = os.open(root / "f.bin", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, data)
            self.proxy.set("blackhole")
            started = time.monotonic()
            outcome, _ = bounded(fault, DEFAULT_FSYNC_BOUND_SECS, eio_or_bytes, os.fsync, fd)
            eio_secs = time.monotonic() - started
            if outcome != "eio":
                raise Failure(f"{fault}: fsync succeeded")
            self.proxy.set("pass")
            recover_secs = self.recover(fault, fd)
            os.close(fd)
            if read_uncached(root / "f.bin") != data:
                raise Failure(f"{fault}: the file reads back wrong")
            volume.umount()
            code, output = volume.fsck()
            if code != 0:
                raise Failure(f"{fault}: fsck: {output}")
            self.stats.add(fault, 4, eio_secs, recover_secs)
            print(f"{fault}: fsync EIO after {eio_secs:.1f} s")
        finally:
            self.proxy.set("pass")
            volume.cleanup()

    def final_check(self):
        """Every acknowledged file intact after a fresh mount; fsck clean. Returns losses."""
        self.proxy.set("pass")
        self.volume.remount()
        lost = {}
        for name, (fault, data) in self.expected.items():
            if read_uncached(self.root / name) != data:
                lost[fault] = lost.get(fault, 0) + 1
                print(f"LOST: {name} (written under {fault})")
        self.volume.umount()
        code, output = self.volume.fsck()
        if code != 0:
            raise Failure(f"fsck is not clean: {output}")
        print(f"final: {len(self.expected)} files intact checked; {output}")
        return lost


def read_uncached_fresh(suite):
    return read_uncached(suite.root / "reference.bin")


def main():
    work = Path(tempfile.mkdtemp(prefix="store-faults-"))
    proxy, store_url = faultproxy.in_front_of_rgw()
    os.environ["CELLAR_TEST_S3_URL"] = store_url
    suite = Suite(work, proxy)
    started = time.monotonic()
    try:
        suite.setup()
        for size in WRITE_SIZES:
            for fault, params in WRITE_FAULTS:
                suite.write_fault(fault, params, size)
        suite.close_during_background_retry()
        for fault, params in READ_FAULTS:
            suite.read_fault(fault, params)
        suite.slow_and_flaky()
        suite.umount_during_outage()
        suite.sigterm_during_outage()
        suite.default_timeouts(work)
        lost = suite.final_check()
        suite.stats.print(lost)
        if lost:
            raise Failure(f"data lost: {lost}")
    except (Failure, VolumeError, OSError) as error:
        print(f"store_faults: FAILED: {error} (scratch: {work})", file=sys.stderr)
        proxy.set("pass")
        suite.volume.cleanup()
        proxy.stop()
        # A hung operation's thread cannot be joined.
        os._exit(1)
    proxy.stop()
    shutil.rmtree(work)
    print(f"store_faults: ok in {time.monotonic() - started:.0f} s")
    pool.shutdown(wait=False)


if __name__ == "__main__":
    main()
