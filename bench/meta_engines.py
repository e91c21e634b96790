#!/usr/bin/env python3
"""Metadata operations per second and `git clone` of 5,000 files on a Cellar mount whose volume
keeps its metadata in SQLite, then in PostgreSQL, in one run (and on local disk, for scale).
A measurement, not a test. See bench/README.md.

  python3 bench/meta_engines.py [--files N] [--engines "local sqlite postgres"]

Starts its own Ceph RGW and PostgreSQL (tests/harness/rgw.sh, postgres.sh) on loopback; the
volumes are mounted with `cellar mount` (tests/harness/volume.py). Rows:
  create   N files of 100 bytes (open O_CREAT, write, close), in 20 directories
  stat     stat() of each (after a remount: the kernel's caches are cold)
  rename   each renamed within its directory
  unlink   each removed
  git clone  `git clone --no-hardlinks file://REPO` of a local repository of 5,000 files in 300
             directories (made here with git), into the mount
Environment: CELLAR_BIN (default target/release/cellar).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests/harness"))
from volume import Volume  # noqa: E402


def read_env(path):
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.removeprefix("export ").strip()
        if "=" in line:
            name, value = line.split("=", 1)
            env[name] = value[1:-1] if value[:1] == "'" and value[-1:] == "'" else value
    return env


def make_repo(path, files=5000, dirs=300):
    """A git repository with `files` source-like files (100 B to 8 KiB) in `dirs` directories."""
    path.mkdir(parents=True)
    for i in range(files):
        d = path / f"pkg{i % dirs:03d}"
        d.mkdir(exist_ok=True)
        size = 100 + (i * 7919) % 8000
        (d / f"file{i:05d}.py").write_text((f"# file {i}\n" + "x = 1\n" * (size // 6))[:size])
    git = ["git", "-C", str(path), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "bench"], check=True)


def timed(fn):
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def measure(root, files, repo, remount):
    """Returns {row: (seconds, count)} for one mount (root) of one engine; remount() makes the
    kernel's caches of root cold."""
    dirs = [root / f"dir{d:02d}" for d in range(20)]
    for d in dirs:
        d.mkdir()
    names = [dirs[i % len(dirs)] / f"f{i:06d}" for i in range(files)]
    payload = b"x" * 100
    results = {}

    def create():
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)

    results["create"] = (timed(create), files)
    remount()  # same mount point, cold kernel caches
    results["stat"] = (timed(lambda: [os.stat(n) for n in names]), files)
    renamed = [n.with_name(n.name + ".r") for n in names]
    results["rename"] = (timed(lambda: [os.rename(a, b) for a, b in zip(names, renamed)]), files)
    results["unlink"] = (timed(lambda: [os.unlink(n) for n in renamed]), files)
    results["git clone"] = (timed(lambda: subprocess.run(
        ["git", "clone", "-q", "--no-hardlinks", f"file://{repo}", str(root / "clone")], check=True)), 1)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000, help="files of the create/stat/rename/unlink rows")
    parser.add_argument("--engines", default="local sqlite postgres")
    args = parser.parse_args()
    engines = args.engines.split()
    work = Path(tempfile.mkdtemp(prefix="cellar-meta-bench-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    harness = REPO / "tests/harness"
    started = []
    try:
        repo = work / "repo"
        make_repo(repo)
        subprocess.run(["bash", harness / "rgw.sh", "start", work / "rgw"], check=True, stdout=sys.stderr)
        started.append(("rgw.sh", work / "rgw"))
        os.environ.update(read_env(work / "rgw/env"))
        if "postgres" in engines:
            subprocess.run(["bash", harness / "postgres.sh", "start", work / "pg"], check=True, stdout=sys.stderr)
            started.append(("postgres.sh", work / "pg"))
            os.environ.update(read_env(work / "pg/env"))
        table = {}
        for engine in engines:
            print(f"meta_engines: {engine}", file=sys.stderr, flush=True)
            if engine == "local":
                local = work / "local"
                local.mkdir()

                def drop_caches(local=local):
                    subprocess.run(["sync"], check=True)
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                    return local

                table[engine] = measure(local, args.files, repo, drop_caches)
                continue
            os.environ["CELLAR_TEST_META"] = engine
            volume = Volume(work / f"vol-{engine}")
            try:
                table[engine] = measure(volume.mount(), args.files, repo, volume.remount)
                volume.destroy()
            finally:
                volume.cleanup()
        rows = ["create", "stat", "rename", "unlink", "git clone"]
        print()
        print(f"{args.files} files; ops/s (seconds); git clone of 5,000 files: seconds")
        print()
        print("| row | " + " | ".join(engines) + " |")
        print("|---|" + "---:|" * len(engines))
        for row in rows:
            cells = []
            for engine in engines:
                seconds, count = table[engine][row]
                cells.append(f"{seconds:.2f} s" if row == "git clone" else f"{count / seconds:,.0f}/s ({seconds:.2f} s)")
            print(f"| {row} | " + " | ".join(cells) + " |")
    finally:
        for script, d in reversed(started):
            subprocess.run(["bash", harness / script, "stop", d])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
