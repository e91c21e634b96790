#!/usr/bin/env python3
"""A fresh Cellar volume on a FUSE mount, for the end-to-end suites in tests/fs/.

Library: `Volume(work_dir)` keeps its metadata database, mount point and mount log under
work_dir; the volume name is unique per work_dir so volumes never share objects in the bucket.

CLI (for shell suites):  volume.py mount|umount|remount|fsck|kill|detach|destroy|cleanup WORK_DIR
`mount` prints the mount point. Everything fails loudly (non-zero exit, one clear line).

Environment: CELLAR_TEST_S3_URL (+ AWS keys) from tests/harness/rgw.sh; CELLAR_BIN (default
target/release/cellar). CELLAR_TEST_META picks the metadata engine: `sqlite` (the default: a
database file in work_dir) or `postgres` (the database CELLAR_TEST_POSTGRES_URL from
tests/harness/postgres.sh, `?volume=NAME`; the URL, password included, reaches `cellar` through
its environment, never its command line). CELLAR_E2E_LOCAL=1 replaces the mount by a plain
local directory, to debug a suite without Cellar (kill and fsck then do nothing).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class VolumeError(RuntimeError):
    pass


def local_mode():
    return os.environ.get("CELLAR_E2E_LOCAL") == "1"


def is_mounted(path):
    """Whether `path` is a mount point in /proc/self/mountinfo (os.path.ismount stats the
    path, which hangs or fails on a dead FUSE mount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            mount_point = line.split()[4].encode().decode("unicode_escape")
            if mount_point == target:
                return True
    return False


def meta_engine():
    engine = os.environ.get("CELLAR_TEST_META", "sqlite")
    if engine not in ("sqlite", "postgres"):
        raise VolumeError(f"CELLAR_TEST_META={engine}: expected sqlite or postgres")
    return engine


def meta_url(work_dir, name):
    """The metadata engine URL of volume `name` kept under work_dir, per CELLAR_TEST_META."""
    if meta_engine() == "sqlite":
        return f"sqlite://{work_dir / 'meta.db'}"
    base = os.environ.get("CELLAR_TEST_POSTGRES_URL")
    if not base:
        raise VolumeError(
            "CELLAR_TEST_META=postgres but CELLAR_TEST_POSTGRES_URL is not set: start PostgreSQL "
            "with tests/harness/postgres.sh and source its env file (or run tests/run.sh)"
        )
    return f"{base}{'&' if '?' in base else '?'}volume={name}"


class Volume:
    def __init__(self, work_dir, mount_args=(), existing=None):
        """`mount_args`: extra flags of every `cellar mount` of this volume. `existing`: (name,
        metadata URL) of a volume made elsewhere (by a server) instead of a fresh one."""
        self.mount_args = list(mount_args)
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # The name is kept in work_dir so the shell CLI finds the same volume on every call.
        name_file = self.work_dir / "volume-name"
        if existing:
            name_file.write_text(existing[0])
        if not name_file.exists():
            name_file.write_text(f"e2e-{self.work_dir.parent.name}-{uuid.uuid4().hex[:8]}")
        self.name = name_file.read_text().strip()
        self.mount_point = self.work_dir / "mnt"
        self.mount_point.mkdir(exist_ok=True)
        self.log_file = self.work_dir / "mount.log"
        self.meta_url = existing[1] if existing else meta_url(self.work_dir, self.name)
        self.cellar = os.environ.get("CELLAR_BIN", str(REPO / "target/release/cellar"))

    def volume_args(self):
        store_url = os.environ.get("CELLAR_TEST_S3_URL")
        if not store_url:
            raise VolumeError(
                "CELLAR_TEST_S3_URL is not set: start RGW with tests/harness/rgw.sh and "
                "source its env file (or run tests/run.sh)"
            )
        return ["--store", store_url, "--volume", self.name]

    def run_cellar(self, *args, check=True, timeout=300, env=None):
        """`env`: extra environment variables."""
        if not os.access(self.cellar, os.X_OK):
            raise VolumeError(
                f"{self.cellar} is not executable: build it with "
                "`cargo build --release -p cellar-cli` (or set CELLAR_BIN)"
            )
        result = subprocess.run(
            [self.cellar, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "CELLAR_META_URL": self.meta_url, **(env or {})},
        )
        if check and result.returncode != 0:
            raise VolumeError(
                f"`cellar {args[0]}` exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()} (mount log: {self.log_file})"
            )
        return result

    def mount(self):
        if local_mode():
            return self.mount_point
        if is_mounted(self.mount_point):
            raise VolumeError(f"{self.mount_point} is already mounted")
        self.run_cellar(
            "mount",
            *self.volume_args(),
            *self.mount_args,
            "--log-file",
            str(self.log_file),
            str(self.mount_point),
        )
        if not is_mounted(self.mount_point):
            raise VolumeError(f"`cellar mount` returned 0 but {self.mount_point} is not mounted")
        return self.mount_point

    def umount(self):
        if local_mode():
            return
        self.run_cellar("umount", str(self.mount_point))
        if is_mounted(self.mount_point):
            raise VolumeError(f"`cellar umount` returned 0 but {self.mount_point} is still mounted")

    def remount(self):
        self.umount()
        return self.mount()

    def daemon_pid(self):
        """The pid of the process serving the mount (the one that holds /dev/fuse for it)."""
        target = str(self.mount_point)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv if a]
            if len(args) > 1 and Path(args[0]).name == "cellar" and args[1] == "mount" and target in args:
                return int(proc.name)
        raise VolumeError(f"no `cellar mount` process serves {target}")

    def kill(self):
        """SIGKILL the mount daemon. The dead mount stays attached, failing every call with
        ENOTCONN, until `detach`: a process still writing by path must not reach the directory
        underneath (detached, its paths resolve there and its writes land on the local disk)."""
        if local_mode():
            return
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise VolumeError(f"mount daemon {pid} survived SIGKILL for 30 s")
            time.sleep(0.05)

    def detach(self):
        """Detaches a dead mount (what an operator would do), once nothing writes to it any
        more; the directory underneath must be empty."""
        if local_mode():
            return
        subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)], check=True)
        if is_mounted(self.mount_point):
            raise VolumeError(f"{self.mount_point} is still mounted after detaching it")
        strays = sorted(entry.name for entry in self.mount_point.iterdir())
        if strays:
            raise VolumeError(f"{self.mount_point} holds {strays[:5]} underneath the mount: a writer "
                              "reached the directory after the mount was detached")

    def fsck(self):
        """Runs `cellar fsck`; returns (exit code, output)."""
        if local_mode():
            return 0, "local mode: no fsck"
        result = self.run_cellar("fsck", *self.volume_args(), check=False, timeout=600)
        return result.returncode, (result.stdout + result.stderr).strip()

    def destroy(self):
        """Deletes everything on the volume and all its objects, so a long test run does not fill
        the RGW's in-memory OSD. The volume must be mounted; it is unmounted."""
        if local_mode():
            return
        for entry in self.mount_point.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self.umount()
        self.run_cellar("gc", *self.volume_args(), "--grace", "0s", "--delete-leaked", timeout=600)

    def cleanup(self):
        """Best-effort unmount for error paths (lazy, so a hung mount cannot block the suite)."""
        if not local_mode() and is_mounted(self.mount_point):
            subprocess.run(
                [self.cellar, "umount", str(self.mount_point)], capture_output=True, timeout=120
            )
            if is_mounted(self.mount_point):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mount_point)])


def main(argv):
    actions = ("mount", "umount", "remount", "fsck", "kill", "detach", "destroy", "cleanup")
    if len(argv) != 3 or argv[1] not in actions:
        print(f"usage: volume.py {'|'.join(actions)} WORK_DIR", file=sys.stderr)
        return 2
    try:
        volume = Volume(argv[2])
        action = argv[1]
        if action in ("mount", "remount"):
            print(getattr(volume, action)())
        elif action == "fsck":
            code, output = volume.fsck()
            print(output)
            return code
        else:
            getattr(volume, action)()
    except (VolumeError, subprocess.SubprocessError, OSError) as error:
        print(f"volume.py {argv[1]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
