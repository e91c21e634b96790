#!/usr/bin/env python3
"""Soak: 8 sandboxes on one shared volume run a mixed workload for a while; no operation may fail,
memory must stay flat, and the volume must be clean at the end.

A real `cellar server` (embedded runner, real bubblewrap sandboxes made through the API, blocks on
the RGW) runs COUNT sandboxes that all mount one volume (so they share the host's one mount daemon
of it). Each runs tests/harness/soak_worker.py: git commits, SQLite transactions (own and shared),
untar, appends, atomic renames of files and directories, flock and fcntl locks, reads of each
other's files, multi-block files. Meanwhile this process uploads and downloads files through the
server's file API and runs commands through the toolbox, and samples the resident memory (VmRSS)
of the server and of the volume's mount daemon every CELLAR_SOAK_SAMPLE_SECS.

Checks: no workload error in any sandbox; the counter incremented under flock equals the sum of
every sandbox's increments; every committed row of the shared SQLite database is there and
`PRAGMA integrity_check` says ok; `cellar fsck` is clean after the sandboxes are gone.
**Memory bound**, per process (server; mount daemon): the first third of the run is warm-up (the
daemon's page cache fills up to its 512 MiB budget); then the largest sample of the last third is
at most 1.2 x the largest sample of the middle third + 32 MiB: a cache that levels off passes,
memory that grows by more than that between the two thirds fails (over an hour: a server leaking
about 4 MiB a minute, a mount daemon about 12).

  CELLAR_SOAK_SECONDS   workload duration (default 150)
  CELLAR_SOAK_SANDBOXES number of sandboxes (default 8)
  CELLAR_SOAK_SEED      seed of the workload (random if unset; printed)
  CELLAR_SOAK_CSV       where the memory samples go (default: in the work directory, printed)
  CELLAR_SOAK_SAMPLE_SECS  sampling period (default 5)
"""

import csv
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from cellar_server import SANDBOX_VOLUME, CellarServer, ServerError, mount_daemon_pids, rss_kib  # noqa: E402

WORKER = Path(__file__).resolve().parents[1] / "harness" / "soak_worker.py"
HOME = "/home/daytona"
MIB = 1024


class SoakFailure(AssertionError):
    pass


def install_worker(server, sandbox_id):
    """Copies the worker into the sandbox's home through the toolbox."""
    script = WORKER.read_text()
    marker = "SOAK_WORKER_" + uuid.uuid4().hex
    if marker in script:
        raise SoakFailure("heredoc marker collision")
    server.execute(sandbox_id, f"cat > {HOME}/soak_worker.py <<'{marker}'\n{script}\n{marker}\n")


class Sampler(threading.Thread):
    """Samples the RSS of the server and of the volume's mount daemon(s) into a CSV file."""

    def __init__(self, server, mount_point, csv_path, period):
        super().__init__(daemon=True)
        self.server, self.mount_point, self.period = server, mount_point, period
        self.csv_path = csv_path
        self.samples = []  # (seconds, server KiB, daemon KiB)
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def run(self):
        with open(self.csv_path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["seconds", "server_rss_kib", "daemon_rss_kib", "daemons"])
            while not self.stopping.is_set():
                pids = mount_daemon_pids(self.mount_point)
                daemon = sum(rss_kib(pid) or 0 for pid in pids)
                server = rss_kib(self.server.pid) or 0
                sample = (round(time.monotonic() - self.started_at, 1), server, daemon)
                self.samples.append(sample)
                out.writerow([*sample, len(pids)])
                f.flush()
                self.stopping.wait(self.period)

    def stop(self):
        self.stopping.set()
        self.join(timeout=30)


def memory_verdict(samples):
    """Checks the bound of the docstring for each process; returns (failures, summary lines)."""
    if len(samples) < 9:
        return [f"only {len(samples)} memory samples"], []
    end = samples[-1][0]
    middle = [s for s in samples if end / 3 <= s[0] < 2 * end / 3]
    last = [s for s in samples if s[0] >= 2 * end / 3]
    failures, lines = [], []
    for column, name in ((1, "server"), (2, "mount daemon")):
        early = max(s[column] for s in middle)
        late = max(s[column] for s in last)
        bound = 1.2 * early + 32 * MIB
        lines.append(f"{name}: max RSS {early / MIB:.1f} MiB in the middle third, {late / MIB:.1f} MiB in the last "
                     f"(bound {bound / MIB:.1f} MiB)")
        if min(s[column] for s in samples) == 0:
            failures.append(f"{name}: not running at some sample")
        if late > bound:
            failures.append(f"{name}: memory grew: {lines[-1]}")
    return failures, lines


