#!/usr/bin/env python3
"""Two-mount model test: one volume served by two `cellar mount` daemons (same metadata database,
same store), seeded random operations issued from the two mount points in turn, checked against
a local directory that gets every operation too.

Operations come in batches; each batch runs through one mount (A, B, A, ...): writes at offsets
(past the 64 KiB inline threshold and the 4 MiB block boundary too), appends, rewrites
(O_TRUNC), truncates, renames of files and directories, hard links, symlinks, unlinks, mkdirs,
rmdirs and chmods, each one opening and closing its own descriptor. Every operation must succeed
or fail with the same errno as on the local directory. After a batch comes a close-to-open sync
point: everything is closed in the writing mount, then the WHOLE tree as seen from BOTH
mounts (names, types, sizes, modes, link counts, symlink targets, file contents) must equal the
local one — through the mount that did not write within a few seconds, far less than the
kernel's attribute/entry TTL (read from crates/fuse/src/fs.rs): only the change feed, which
pushes every commit to the other mount's kernel caches, makes it look again in time. Lock probes run at sync points: a helper process holds an fcntl (or flock) lock
through one mount; another process must be refused it through the other mount (and through the
same mount), must get a lock on a disjoint range, and must get the lock once the helper let go. After the
probes, a lock hand-off: a write under a lock through one mount, unlocked without fsync or close,
must be what the next holder reads (fstat and read) through the other mount, on a descriptor that
was open and had read the file before.
Descriptors opened (read-only, through either mount) at a sync point are held through the next
batch, which may unlink, rename or rewrite their files: fstat, a read up to the size and close
must still succeed (POSIX: an open file outlives its names, whichever mount removes them).
At the end both mounts unmount cleanly, `cellar fsck` must be clean, and a fresh mount must still
show the model's tree.

  CELLAR_TWO_MOUNT_SEED     seed (random if unset; always printed, rerun with it to reproduce)
  CELLAR_TWO_MOUNT_BATCHES  number of batches (default 60)
  CELLAR_TWO_MOUNT_MINUTES  no new batch starts after this many minutes (default 10)
"""

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from model_ops import (  # noqa: E402
    CHMOD_MODES, MIB, Mismatch, ModelOps, describe, describe_differences, errno_name, seed_from_env,
    snapshot,
)
from volume import REPO, Volume, VolumeError, local_mode  # noqa: E402

MAX_OPS_PER_BATCH = 8
# How soon the mount that did not write must show a batch (pushed invalidation), in seconds.
PUSHED_WITHIN = 5.0
LOCK_REFUSED = (errno.EAGAIN, errno.EACCES)
# describe_differences(seen, model, ...): labels, indent, and a count of what is not shown.
DIFFERENCE_FORMAT = (("mount", "model"), "    ", True)

# Holds a lock through one mount until told to let go (a separate process: POSIX locks of one
# process never conflict with each other).
LOCK_HELPER = r"""
import fcntl, os, sys
path, kind, start, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_RDWR)
try:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
except OSError as error:
    print(f"refused {error.errno}", flush=True)
    sys.exit(1)
print("locked", flush=True)
sys.stdin.readline()
os.close(fd)
print("released", flush=True)
"""


def kernel_ttl():
    """The attribute/entry TTL the FUSE adapter gives the kernel, in seconds."""
    source = (REPO / "crates/fuse/src/fs.rs").read_text()
    match = re.search(r"const TTL: Duration = Duration::from_(secs|millis)\((\d+)\)", source)
    if not match:
        raise VolumeError("cannot find `const TTL: Duration = ...` in crates/fuse/src/fs.rs")
    value = int(match.group(2))
    return value if match.group(1) == "secs" else value / 1000


def probe(root, paths):
    """The model's paths looked up one by one, before any directory listing: a listing
    (READDIRPLUS) refreshes the kernel's entries and attributes, a path lookup trusts them."""
    return {rel: probe_one(os.path.join(root, rel)) for rel in paths}


def probe_one(path):
    # A name another mount removed can still be in the kernel's cache until the invalidation
    # arrives: lstat finds it, and opening it then fails.
    try:
        return describe(path)
    except FileNotFoundError:
        return "still cached, but gone"


