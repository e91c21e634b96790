#!/usr/bin/env python3
"""The multi-host tests: three hosts (network + mount + PID namespaces of this machine, see
tests/harness/hosts.sh), one PostgreSQL, one Ceph RGW; a volume's metadata on PostgreSQL.

  python3 tests/multihost/run.py [--mounts] [CASE...]

By default every host runs `cellar runner` joined to one `cellar server` (on this machine, its
control state on the same PostgreSQL, its store on the RGW), and the volume is mounted on each
host by its runner for a sandbox created through the Daytona API. --mounts instead starts a
`cellar mount` process on each host (no server, no runner): the same cases at the mount level.

Cases (each checks what it says and ends with `cellar fsck` clean):
  seed_flow        (runners only) one volume mounted in sandboxes on two hosts, written in one
                   sandbox, read in the other
  close_to_open    a file closed on one host is seen, content, size and name, by open()/stat()/
                   readdir on another, immediately (rewrites and new files, every direction)
  writers          concurrent writers of different files on all hosts; every host reads all
  rename_storm     concurrent renames of directories between directories from all hosts; then
                   every directory is found exactly once by every host (no loop, none lost)
  flock_counter    a counter incremented under flock by processes on all hosts ends exact
  sqlite           an SQLite database in rollback-journal mode written from two hosts:
                   integrity_check ok, exact row counts
  crash            a host is killed (SIGKILL of everything on it) while it holds a flock and
                   writes: the other hosts go on, the lock is released, fsck clean
Environment: CELLAR_BIN (default target/release/cellar); TMPDIR (where the work directory goes).
"""

import argparse
import json
import random
import select
import subprocess
import sys
import time
import traceback

from runners import SANDBOX_VOLUME, Runners, RunnerVolume, Server
from worker import counter_value
from lib import (
    WORKER, Cluster, MountVolume, TestFailure, check, fresh_work_dir, note,
    remove_work_dir,
)

HOSTS = (1, 2, 3)


def case_seed_flow(cluster, vol):
    """The README's flow across hosts, through the Daytona API: sandboxes on different hosts
    share one volume; what one writes (and closes), the others read."""
    check(hasattr(vol, "execute"), "seed_flow needs runners (not --mounts)")
    for writer, readers in ((1, (2, 3)), (2, (1, 3)), (3, (1, 2))):
        text = f"written-by-a-sandbox-on-host{writer}"
        vol.execute(writer, f"mkdir -p {SANDBOX_VOLUME}/seed && echo {text} > {SANDBOX_VOLUME}/seed/from-host{writer}")
        for reader in readers:
            got = vol.execute(reader, f"cat {SANDBOX_VOLUME}/seed/from-host{writer}").strip()
            check(got == text, f"the sandbox on host {reader} reads {got!r} from host {writer}'s file, expected {text!r}")
    listing = vol.execute(1, f"ls {SANDBOX_VOLUME}/seed").split()
    check(listing == ["from-host1", "from-host2", "from-host3"], f"the sandbox on host 1 lists {listing}")
    note("seed_flow: sandboxes on 3 hosts wrote one file each into one volume; each read the others'")