def minute_table(samples):
    """Lines of a table: minute, the largest RSS of the server and of the daemon in that minute."""
    rows = {}
    for seconds, server, daemon in samples:
        minute = int(seconds // 60)
        old = rows.get(minute, (0, 0))
        rows[minute] = (max(old[0], server), max(old[1], daemon))
    return ["minute | server RSS MiB | daemon RSS MiB"] + [
        f"{minute:6d} | {server / MIB:14.1f} | {daemon / MIB:14.1f}" for minute, (server, daemon) in sorted(rows.items())]


def api_traffic(server, volume_id, sandboxes, stopping, errors, counts):
    """Uploads, downloads and toolbox calls through the server while the workload runs."""
    rng = random.Random()
    while not stopping.is_set():
        try:
            data = rng.randbytes(rng.choice([100, 50_000, 2_000_000]))
            path = f"/api-files/f{rng.randrange(20)}"
            server.upload(volume_id, path, data)
            back = server.download(volume_id, path)
            if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
                errors.append(f"file API: {path} read back differs")
            sandbox = rng.choice(sandboxes)
            code, out = server.execute(sandbox, f"wc -c < {SANDBOX_VOLUME}{path}", timeout=60, check=False)
            # Another upload of the same name may land in between: any size of ours is fine.
            if code != 0 or not out.strip().isdigit():
                errors.append(f"toolbox: wc of {path} exited {code}: {out[-300:]}")
            counts["api"] += 1
        except (ServerError, OSError) as error:
            errors.append(f"API traffic: {error}")
        stopping.wait(2)


def read_status(server, sandbox_id):
    path = server.data_dir / "runner" / "sandboxes" / sandbox_id / "home" / "soak-status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(work_dir, seconds, count, seed, csv_path, period):
    server = CellarServer(work_dir)
    server.start()
    sandboxes = []
    try:
        volume_id = server.create_volume(f"soak-{uuid.uuid4().hex[:8]}")
        mount_point = server.data_dir / "runner" / "mounts" / volume_id
        for _ in range(count):
            sandboxes.append(server.create_sandbox(volume_id))
        print(f"soak: {count} sandboxes on volume {volume_id}; workload for {seconds:.0f}s", flush=True)
        for number, sandbox in enumerate(sandboxes):
            install_worker(server, sandbox)
            server.execute(sandbox, f"setsid nohup python3 {HOME}/soak_worker.py {SANDBOX_VOLUME} {number} {count} "
                                    f"{seconds} {seed} {HOME}/soak-status.json > {HOME}/soak.log 2>&1 < /dev/null &")
        sampler = Sampler(server, mount_point, csv_path, period)
        sampler.start()
        stopping, api_errors, counts = threading.Event(), [], {"api": 0}
        traffic = threading.Thread(target=api_traffic, args=(server, volume_id, sandboxes, stopping, api_errors,
                                                            counts), daemon=True)
        traffic.start()
        started = time.monotonic()
        next_report = started + 60
        statuses = {}
        while True:
            statuses = {s: read_status(server, s) for s in sandboxes}
            if all(st and st["done"] for st in statuses.values()):
                break
            if time.monotonic() > started + seconds + 300:
                raise SoakFailure(f"workers not done 300 s after the deadline: "
                                  f"{[s for s, st in statuses.items() if not (st and st['done'])]}")
            if time.monotonic() > next_report:
                ops = sum(sum(st["ops"].values()) for st in statuses.values() if st)
                errs = sum(st.get("error_count", 0) for st in statuses.values() if st)
                last = sampler.samples[-1] if sampler.samples else (0, 0, 0)
                print(f"soak: {time.monotonic() - started:5.0f}s: {ops} operations, {errs} errors, "
                      f"{counts['api']} API rounds; RSS server {last[1] / MIB:.1f} MiB, daemon {last[2] / MIB:.1f} MiB",
                      flush=True)
                next_report += 60
            time.sleep(2)
        stopping.set()
        traffic.join(timeout=300)
        sampler.stop()

        failures = []
        ops = {}
        for sandbox, status in statuses.items():
            for name, n in status["ops"].items():
                ops[name] = ops.get(name, 0) + n
            if status.get("error_count"):
                failures.append(f"sandbox {sandbox}: {status['error_count']} errors, last: {status['errors'][-5:]}")
        failures += [f"(API) {e}" for e in api_errors[-10:]]
        increments = sum(st["counter_increments"] for st in statuses.values())
        _, counter = server.execute(sandboxes[0], f"cat {SANDBOX_VOLUME}/shared/counter")
        if int(counter.strip() or 0) != increments:
            failures.append(f"flock counter is {counter.strip()}, the sandboxes incremented it {increments} times")
        expected_rows = {number: st["shared_rows"] for number, st in enumerate(statuses.values())}
        _, rows = server.execute(sandboxes[-1], "python3 -c \"import json, sqlite3; "
                                 f"db = sqlite3.connect('{SANDBOX_VOLUME}/shared/shared.sqlite'); "
                                 "print(json.dumps([db.execute('PRAGMA integrity_check').fetchone()[0], "
                                 "dict(db.execute('SELECT sandbox, count(*) FROM t GROUP BY sandbox').fetchall())]))\"")
        check, per_sandbox = json.loads(rows.strip().splitlines()[-1])
        per_sandbox = {int(k): v for k, v in per_sandbox.items()}
        if check != "ok":
            failures.append(f"shared SQLite integrity_check: {check}")
        if {k: v for k, v in per_sandbox.items() if v} != {k: v for k, v in expected_rows.items() if v}:
            failures.append(f"shared SQLite rows per sandbox {per_sandbox}, committed {expected_rows}")
        memory_failures, memory_lines = memory_verdict(sampler.samples)
        failures += memory_failures
        for sandbox in sandboxes:
            server.delete_sandbox(sandbox)
        sandboxes.clear()
        code, output = server.cellar_run(volume_id, "fsck")
        if code != 0:
            failures.append(f"cellar fsck exited {code}: {output[-3000:]}")
        total = sum(ops.values())
        print(f"soak: {total} workload operations {dict(sorted(ops.items()))}, {counts['api']} API rounds, "
              f"{increments} flock increments", flush=True)
        for line in minute_table(sampler.samples) + memory_lines:
            print(f"soak: {line}", flush=True)
        print(f"soak: memory samples: {csv_path}", flush=True)
        if failures:
            raise SoakFailure("\n".join(failures))
        if total == 0:
            raise SoakFailure("no workload operation ran")
        server.api("DELETE", f"/api/volumes/{volume_id}", ok=(200, 202, 204))
        return total
    finally:
        server.teardown(sandboxes)


def main():
    seconds = float(os.environ.get("CELLAR_SOAK_SECONDS", "150"))
    count = int(os.environ.get("CELLAR_SOAK_SANDBOXES", "8"))
    seed = int(os.environ.get("CELLAR_SOAK_SEED") or random.SystemRandom().randrange(1 << 32))
    period = float(os.environ.get("CELLAR_SOAK_SAMPLE_SECS", "5"))
    print(f"soak: seed={seed} seconds={seconds:.0f} sandboxes={count} (rerun with CELLAR_SOAK_SEED={seed})",
          flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-soak-"))
    csv_path = Path(os.environ.get("CELLAR_SOAK_CSV") or work_dir / "memory.csv")
    try:
        total = run(work_dir, seconds, count, seed, csv_path, period)
    except (SoakFailure, ServerError, OSError) as error:
        print(f"soak: FAILED (seed={seed}): {error}", file=sys.stderr)
        print(f"soak: work directory kept: {work_dir}", file=sys.stderr)
        return 1
    if not os.environ.get("CELLAR_SOAK_CSV"):
        # The samples are printed above; keep nothing of a passing run.
        csv_copy = Path(tempfile.gettempdir()) / f"soak-memory-{seed}.csv"
        shutil.copy(csv_path, csv_copy)
        print(f"soak: memory samples kept in {csv_copy}")
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"soak: ok: {total} operations, no error, memory flat, fsck clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