class TwoMountModelTest(ModelOps):
    """Fewer names, smaller writes than ModelOps' defaults, to keep a batch and the check of both
    trees after it quick; symlinks are told apart from files (no operation goes through one)."""

    DIR_NAMES = ["d0", "d1", "d2"]
    FILE_NAMES = ["f0", "f1", "f2", "f3", "f4"]
    SYMLINKS_APART = True
    # Past the 64 KiB inline threshold and the 4 MiB block boundary, rarely the 64 MiB chunk one.
    NEAR_OFFSETS = 128 * 1024
    WITHIN_BLOCKS = 0.97
    CHUNK_SPREAD = MIB
    MAX_LENGTH = 3 * MIB
    MAX_APPEND = 100 * 1024
    MAX_REWRITE = 200 * 1024
    MAX_TRUNCATE = 200 * 1024
    SYMLINK_TARGETS = ["f0", "../d1/f2", "nowhere"]

    def __init__(self, seed, batches, minutes, work_dir):
        super().__init__(seed, work_dir / "local")
        self.batches = batches
        self.deadline = time.monotonic() + minutes * 60
        self.a = Volume(work_dir / "a")
        self.b = Volume(work_dir / "b")
        # The second mount serves the SAME volume: same metadata database and volume name.
        self.b.name = self.a.name
        self.b.meta_url = self.a.meta_url
        if local_mode():
            self.b.mount_point = self.a.mount_point
        self.mounts = {"A": self.a, "B": self.b}
        self.ttl = kernel_ttl()
        self.history = []
        self.lock_probes = 0
        self.lock_handoffs = 0
        # Descriptors opened at a sync point and held through the next batch: (mount, path, fd).
        self.held = []
        # The paths of the model at the last sync point.
        self.checked_paths = set()
        self.held_checked = 0

    # ---- operations of this suite only (the others are ModelOps'): each returns (description,
    # function of a root)

    def op_chmod(self):
        entries = [p for p, kind in self.existing() if p and kind != "symlink"]
        path = self.rng.choice(entries) if entries else self.new_path(self.FILE_NAMES)
        mode = self.rng.choice(CHMOD_MODES)
        return f"chmod {path} {mode:o}", lambda root: os.chmod(os.path.join(root, path), mode)

    OPERATIONS = [
        ("op_write", 22), ("op_append", 6), ("op_rewrite", 5), ("op_truncate", 8),
        ("op_rename", 12), ("op_link", 6), ("op_symlink", 3), ("op_unlink", 8), ("op_mkdir", 10),
        ("op_rmdir", 5), ("op_chmod", 5), ("lock", 6),
    ]

    # ---- lock probes (at sync points, when both mounts agree on the tree)

    def lock_probe(self, batch, holder_label):
        files = [p for p, _ in self.existing("file")]
        if not files:
            self.history.append(f"batch {batch}: lock probe skipped (no file)")
            return
        path = self.rng.choice(files)
        kind = self.rng.choice(["lockf", "lockf", "flock"])
        start = self.rng.randrange(0, 4096)
        length = self.rng.randrange(1, 4096)
        other_label = "B" if holder_label == "A" else "A"
        holder_path = os.path.join(self.mounts[holder_label].mount_point, path)
        what = f"{kind} probe on {path} [{start}, {start + length}) held through mount {holder_label}"
        self.history.append(f"batch {batch}: {what}")
        helper = subprocess.Popen(
            [sys.executable, "-c", LOCK_HELPER, holder_path, kind, str(start), str(length)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            line = helper.stdout.readline().strip()
            if line != "locked":
                raise Mismatch(f"{what}: the helper could not take the lock: {line or helper.stderr.read()}")
            for label in ([other_label] if local_mode() else [other_label, holder_label]):
                probe_path = os.path.join(self.mounts[label].mount_point, path)
                self.expect_refused(probe_path, kind, start, length, f"{what}: through mount {label}")
                if kind == "lockf":
                    # A disjoint range is free.
                    self.expect_granted(probe_path, kind, start + length, 100,
                                        f"{what}: disjoint range through mount {label}")
            helper.stdin.write("release\n")
            helper.stdin.flush()
            if helper.stdout.readline().strip() != "released":
                raise Mismatch(f"{what}: the helper did not release: {helper.stderr.read()}")
            helper.wait(timeout=60)
            self.expect_granted(os.path.join(self.mounts[other_label].mount_point, path), kind,
                                start, length, f"{what}: through mount {other_label} after release")
            self.lock_probes += 1
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()

    def lock_handoff(self, batch, writer_label):
        """A lock hands over what was written under it: a write through one mount, unlocked
        without fsync or close, is what the next holder reads through the other mount, whose
        descriptor was open (and its pages and size cached) before the write. An unlock
        commits; a grant drops the kernel's stale attributes and pages."""
        files = [p for p, _ in self.existing("file")]
        if not files:
            return
        path = self.rng.choice(files)
        kind = self.rng.choice(["lockf", "flock"])
        data = self.rng.randbytes(self.rng.randrange(1, 8192))
        reader_label = "B" if writer_label == "A" else "A"
        what = (f"{kind} hand-off of {path} ({len(data)} bytes at 0) from mount {writer_label} "
                f"to mount {reader_label}")
        self.history.append(f"batch {batch}: {what}")
        # No truncate: it would commit the write by itself.
        with open(os.path.join(self.local_root, path), "r+b") as model:
            model.write(data)
            model.seek(0)
            expected = model.read()

        def lock(fd, op):
            if kind == "flock":
                fcntl.flock(fd, op)
            else:
                fcntl.lockf(fd, op)

        reader = os.open(os.path.join(self.mounts[reader_label].mount_point, path), os.O_RDWR)
        try:
            os.pread(reader, 1 << 16, 0)
            writer = os.open(os.path.join(self.mounts[writer_label].mount_point, path), os.O_RDWR)
            try:
                lock(writer, fcntl.LOCK_EX)
                os.pwrite(writer, data, 0)
                lock(writer, fcntl.LOCK_UN)
                lock(reader, fcntl.LOCK_EX)
                size = os.fstat(reader).st_size
                got = os.pread(reader, len(expected) + 4096, 0)
                lock(reader, fcntl.LOCK_UN)
            finally:
                os.close(writer)
        finally:
            os.close(reader)
        if size != len(expected) or got != expected:
            raise Mismatch(f"{what}: the reader's fstat says {size} bytes and it read "
                           f"{len(got)} bytes{'' if got == expected[:len(got)] else ' that differ'}, "
                           f"expected {len(expected)}")
        self.lock_handoffs += 1

    def try_lock(self, path, kind, start, length):
        fd = os.open(path, os.O_RDWR)
        try:
            if kind == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
            return None
        except OSError as error:
            return error.errno
        finally:
            os.close(fd)

    def expect_refused(self, path, kind, start, length, what):
        code = self.try_lock(path, kind, start, length)
        if code not in LOCK_REFUSED:
            raise Mismatch(f"{what}: expected EAGAIN, got {errno_name(code)}")

    def expect_granted(self, path, kind, start, length, what):
        code = self.try_lock(path, kind, start, length)
        if code is not None:
            raise Mismatch(f"{what}: expected the lock, got {errno_name(code)}")

    # ---- descriptors held across a batch

    def hold_some(self, batch):
        """Opens a file or two (read-only, through either mount) to keep through the next batch,
        which may unlink, rename, truncate or rewrite them through either mount."""
        files = [p for p, _ in self.existing("file")]
        if not files or self.rng.random() < 0.5:
            return
        for path in self.rng.sample(files, min(len(files), self.rng.randrange(1, 3))):
            label = self.rng.choice(["A", "B"])
            fd = os.open(os.path.join(self.mounts[label].mount_point, path), os.O_RDONLY)
            self.held.append((label, path, fd))
            self.history.append(f"batch {batch}: hold {path} open through mount {label}")

    def check_held(self, batch):
        """POSIX: an open descriptor keeps working whatever happens to the file's names, in this
        mount or another: fstat, reading up to its size and close must all succeed."""
        held, self.held = self.held, []
        for label, path, fd in held:
            step = "fstat"
            try:
                size = os.fstat(fd).st_size
                step = f"read of {size} bytes"
                read = 0
                while read < size:
                    piece = os.pread(fd, min(MIB, size - read), read)
                    if not piece:
                        break
                    read += len(piece)
                step = "close"
                fd, to_close = -1, fd
                os.close(to_close)
            except OSError as error:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                raise Mismatch(f"after batch {batch}: a descriptor of {path} held open through "
                               f"mount {label} since the previous sync point failed: {step}: "
                               f"{errno_name(error.errno)} ({error.strerror})") from None
            self.held_checked += 1

    # ---- running

    def check(self, when, labels, within=0.0):
        """The tree through each mount must equal the model; the paths looked up through the
        first of `labels` may take up to `within` seconds to get there."""
        model = snapshot(self.local_root)
        # The names gone since the last sync point are looked up too, and must be missing: a
        # readdir comes from the engine, but a lookup trusts the kernel's entry for the name.
        expected = {**{rel: None for rel in self.checked_paths}, **model}
        self.checked_paths = set(model)
        deadline = time.monotonic() + within
        for label in labels[:1] if local_mode() else labels:
            looked_up = probe(self.mounts[label].mount_point, expected)
            while looked_up != expected and time.monotonic() < deadline:
                time.sleep(0.02)
                looked_up = probe(self.mounts[label].mount_point, expected)
            deadline = 0
            if looked_up != expected:
                raise Mismatch(f"{when}: paths looked up through mount {label} differ from the "
                               f"model:\n" + describe_differences(looked_up, expected, *DIFFERENCE_FORMAT))
            seen = snapshot(self.mounts[label].mount_point)
            if seen != model:
                raise Mismatch(f"{when}: the tree seen through mount {label} differs from the "
                               f"model:\n" + describe_differences(seen, model, *DIFFERENCE_FORMAT))

    def run(self):
        self.a.mount()
        if not local_mode():
            self.b.mount()
        done = 0
        operations = 0
        try:
            for batch in range(1, self.batches + 1):
                if time.monotonic() > self.deadline:
                    print(f"two_mount_model_test: time limit reached after {done} batches", flush=True)
                    break
                label = "A" if batch % 2 else "B"
                root = self.mounts[label].mount_point
                probes = 0
                for _ in range(self.rng.randrange(1, MAX_OPS_PER_BATCH + 1)):
                    name = self.next_operation()
                    if name == "lock":
                        probes += 1
                        continue
                    what, apply = getattr(self, name)()
                    local_result, mount_result = self.apply_both(apply, root)
                    self.history.append(f"batch {batch} (mount {label}): {what} => "
                                        f"{errno_name(local_result)}")
                    operations += 1
                    if local_result != mount_result:
                        raise Mismatch(f"batch {batch}, through mount {label}: {what}: mount "
                                       f"{errno_name(mount_result)}, model {errno_name(local_result)}")
                # Sync point: every descriptor of the batch is closed. The mount that did not
                # write first: only pushed invalidation makes it look again before the TTL.
                other = "B" if label == "A" else "A"
                if self.ttl <= PUSHED_WITHIN:
                    raise VolumeError(f"the kernel TTL ({self.ttl} s) must exceed {PUSHED_WITHIN} s "
                                      "for this test to tell pushed invalidation from expiry")
                self.check(f"after batch {batch} (written through mount {label})", [other, label],
                           within=PUSHED_WITHIN)
                for _ in range(probes):
                    self.lock_probe(batch, self.rng.choice(["A", "B"]))
                self.check_held(batch)
                if probes:
                    self.lock_handoff(batch, self.rng.choice(["A", "B"]))
                self.hold_some(batch)
                done += 1
            # Descriptors held since the last sync point are checked (and closed) before the
            # mounts go away.
            self.check_held(done)
            self.a.umount()
            if not local_mode():
                self.b.umount()
            code, output = self.a.fsck()
            if code != 0:
                raise Mismatch(f"cellar fsck exited {code} after the run:\n{output}")
            self.a.mount()
            self.check("after unmounting both and mounting A again", ["A"])
        except BaseException:
            for _, _, fd in self.held:
                try:
                    os.close(fd)
                except OSError:
                    pass
            print("last operations:\n  " + "\n  ".join(self.history[-20:]), file=sys.stderr)
            self.a.cleanup()
            self.b.cleanup()
            raise
        self.a.destroy()
        return done, operations


def main():
    seed = seed_from_env("CELLAR_TWO_MOUNT_SEED")
    batches = int(os.environ.get("CELLAR_TWO_MOUNT_BATCHES", "60"))
    minutes = float(os.environ.get("CELLAR_TWO_MOUNT_MINUTES", "10"))
    print(f"two_mount_model_test: seed={seed} batches={batches} "
          f"(rerun with CELLAR_TWO_MOUNT_SEED={seed})", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-two-mount-"))
    started = time.monotonic()
    test = TwoMountModelTest(seed, batches, minutes, work_dir)
    try:
        done, operations = test.run()
    except (Mismatch, VolumeError, subprocess.SubprocessError) as error:
        print(f"two_mount_model_test: FAILED (seed={seed}): {error}", file=sys.stderr)
        print(f"two_mount_model_test: work directory kept: {work_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(work_dir)
    print(f"two_mount_model_test: ok: {done} batches, {operations} operations, "
          f"{test.lock_probes} lock probes, {test.lock_handoffs} lock hand-offs, "
          f"{test.held_checked} descriptors held across a batch, both mounts identical to the model at every sync "
          f"point ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