def case_close_to_open(cluster, vol):
    workers = {h: cluster.worker(h) for h in HOSTS}
    rel = "c2o"
    workers[1].call("mkdir", path=str(vol.path(1) / rel))
    rng = random.Random(8)
    rounds = 90
    for r in range(rounds):
        writer = HOSTS[r % 3]
        reader = HOSTS[(r + 1 + (r // 3) % 2) % 3]
        # Rewrites of one file (its size changes or not: the page cache must not serve old
        # bytes either way) and new names (no negative entry may hide them).
        name = "same" if r % 3 else f"new-{r}"
        size = rng.choice([5, 4096, 70_000, 300_000]) if r % 4 else 4096
        data = f"round {r} from host {writer}\n".ljust(size, chr(97 + r % 26))
        workers[writer].call("write", path=str(vol.path(writer) / rel / name), data=data)
        got = workers[reader].call("stat", path=str(vol.path(reader) / rel / name))
        check(got["size"] == len(data),
              f"round {r}: host {reader} stats {name} at {got['size']} bytes after host {writer} closed it at {len(data)}")
        got = workers[reader].call("read", path=str(vol.path(reader) / rel / name))
        check(got == data, f"round {r}: host {reader} reads {len(got)} bytes of {name} "
                           f"({got[:30]!r}...) after host {writer} closed {len(data)} ({data[:30]!r}...)")
        if name != "same":
            listing = workers[reader].call("listdir", path=str(vol.path(reader) / rel))
            check(name in listing, f"round {r}: host {reader} does not list {name} that host {writer} created")
    note(f"close_to_open: {rounds} rounds, every read after a close on another host saw the new content")


def case_writers(cluster, vol):
    rel, n, size = "writers", 120, 3000
    cluster.on(1, ["mkdir", vol.path(1) / rel])
    cluster.run_everywhere([(h, ["python3", WORKER, "writers", vol.path(h) / rel, f"host{h}", n, size]) for h in HOSTS],
                           timeout=600)
    tags = ",".join(f"host{h}" for h in HOSTS)
    cluster.run_everywhere([(h, ["python3", WORKER, "verify", vol.path(h) / rel, tags, n, size]) for h in HOSTS],
                           timeout=600)
    note(f"writers: {len(HOSTS)} hosts wrote {n} files each at once; every host reads all {len(HOSTS) * n} intact")


def case_rename_storm(cluster, vol):
    rel, n = "storm", 150
    root = vol.path(1) / rel
    cluster.on(1, ["mkdir", root] + [root / f"d{i}" for i in range(12)])
    outputs = cluster.run_everywhere(
        [(h, ["python3", WORKER, "renames", vol.path(h) / rel, h * 1000 + 7, n]) for h in HOSTS], timeout=600)
    tallies = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    check(sum(t["ok"] for t in tallies) > 0, f"no rename succeeded: {tallies}")
    for h in HOSTS:
        dirs = cluster.worker(h).call("walk", path=str(vol.path(h) / rel), timeout=120)
        names = sorted(d.rsplit("/", 1)[-1] for d in dirs)
        check(names == sorted(f"d{i}" for i in range(12)),
              f"host {h} finds these directories after the storm: {dirs} (expected d0..d11 once each)")
    note(f"rename_storm: {len(HOSTS)} hosts x {n} renames ({tallies}); every host finds d0..d11 once each")


def case_flock_counter(cluster, vol):
    rel, procs, n = "counter", 2, 100
    path = vol.path(1) / rel
    cluster.worker(1).call("write", path=str(path), data="0")
    cluster.run_everywhere([(h, ["python3", WORKER, "counter", vol.path(h) / rel, n]) for h in HOSTS for _ in range(procs)],
                           timeout=900)
    expected = len(HOSTS) * procs * n
    for h in HOSTS:
        value = counter_value(cluster.worker(h).call("read", path=str(vol.path(h) / rel)).encode("latin-1"))
        check(value == expected, f"host {h} reads the counter at {value}, expected {expected}")
    note(f"flock_counter: {len(HOSTS) * procs} processes on {len(HOSTS)} hosts x {n} increments under flock = {expected}")


def case_sqlite(cluster, vol):
    rel, n = "db.sqlite", 60
    cluster.on(1, ["python3", WORKER, "sqlite_init", vol.path(1) / rel])
    writers = [(1, 1), (1, 2), (2, 3), (2, 4)]
    cluster.run_everywhere([(h, ["python3", WORKER, "sqlite", vol.path(h) / rel, w, n]) for h, w in writers], timeout=900)
    for h in (3, 1):
        out = cluster.on(h, ["python3", WORKER, "sqlite_check", vol.path(h) / rel]).stdout
        result = json.loads(out)
        check(result["integrity"] == ["ok"], f"host {h}: integrity_check says {result['integrity']}")
        check(result["journal_mode"] == "delete", f"host {h}: journal mode {result['journal_mode']}")
        check(result["counts"] == {str(w): n for _, w in writers},
              f"host {h}: rows per writer {result['counts']}, expected {n} each for writers 1-4")
    note(f"sqlite: {len(writers)} writers on hosts 1 and 2 x {n} transactions (rollback journal); integrity ok, counts exact")


def case_crash(cluster, vol):
    """Host 3 dies (every process on it SIGKILLed) while it holds a flock and writes."""
    rel = "crash"
    cluster.on(1, ["mkdir", vol.path(1) / rel])
    holder = cluster.start_on(3, ["python3", WORKER, "hold_flock", vol.path(3) / rel / "lock"])
    ready, _, _ = select.select([holder.stdout], [], [], 60)
    check(ready and holder.stdout.readline().strip() == "locked", "host 3 did not take the flock")
    probe = cluster.worker(1)
    check(probe.call("flock_try", path=str(vol.path(1) / rel / "lock")) is False,
          "host 1 took the flock that host 3 holds")
    n, size = 80, 20_000
    # The survivors write at full speed while host 3 dies.
    writers = [cluster.start_on(h, ["python3", WORKER, "writers", vol.path(h) / rel, f"host{h}", n, size]) for h in (1, 2)]
    time.sleep(2)
    killed = vol.kill(3)
    for h, proc in zip((1, 2), writers):
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise TestFailure(f"host {h}'s writer did not finish within 600 s after host 3 died")
        check(proc.returncode == 0, f"host {h}'s writer failed after host 3 died: {err.strip()[-1000:]}")
    holder.wait(timeout=30)
    # The dead host's lock goes when its session expires (on the database's clock).
    deadline = killed + 180
    while not probe.call("flock_try", path=str(vol.path(1) / rel / "lock")):
        check(time.monotonic() < deadline, "host 1 still cannot take the flock 180 s after its holder's host died")
        time.sleep(0.5)
    released = time.monotonic() - killed
    probe.call("flock_release", path=str(vol.path(1) / rel / "lock"))
    # Everything the survivors wrote is there, intact, seen from both (the dead host's lock and
    # data files are moved out of the way first: `verify` wants exactly the writers' files).
    cluster.on(1, ["mkdir", vol.path(1) / "crash-holder"])
    cluster.on(1, ["sh", "-c", f'mv "$0"/lock* "$1"/', vol.path(1) / rel, vol.path(1) / "crash-holder"])
    cluster.run_everywhere([(h, ["python3", WORKER, "verify", vol.path(h) / rel, "host1,host2", n, size]) for h in (1, 2)],
                           timeout=600)
    # The host comes back and sees what the others wrote while it was down.
    vol.revive(3)
    cluster.on(3, ["python3", WORKER, "verify", vol.path(3) / rel, "host1,host2", n, size], timeout=600)
    note(f"crash: host 3 killed mid-write; hosts 1 and 2 finished {n} files each; its flock was free after "
         f"{released:.1f}s; host 3 came back and reads them")


CASES = {
    "seed_flow": case_seed_flow,
    "close_to_open": case_close_to_open,
    "writers": case_writers,
    "rename_storm": case_rename_storm,
    "flock_counter": case_flock_counter,
    "sqlite": case_sqlite,
    "crash": case_crash,  # last: it kills a host
}


class MountVolumeOnHosts(MountVolume):
    def kill(self, host):
        self.cluster.kill_host(host)
        self.forget(host)
        return time.monotonic()

    def revive(self, host):
        self.cluster.revive_host(host)
        self.mount(host)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mounts", action="store_true", help="cellar mount on each host instead of runners")
    parser.add_argument("--meta", choices=["postgres", "sqlite"], default="postgres",
                        help="metadata engine of the volume (sqlite: one file shared by the hosts; --mounts only)")
    parser.add_argument("cases", nargs="*", metavar="CASE", help="default: all")
    args = parser.parse_args()
    if args.meta == "sqlite" and not args.mounts:
        parser.error("--meta sqlite needs --mounts (the server's volumes on SQLite stay on its host)")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {' '.join(unknown)}: choose from {' '.join(CASES)}")
    work = fresh_work_dir("mh")
    failures = []
    started = time.monotonic()
    try:
        with Cluster(work, meta=args.meta) as cluster:
            if args.mounts:
                vol = MountVolumeOnHosts(cluster, HOSTS)
                cases = args.cases or [c for c in CASES if c != "seed_flow"]
            else:
                server = Server(cluster)
                vol = RunnerVolume(cluster, server, Runners(cluster, server, HOSTS), HOSTS)
                cluster.cleanups.append(vol.unmount_all)
                cases = args.cases or list(CASES)
            for name in cases:
                case_started = time.monotonic()
                try:
                    CASES[name](cluster, vol)
                    code, output = vol.fsck()
                    check(code == 0, f"cellar fsck after {name} exited {code}:\n{output}")
                    note(f"{name}: ok ({time.monotonic() - case_started:.1f}s)")
                except (TestFailure, subprocess.SubprocessError, OSError) as error:
                    traceback.print_exc()
                    failures.append(name)
                    note(f"{name}: FAILED ({time.monotonic() - case_started:.1f}s): {error}")
    finally:
        if not failures:
            remove_work_dir(work)
        else:
            note(f"work directory kept: {work}")
    note(f"{'FAILED: ' + ' '.join(failures) if failures else 'all cases passed'} ({time.monotonic() - started:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
