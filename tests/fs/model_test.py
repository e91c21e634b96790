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

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from model_ops import (  # noqa: E402
    CHMOD_MODES, MIB, Mismatch, ModelOps, describe_differences, errno_name, file_hash, seed_from_env,
    snapshot,
)
from volume import Volume, VolumeError  # noqa: E402

# Files up to this size are read back from the mount after every step; larger (mostly sparse)
# ones when they changed and at every full check, to keep the run within minutes.
ALWAYS_HASHED_BYTES = MIB
FULL_CHECK_EVERY = 10


class ModelTest(ModelOps):
    """ModelOps' default names, sizes and symlink targets; symlinks count as files (operations
    go through them)."""

    def __init__(self, seed, steps, work_dir):
        super().__init__(seed, work_dir / "local")
        self.seed = seed
        self.steps = steps
        self.volume = Volume(work_dir / "volume")
        self.history = []
        # The local tree is the reference: its hashes are cached by (inode, size, mtime, ctime).
        self.local_hashes = {}

    # ---- operations of this suite only (the others are ModelOps'): each returns (description,
    # function of a root)

    def op_chmod(self):
        path = self.some_entry()
        mode = self.rng.choice(CHMOD_MODES)

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

        local = snapshot(self.local_root, local_hash, mode_format=int)
        cellar = snapshot(self.volume.mount_point, cellar_hash, mode_format=int)
        if cellar != local:
            raise Mismatch(f"trees differ after step {step} ({what}):\n"
                           + describe_differences(cellar, local, ("cellar", "local")))

    def run(self):
        self.volume.mount()
        remounts = 0
        try:
            for step in range(1, self.steps + 1):
                if self.rng.random() < 0.03:
                    what = "remount"
                    self.volume.remount()
                    remounts += 1
                else:
                    what, apply = getattr(self, self.next_operation())()
                    local_result, cellar_result = self.apply_both(apply, self.volume.mount_point)
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


def main():
    seed = seed_from_env("CELLAR_MODEL_SEED")
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
