#!/usr/bin/env python3
"""Model-based test: the same random operations on a Cellar mount and on a local directory.

After every step the two trees must be identical: names, types, sizes, modes, link counts,
symlink targets and content hashes (files over 1 MiB are re-read when they changed and at every
10th step and remount); every operation must succeed or fail with the same errno
on both. Operations: writes at offsets (including sparse ones past the 4 MiB block and 64 MiB
chunk boundaries), appends, rewrites (open with O_TRUNC), truncates, renames of files and directories, hard links, symlinks,
unlinks, mkdirs, rmdirs, chmods, fsyncs and remounts of the Cellar volume.

  CELLAR_MODEL_SEED   seed (random if unset; always printed, rerun with it to reproduce)
  CELLAR_MODEL_STEPS  number of operations (default 500)
"""

import errno
import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from volume import Volume, VolumeError  # noqa: E402

MIB = 1 << 20
BLOCK = 4 * MIB
CHUNK = 64 * MIB
DIR_NAMES = ["d0", "d1", "d2", "d3"]
FILE_NAMES = ["f0", "f1", "f2", "f3", "f4", "f5", "link"]
MAX_DEPTH = 3
# Files up to this size are read back from the mount after every step; larger (mostly sparse)
# ones when they changed and at every full check, to keep the run within minutes.
ALWAYS_HASHED_BYTES = MIB
FULL_CHECK_EVERY = 10
# Rename onto a non-empty directory may fail with either (POSIX allows both).
EQUIVALENT_ERRNOS = {errno.ENOTEMPTY: errno.EEXIST}


class Mismatch(AssertionError):
    pass


