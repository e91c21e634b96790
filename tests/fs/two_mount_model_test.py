#!/usr/bin/env python3
"""Two-mount model test: one volume served by two `cellar mount` daemons (same metadata database,
same store), seeded random operations issued from the two mount points in turn, checked against
a local directory that gets every operation too.

Operations come in batches; each batch runs through one mount (A, B, A, ...): writes at offsets
(past the 64 KiB inline threshold and the 4 MiB block boundary too), appends, rewrites
(O_TRUNC), truncates, renames of files and directories, hard links, symlinks, unlinks, mkdirs,
rmdirs and chmods, each one opening and closing its own descriptor. Every operation must succeed
or fail with the same errno as on the local directory. After a batch comes a close-to-open sync
point: everything is closed in the writing mount, the test waits past the kernel's
attribute/entry TTL (read from crates/fuse/src/fs.rs: the other mount gets no pushed
invalidation yet, the TTL is what makes it look again), then the WHOLE tree as seen from BOTH
mounts (names, types, sizes, modes, link counts, symlink targets, file contents) must equal the
local one. Lock probes run at sync points: a helper process holds an fcntl (or flock) lock
through one mount; another process must be refused it through the other mount (and through the
same mount), must get a lock on a disjoint range, and must get the lock once the helper let go.
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
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from volume import REPO, Volume, VolumeError, local_mode  # noqa: E402

MIB = 1 << 20
BLOCK = 4 * MIB
CHUNK = 64 * MIB
DIR_NAMES = ["d0", "d1", "d2"]
FILE_NAMES = ["f0", "f1", "f2", "f3", "f4"]
MAX_DEPTH = 3
MAX_OPS_PER_BATCH = 8
# Beyond the kernel's TTL: the expiry is checked against jiffies, so allow some slack.
TTL_MARGIN = 0.5
EQUIVALENT_ERRNOS = {errno.ENOTEMPTY: errno.EEXIST}
LOCK_REFUSED = (errno.EAGAIN, errno.EACCES)

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


class Mismatch(AssertionError):
    pass


def kernel_ttl():
    """The attribute/entry TTL the FUSE adapter gives the kernel, in seconds."""
    source = (REPO / "crates/fuse/src/fs.rs").read_text()
    match = re.search(r"const TTL: Duration = Duration::from_(secs|millis)\((\d+)\)", source)
    if not match:
        raise VolumeError("cannot find `const TTL: Duration = ...` in crates/fuse/src/fs.rs")
    value = int(match.group(2))
    return value if match.group(1) == "secs" else value / 1000


def file_hash(path):
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def describe(path):
    """What the comparison looks at for one path (None if it does not exist)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    mode = st.st_mode & 0o7777
    if os.path.islink(path):
        return ("symlink", os.readlink(path), st.st_nlink)
    if os.path.isdir(path):
        return ("dir", oct(mode), st.st_nlink)
    return ("file", oct(mode), st.st_nlink, st.st_size, file_hash(path))


def snapshot(root):
    """Everything the comparison looks at, keyed by path relative to root."""
    tree = {}
    for dir_path, dir_names, file_names in os.walk(root):
        dir_names.sort()
        for name in sorted(dir_names + file_names):
            path = os.path.join(dir_path, name)
            tree[os.path.relpath(path, root)] = describe(path)
    return tree


def probe(root, paths):
    """The model's paths looked up one by one, before any directory listing: a listing
    (READDIRPLUS) refreshes the kernel's entries and attributes, a path lookup trusts them."""
    return {rel: describe(os.path.join(root, rel)) for rel in paths}


def describe_differences(seen, model):
    lines = []
    for rel in sorted(set(seen) | set(model)):
        if seen.get(rel) != model.get(rel):
            lines.append(f"    {rel}: mount={seen.get(rel)} model={model.get(rel)}")
    more = f"\n    ... {len(lines) - 30} more" if len(lines) > 30 else ""
    return "\n".join(lines[:30]) + more


def errno_name(code):
    return "ok" if code is None else errno.errorcode.get(code, str(code))


