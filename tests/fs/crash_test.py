#!/usr/bin/env python3
"""Crash test: SIGKILL the mount daemon while a writer is busy; nothing acknowledged is lost.

Each round: mount, start a writer process that creates files (sizes from a few bytes, stored
inline, to several block objects), fsyncs each one and then records it (name, size, sha256) in
a journal on local disk; the writer also keeps some files open and unsynced, which may be lost.
At a random moment the mount daemon is SIGKILLed, the dead mount detached with
`fusermount3 -u -z`, and `cellar fsck` must find the volume clean. After a remount every file
acknowledged so far (in any round) must have exactly its recorded content.

  CELLAR_CRASH_SEED (random if unset), CELLAR_CRASH_ROUNDS (default 5)
"""

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from crash_writer import read_journal  # noqa: E402  (a torn last line was never acknowledged)
from volume import Volume, VolumeError  # noqa: E402

WRITER = r"""
import hashlib, json, os, random, sys
root, journal_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
journal = open(journal_path, "a")
os.makedirs(root, exist_ok=True)
n = 0
while True:
    n += 1
    name = f"{seed}-{n}"
    size = rng.choice([10, 3_000, 70_000, 1_000_000, 4_194_304 + 17, 9_000_000])
    data = rng.randbytes(size)
    path = os.path.join(root, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    # Written in pieces so that the kill can land in the middle of a file.
    for start in range(0, size, 256 * 1024):
        os.write(fd, data[start:start + 256 * 1024])
    if n % 4 == 0:
        os.close(fd)  # closed without fsync: may or may not survive, never checked
        continue
    os.fsync(fd)
    os.close(fd)
    # The directory entry is durable once the file's fsync returned (Cellar commits metadata
    # with the data); record the acknowledgement only now.
    journal.write(json.dumps({"name": name, "size": size,
                              "sha256": hashlib.sha256(data).hexdigest()}) + "\n")
    journal.flush()
    os.fsync(journal.fileno())
"""


class CrashTestFailure(AssertionError):
    pass


def verify(mount_point, acknowledged):
    for entry in acknowledged:
        path = mount_point / "data" / entry["name"]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CrashTestFailure(f"acknowledged file {entry['name']} unreadable: {error}")
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CrashTestFailure(
                f"acknowledged file {entry['name']}: expected {entry['size']} bytes with sha256 "
                f"{entry['sha256'][:16]}…, got {len(data)} bytes with sha256 "
                f"{hashlib.sha256(data).hexdigest()[:16]}…"
            )


def run(seed, rounds, work_dir):
    """Returns (number of acknowledged files, fsck complaints); raises on lost data."""
    rng = random.Random(seed)
    volume = Volume(work_dir / "v")
    journal = work_dir / "acknowledged.jsonl"
    # A dirty fsck does not stop the rounds: whether data survives is checked all the same.
    fsck_complaints = []
    try:
        for round_number in range(1, rounds + 1):
            volume.mount()
            acknowledged = read_journal(journal)
            verify(volume.mount_point, acknowledged)
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(volume.mount_point / "data"), str(journal),
                 str(rng.randrange(1 << 30))],
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(0.5, 6.0))
            if writer.poll() is not None:
                raise CrashTestFailure(f"the writer died before the kill (exit {writer.returncode})")
            volume.kill()
            # With its daemon gone the mount fails every call: the writer dies or is killed.
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.send_signal(signal.SIGKILL)
                writer.wait()
            volume.detach()
            now_acknowledged = len(read_journal(journal))
            code, output = volume.fsck()
            if code != 0:
                fsck_complaints.append(f"round {round_number}: cellar fsck after the kill exited "
                                       f"{code}:\n{output}")
            print(f"crash_test: round {round_number}: killed after "
                  f"{now_acknowledged - len(acknowledged)} new acknowledged files; fsck "
                  f"{'clean' if code == 0 else 'NOT clean'}", flush=True)
        volume.mount()
        acknowledged = read_journal(journal)
        verify(volume.mount_point, acknowledged)
        volume.umount()
    except BaseException:
        volume.cleanup()
        raise
    code, output = volume.fsck()
    if code != 0:
        fsck_complaints.append(f"after a clean unmount cellar fsck exited {code}:\n{output}")
    return len(acknowledged), fsck_complaints


def main():
    seed = int(os.environ.get("CELLAR_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    rounds = int(os.environ.get("CELLAR_CRASH_ROUNDS", "5"))
    print(f"crash_test: seed={seed} rounds={rounds} (rerun with CELLAR_CRASH_SEED={seed})", flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-crash-"))
    try:
        files, fsck_complaints = run(seed, rounds, work_dir)
        if fsck_complaints:
            raise CrashTestFailure(f"all {files} acknowledged files intact, but fsck was not "
                                   "clean:\n" + "\n".join(fsck_complaints))
        volume = Volume(work_dir / "v")
        volume.mount()
        volume.destroy()
    except (CrashTestFailure, VolumeError, subprocess.SubprocessError) as error:
        print(f"crash_test: FAILED (seed={seed}): {error}", file=sys.stderr)
        print(f"crash_test: work directory kept: {work_dir}", file=sys.stderr)
        return 1
    if files == 0:
        print("crash_test: FAILED: no file was ever acknowledged (writer too slow?)", file=sys.stderr)
        return 1
    shutil.rmtree(work_dir)
    print(f"crash_test: ok: {rounds} kills, all {files} acknowledged files intact, fsck clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
