"""What the model-based suites of tests/fs/ (model_test.py, two_mount_model_test.py) share.

`ModelOps` draws seeded random operations from a local reference directory: paths that exist
there (or new ones), offsets and lengths around the 4 MiB block and 64 MiB chunk boundaries, and
the `op_*` methods, each returning (description, function of a root) so the same operation runs
on the reference directory and on a mount. A suite subclasses it, tunes the class attributes
where it differs, adds its own operations and lists them with weights in OPERATIONS.

Also here: the snapshot of a tree that the comparisons look at, the listing of its differences,
errno names and the outcome of one operation.
"""

import errno
import hashlib
import os
import random

MIB = 1 << 20
BLOCK = 4 * MIB
CHUNK = 64 * MIB
# Rename onto a non-empty directory may fail with either (POSIX allows both).
EQUIVALENT_ERRNOS = {errno.ENOTEMPTY: errno.EEXIST}
CHMOD_MODES = [0o600, 0o644, 0o755, 0o700, 0o4755, 0o1777, 0o640]
# Differences listed at the most when two trees differ.
DIFFERENCES_SHOWN = 30


class Mismatch(AssertionError):
    pass


def errno_name(code):
    return "ok" if code is None else errno.errorcode.get(code, str(code))


def seed_from_env(variable):
    """The seed in the environment variable, or a random one if it is unset or empty."""
    return int(os.environ.get(variable) or random.SystemRandom().randrange(1 << 32))


def outcome(apply, root):
    """None if apply(root) succeeded, else its errno (EQUIVALENT_ERRNOS folded together)."""
    try:
        apply(root)
        return None
    except OSError as error:
        return EQUIVALENT_ERRNOS.get(error.errno, error.errno)