class TwoMountModelTest:
    def __init__(self, seed, batches, minutes, work_dir):
        self.rng = random.Random(seed)
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
        self.local_root = work_dir / "local"
        self.local_root.mkdir()
        self.ttl = kernel_ttl()
        self.history = []
        self.lock_probes = 0
        # Descriptors opened at a sync point and held through the next batch: (mount, path, fd).
        self.held = []
        self.held_checked = 0

    # ---- choosing paths from the local (reference) tree

    def existing(self, kind=None):
        entries = [("", "dir")]
        for dir_path, dir_names, file_names in os.walk(self.local_root):
            rel_dir = os.path.relpath(dir_path, self.local_root)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in sorted(dir_names):
                entries.append((os.path.join(rel_dir, name), "dir"))
            for name in sorted(file_names):
                path = os.path.join(rel_dir, name)
                link = os.path.islink(os.path.join(self.local_root, path))
                entries.append((path, "symlink" if link else "file"))
        entries.sort()
        if kind:
            entries = [e for e in entries if e[1] == kind]
        return entries

    def some_dir(self):
        dirs = [p for p, _ in self.existing("dir") if p.count("/") < MAX_DEPTH - 1]
        return self.rng.choice(dirs)

    def new_path(self, names):
        return os.path.join(self.some_dir(), self.rng.choice(names))

    def some_file(self):
        files = [p for p, _ in self.existing("file")]
        if files and self.rng.random() < 0.9:
            return self.rng.choice(files)
        return self.new_path(FILE_NAMES)

    def some_entry(self):
        entries = [p for p, _ in self.existing() if p]
        if entries and self.rng.random() < 0.9:
            return self.rng.choice(entries)
        return self.new_path(FILE_NAMES + DIR_NAMES)

    # ---- operations: each returns (description, function of a root)

    def offset(self):
        roll = self.rng.random()
        if roll < 0.6:
            return self.rng.randrange(0, 128 * 1024)
        if roll < 0.8:
            return BLOCK + self.rng.randrange(-64 * 1024, 64 * 1024)
        if roll < 0.97:
            return self.rng.randrange(0, 2 * BLOCK)
        return CHUNK + self.rng.randrange(-MIB, MIB)

    def length(self):
        roll = self.rng.random()
        if roll < 0.7:
            return self.rng.randrange(1, 64 * 1024)
        if roll < 0.95:
            return self.rng.randrange(64 * 1024, MIB)
        return self.rng.randrange(MIB, 3 * MIB)

    def op_write(self):
        path, offset = self.some_file(), self.offset()
        data = self.rng.randbytes(self.length())

        def apply(root):
            fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

        return f"write {path} offset={offset} len={len(data)}", apply

    def op_append(self):
        path = self.some_file()
        data = self.rng.randbytes(self.rng.randrange(1, 100 * 1024))

        def apply(root):
            with open(os.path.join(root, path), "ab") as f:
                f.write(data)

        return f"append {path} len={len(data)}", apply

    def op_rewrite(self):
        path = self.some_file()
        data = self.rng.randbytes(self.rng.randrange(0, 200 * 1024))

        def apply(root):
            with open(os.path.join(root, path), "wb") as f:
                f.write(data)

        return f"rewrite {path} len={len(data)}", apply

    def op_truncate(self):
        path = self.some_file()
        size = self.rng.choice([0, self.rng.randrange(0, 200 * 1024), self.offset()])
        return f"truncate {path} size={size}", lambda root: os.truncate(os.path.join(root, path), size)

    def op_rename(self):
        src = self.some_entry()
        dst = self.new_path(FILE_NAMES + DIR_NAMES) if self.rng.random() < 0.6 else self.some_entry()
        return f"rename {src} -> {dst}", lambda root: os.rename(
            os.path.join(root, src), os.path.join(root, dst)
        )

    def op_link(self):
        src, dst = self.some_file(), self.new_path(FILE_NAMES)
        return f"link {src} -> {dst}", lambda root: os.link(
            os.path.join(root, src), os.path.join(root, dst)
        )

    def op_symlink(self):
        target = self.rng.choice(["f0", "../d1/f2", "nowhere"])
        path = self.new_path(FILE_NAMES)
        return f"symlink {path} -> {target}", lambda root: os.symlink(target, os.path.join(root, path))

    def op_unlink(self):
        path = self.some_file()
        return f"unlink {path}", lambda root: os.unlink(os.path.join(root, path))

    def op_mkdir(self):
        path = self.new_path(DIR_NAMES)
        return f"mkdir {path}", lambda root: os.mkdir(os.path.join(root, path))

    def op_rmdir(self):
        dirs = [p for p, _ in self.existing("dir") if p]
        path = self.rng.choice(dirs) if dirs else self.new_path(DIR_NAMES)
        return f"rmdir {path}", lambda root: os.rmdir(os.path.join(root, path))

    def op_chmod(self):
        entries = [p for p, kind in self.existing() if p and kind != "symlink"]
        path = self.rng.choice(entries) if entries else self.new_path(FILE_NAMES)
        mode = self.rng.choice([0o600, 0o644, 0o755, 0o700, 0o4755, 0o1777, 0o640])
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

    def outcome(self, apply, root):
        try:
            apply(root)
            return None
        except OSError as error:
            return EQUIVALENT_ERRNOS.get(error.errno, error.errno)

    def check(self, when, labels):
        model = snapshot(self.local_root)
        for label in labels[:1] if local_mode() else labels:
            looked_up = probe(self.mounts[label].mount_point, model)
            if looked_up != model:
                raise Mismatch(f"{when}: paths looked up through mount {label} differ from the "
                               f"model:\n" + describe_differences(looked_up, model))
            seen = snapshot(self.mounts[label].mount_point)
            if seen != model:
                raise Mismatch(f"{when}: the tree seen through mount {label} differs from the "
                               f"model:\n" + describe_differences(seen, model))

    def run(self):
        self.a.mount()
        if not local_mode():
            self.b.mount()
        names = [name for name, _ in self.OPERATIONS]
        weights = [weight for _, weight in self.OPERATIONS]
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
                    name = self.rng.choices(names, weights)[0]
                    if name == "lock":
                        probes += 1
                        continue
                    what, apply = getattr(self, name)()
                    local_result = self.outcome(apply, self.local_root)
                    mount_result = self.outcome(apply, root)
                    self.history.append(f"batch {batch} (mount {label}): {what} => "
                                        f"{errno_name(local_result)}")
                    operations += 1
                    if local_result != mount_result:
                        raise Mismatch(f"batch {batch}, through mount {label}: {what}: mount "
                                       f"{errno_name(mount_result)}, model {errno_name(local_result)}")
                # Sync point: every descriptor of the batch is closed; wait past the TTL.
                time.sleep(self.ttl + TTL_MARGIN)
                # The mount that did not write first: only the TTL makes it look again.
                other = "B" if label == "A" else "A"
                self.check(f"after batch {batch} (written through mount {label})", [other, label])
                for _ in range(probes):
                    self.lock_probe(batch, self.rng.choice(["A", "B"]))
                self.check_held(batch)
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
    seed = int(os.environ.get("CELLAR_TWO_MOUNT_SEED") or random.SystemRandom().randrange(1 << 32))
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
          f"{test.lock_probes} lock probes, {test.held_checked} descriptors held across a batch, both mounts identical to the model at every sync "
          f"point ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