def snapshot(root, content_hash):
    """Everything the comparison looks at, keyed by path relative to root."""
    tree = {}
    for dir_path, dir_names, file_names in os.walk(root):
        dir_names.sort()
        for name in sorted(dir_names + file_names):
            path = os.path.join(dir_path, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            mode = st.st_mode & 0o7777
            if os.path.islink(path):
                tree[rel] = ("symlink", os.readlink(path), st.st_nlink)
            elif os.path.isdir(path):
                tree[rel] = ("dir", mode, st.st_nlink)
            else:
                tree[rel] = ("file", mode, st.st_nlink, st.st_size, content_hash(rel, path, st))
    return tree


def file_hash(path):
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def describe_differences(cellar, local):
    lines = []
    for rel in sorted(set(cellar) | set(local)):
        if cellar.get(rel) != local.get(rel):
            lines.append(f"  {rel}: cellar={cellar.get(rel)} local={local.get(rel)}")
    return "\n".join(lines[:30])


class ModelTest:
    def __init__(self, seed, steps, work_dir):
        self.rng = random.Random(seed)
        self.seed = seed
        self.steps = steps
        self.volume = Volume(work_dir / "volume")
        self.local_root = work_dir / "local"
        self.local_root.mkdir()
        self.history = []
        # The local tree is the reference: its hashes are cached by (inode, size, mtime, ctime).
        self.local_hashes = {}

    # ---- choosing paths from the local (reference) tree

    def existing(self, kind=None):
        entries = [("", "dir")]
        for dir_path, dir_names, file_names in os.walk(self.local_root):
            rel_dir = os.path.relpath(dir_path, self.local_root)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in sorted(dir_names):
                entries.append((os.path.join(rel_dir, name), "dir"))
            for name in sorted(file_names):
                entries.append((os.path.join(rel_dir, name), "file"))
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
            return self.rng.randrange(0, 256 * 1024)
        if roll < 0.8:
            return BLOCK + self.rng.randrange(-64 * 1024, 64 * 1024)
        if roll < 0.93:
            return self.rng.randrange(0, 2 * BLOCK)
        return CHUNK + self.rng.randrange(-BLOCK, BLOCK)

    def length(self):
        roll = self.rng.random()
        if roll < 0.7:
            return self.rng.randrange(1, 64 * 1024)
        if roll < 0.95:
            return self.rng.randrange(64 * 1024, MIB)
        return self.rng.randrange(MIB, 5 * MIB)

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
        data = self.rng.randbytes(self.rng.randrange(1, 200 * 1024))

        def apply(root):
            with open(os.path.join(root, path), "ab") as f:
                f.write(data)

        return f"append {path} len={len(data)}", apply

    def op_rewrite(self):
        """open(O_TRUNC) and write from the start: how most programs save a file."""
        path = self.some_file()
        data = self.rng.randbytes(self.rng.randrange(0, 300 * 1024))

        def apply(root):
            with open(os.path.join(root, path), "wb") as f:
                f.write(data)

        return f"rewrite {path} len={len(data)}", apply

    def op_truncate(self):
        path = self.some_file()
        size = self.rng.choice([0, self.rng.randrange(0, 300 * 1024), self.offset()])
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
        target = self.rng.choice(["f0", "../d1/f2", "nowhere", "d0/" + "x" * 40])
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
        path = self.some_entry()
        mode = self.rng.choice([0o600, 0o644, 0o755, 0o700, 0o4755, 0o1777, 0o640])

        def apply(root):
            full = os.path.join(root, path)
            if os.path.islink(full):
                return  # chmod follows symlinks; targets may be outside the tree
            os.chmod(full, mode)

        return f"chmod {path} {mode:o}", apply

    def op_fsync(self):
        path = self.some_file()

        def apply(root):
            full = os.path.join(root, path)
            if os.path.islink(full):
                return
            fd = os.open(full, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        return f"fsync {path}", apply

    OPERATIONS = [
        ("op_write", 22), ("op_append", 6), ("op_rewrite", 5), ("op_truncate", 8), ("op_rename", 12), ("op_link", 6),
        ("op_symlink", 3), ("op_unlink", 8), ("op_mkdir", 10), ("op_rmdir", 5), ("op_chmod", 5),
        ("op_fsync", 6),
    ]

    # ---- running

    def outcome(self, apply, root):
        try:
            apply(root)
            return None
        except OSError as error:
            return EQUIVALENT_ERRNOS.get(error.errno, error.errno)

    def compare(self, step, what, full):
        changed = set()

        def local_hash(rel, path, st):
            key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            cached = self.local_hashes.get(rel)
            if cached and cached[0] == key:
                return cached[1]
            changed.add(rel)
            self.local_hashes[rel] = (key, file_hash(path))
            return self.local_hashes[rel][1]

        def cellar_hash(rel, path, st):
            if full or rel in changed or st.st_size <= ALWAYS_HASHED_BYTES or rel not in local:
                return file_hash(path)
            return local[rel][4]

        local = snapshot(self.local_root, local_hash)
        cellar = snapshot(self.volume.mount_point, cellar_hash)
        if cellar != local:
            raise Mismatch(f"trees differ after step {step} ({what}):\n"
                           + describe_differences(cellar, local))

    def run(self):
        self.volume.mount()
        names = [name for name, _ in self.OPERATIONS]
        weights = [weight for _, weight in self.OPERATIONS]
        remounts = 0
        try:
            for step in range(1, self.steps + 1):
                if self.rng.random() < 0.03:
                    what = "remount"
                    self.volume.remount()
                    remounts += 1
                else:
                    what, apply = getattr(self, self.rng.choices(names, weights)[0])()
                    local_result = self.outcome(apply, self.local_root)
                    cellar_result = self.outcome(apply, self.volume.mount_point)
                    if local_result != cellar_result:
                        raise Mismatch(
                            f"step {step} ({what}): cellar {errno_name(cellar_result)}, "
                            f"local {errno_name(local_result)}"
                        )
                    what += f" => {errno_name(local_result)}"
                self.history.append(f"{step}: {what}")
                self.compare(step, what, full=what == "remount" or step % FULL_CHECK_EVERY == 0)
            self.volume.remount()
            self.compare(self.steps, "final remount", full=True)
            self.volume.umount()
        except BaseException:
            print("last operations:\n  " + "\n  ".join(self.history[-15:]), file=sys.stderr)
            self.volume.cleanup()
            raise
        code, output = self.volume.fsck()
        if code != 0:
            raise Mismatch(f"cellar fsck exited {code} after the run:\n{output}")
        self.volume.mount()
        self.volume.destroy()
        return remounts


def errno_name(code):
    return "ok" if code is None else errno.errorcode.get(code, str(code))


def main():
    seed = int(os.environ.get("CELLAR_MODEL_SEED") or random.SystemRandom().randrange(1 << 32))
    steps = int(os.environ.get("CELLAR_MODEL_STEPS", "500"))
    print(f"model_test: seed={seed} steps={steps} (rerun with CELLAR_MODEL_SEED={seed})", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-model-"))
    try:
        remounts = ModelTest(seed, steps, work_dir).run()
    except (Mismatch, VolumeError) as error:
        print(f"model_test: FAILED (seed={seed}): {error}", file=sys.stderr)
        print(f"model_test: work directory kept: {work_dir}", file=sys.stderr)
        return 1
    shutil.rmtree(work_dir)
    print(f"model_test: ok: {steps} steps, {remounts} remounts, trees identical after every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