def file_hash(path):
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def describe(path, rel=None, content_hash=None, mode_format=oct):
    """What the comparison looks at for one path (None if it does not exist). Contents are
    content_hash(rel, path, stat) if given, else file_hash(path)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a parent is now a file
        return None
    mode = mode_format(st.st_mode & 0o7777)
    if os.path.islink(path):
        return ("symlink", os.readlink(path), st.st_nlink)
    if os.path.isdir(path):
        return ("dir", mode, st.st_nlink)
    contents = content_hash(rel, path, st) if content_hash else file_hash(path)
    return ("file", mode, st.st_nlink, st.st_size, contents)


def snapshot(root, content_hash=None, mode_format=oct):
    """Everything the comparison looks at, keyed by path relative to root (see describe)."""
    tree = {}
    for dir_path, dir_names, file_names in os.walk(root):
        dir_names.sort()
        for name in sorted(dir_names + file_names):
            path = os.path.join(dir_path, name)
            rel = os.path.relpath(path, root)
            tree[rel] = describe(path, rel, content_hash, mode_format)
    return tree


def describe_differences(seen, expected, names, indent="  ", count_rest=False):
    """One line per path where the two snapshots differ, labelled with names (seen, expected);
    at most DIFFERENCES_SHOWN, then (if count_rest) how many more."""
    seen_name, expected_name = names
    lines = []
    for rel in sorted(set(seen) | set(expected)):
        if seen.get(rel) != expected.get(rel):
            lines.append(f"{indent}{rel}: {seen_name}={seen.get(rel)} {expected_name}={expected.get(rel)}")
    rest = len(lines) - DIFFERENCES_SHOWN
    more = f"\n{indent}... {rest} more" if count_rest and rest > 0 else ""
    return "\n".join(lines[:DIFFERENCES_SHOWN]) + more


class ModelOps:
    """Random operations chosen from the local (reference) tree at local_root (created here)."""

    DIR_NAMES = ["d0", "d1", "d2", "d3"]
    FILE_NAMES = ["f0", "f1", "f2", "f3", "f4", "f5", "link"]
    MAX_DEPTH = 3
    # Whether existing() tells symlinks apart ("symlink") or counts them as files ("file", so
    # some_file() may pick one and operations go through it).
    SYMLINKS_APART = False
    # offset(): 60 % below NEAR_OFFSETS, 20 % around the first block boundary, up to
    # WITHIN_BLOCKS anywhere in the first two blocks, the rest within CHUNK_SPREAD of the chunk
    # boundary.
    NEAR_OFFSETS = 256 * 1024
    WITHIN_BLOCKS = 0.93
    CHUNK_SPREAD = BLOCK
    MAX_LENGTH = 5 * MIB
    MAX_APPEND = 200 * 1024
    MAX_REWRITE = 300 * 1024
    MAX_TRUNCATE = 300 * 1024
    SYMLINK_TARGETS = ["f0", "../d1/f2", "nowhere", "d0/" + "x" * 40]
    # (method name, weight); next_operation() draws from it.
    OPERATIONS = []

    def __init__(self, seed, local_root):
        self.rng = random.Random(seed)
        self.local_root = local_root
        self.local_root.mkdir()

    def next_operation(self):
        names = [name for name, _ in self.OPERATIONS]
        weights = [weight for _, weight in self.OPERATIONS]
        return self.rng.choices(names, weights)[0]

    def apply_both(self, apply, root):
        """(outcome on the local tree, outcome on root), the local one first."""
        return outcome(apply, self.local_root), outcome(apply, root)

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
                link = self.SYMLINKS_APART and os.path.islink(os.path.join(self.local_root, path))
                entries.append((path, "symlink" if link else "file"))
        entries.sort()
        if kind:
            entries = [e for e in entries if e[1] == kind]
        return entries

    def some_dir(self):
        dirs = [p for p, _ in self.existing("dir") if p.count("/") < self.MAX_DEPTH - 1]
        return self.rng.choice(dirs)

    def new_path(self, names):
        return os.path.join(self.some_dir(), self.rng.choice(names))

    def some_file(self):
        files = [p for p, _ in self.existing("file")]
        if files and self.rng.random() < 0.9:
            return self.rng.choice(files)
        return self.new_path(self.FILE_NAMES)

    def some_entry(self):
        entries = [p for p, _ in self.existing() if p]
        if entries and self.rng.random() < 0.9:
            return self.rng.choice(entries)
        return self.new_path(self.FILE_NAMES + self.DIR_NAMES)

    # ---- operations: each returns (description, function of a root)

    def offset(self):
        roll = self.rng.random()
        if roll < 0.6:
            return self.rng.randrange(0, self.NEAR_OFFSETS)
        if roll < 0.8:
            return BLOCK + self.rng.randrange(-64 * 1024, 64 * 1024)
        if roll < self.WITHIN_BLOCKS:
            return self.rng.randrange(0, 2 * BLOCK)
        return CHUNK + self.rng.randrange(-self.CHUNK_SPREAD, self.CHUNK_SPREAD)

    def length(self):
        roll = self.rng.random()
        if roll < 0.7:
            return self.rng.randrange(1, 64 * 1024)
        if roll < 0.95:
            return self.rng.randrange(64 * 1024, MIB)
        return self.rng.randrange(MIB, self.MAX_LENGTH)

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
        data = self.rng.randbytes(self.rng.randrange(1, self.MAX_APPEND))

        def apply(root):
            with open(os.path.join(root, path), "ab") as f:
                f.write(data)

        return f"append {path} len={len(data)}", apply

    def op_rewrite(self):
        """open(O_TRUNC) and write from the start: how most programs save a file."""
        path = self.some_file()
        data = self.rng.randbytes(self.rng.randrange(0, self.MAX_REWRITE))

        def apply(root):
            with open(os.path.join(root, path), "wb") as f:
                f.write(data)

        return f"rewrite {path} len={len(data)}", apply

    def op_truncate(self):
        path = self.some_file()
        size = self.rng.choice([0, self.rng.randrange(0, self.MAX_TRUNCATE), self.offset()])
        return f"truncate {path} size={size}", lambda root: os.truncate(os.path.join(root, path), size)

    def op_rename(self):
        src = self.some_entry()
        dst = self.new_path(self.FILE_NAMES + self.DIR_NAMES) if self.rng.random() < 0.6 else self.some_entry()
        return f"rename {src} -> {dst}", lambda root: os.rename(
            os.path.join(root, src), os.path.join(root, dst)
        )

    def op_link(self):
        src, dst = self.some_file(), self.new_path(self.FILE_NAMES)
        return f"link {src} -> {dst}", lambda root: os.link(
            os.path.join(root, src), os.path.join(root, dst)
        )

    def op_symlink(self):
        target = self.rng.choice(self.SYMLINK_TARGETS)
        path = self.new_path(self.FILE_NAMES)
        return f"symlink {path} -> {target}", lambda root: os.symlink(target, os.path.join(root, path))

    def op_unlink(self):
        path = self.some_file()
        return f"unlink {path}", lambda root: os.unlink(os.path.join(root, path))

    def op_mkdir(self):
        path = self.new_path(self.DIR_NAMES)
        return f"mkdir {path}", lambda root: os.mkdir(os.path.join(root, path))

    def op_rmdir(self):
        dirs = [p for p, _ in self.existing("dir") if p]
        path = self.rng.choice(dirs) if dirs else self.new_path(self.DIR_NAMES)
        return f"rmdir {path}", lambda root: os.rmdir(os.path.join(root, path))
