#!/usr/bin/env python3
"""Crash loops: seeded iterations of SIGKILL of the mount daemon, of the runner and of the server
at random points of write workloads; nothing acknowledged is lost, nothing is leaked.

The workload is tests/harness/crash_writer.py: creates, appends, overwrites, truncates (each ending
with fsync or close), renames of files (also over another file) and of directories, hard links,
unlinks, and committed transactions of a SQLite database (WAL, synchronous=FULL) on the volume. It
journals every operation before and after it (on local disk), so the model knows what was
acknowledged; at most one operation is pending at a kill (it may have happened or not).

Three phases, each a loop of iterations (CELLAR_CRASH_LOOP_ITERATIONS split between them):
- daemon: a `cellar mount` (tests/harness/volume.py) with the writer on the host; each iteration
  SIGKILLs the mount daemon at a random moment, detaches the dead mount, mounts again and checks.
- runner: `cellar server` (PostgreSQL: the sandbox runs on a runner) and a `cellar runner` with a
  bubblewrap sandbox whose process runs the writer on its volume, while this process writes through
  the server's file API and through the toolbox (exec). Each iteration SIGKILLs the runner (now and
  then leaving it down long enough for the server to mark it lost) and starts it again.
- server: the same with the server's embedded runner; each iteration SIGKILLs the server.
In the runner and server phases the sandbox's writer never stops: the mount lives on, and every
iteration checks that the writer went on acknowledging, that the sandbox is still `started` and
answers exec; the writer is paused (SIGSTOP) only while the tree is compared.

After every kill: every acknowledged file and row intact (the pending operation either done or not;
a pending data operation may leave its file with any content, its writes were never acknowledged),
`cellar fsck` clean. At the end of each phase: the sandbox deleted (the mount released), the volume
mounted again and checked, `cellar gc --grace 0s`, then `cellar fsck` with a zero grace finds no
leaked object. Prints per phase: iterations, operations, data lost, time to recover (kill -> mount
usable again for the daemon; kill -> the sandbox answers exec again for the runner and server).

  CELLAR_CRASH_LOOP_SEED        seed (random if unset; printed)
  CELLAR_CRASH_LOOP_ITERATIONS  total iterations (default 45)
  CELLAR_CRASH_LOOP_PHASES      comma-separated subset of daemon,runner,server (default all)
Needs CELLAR_TEST_S3_URL (tests/harness/rgw.sh) and, for the runner phase,
CELLAR_TEST_POSTGRES_URL (tests/harness/postgres.sh); tests/run.sh provides both.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "harness"
sys.path.insert(0, str(HARNESS))
import crash_writer  # noqa: E402
from cellar_server import (SANDBOX_VOLUME, CellarRunner, CellarServer, ServerError, mount_daemon_pids,  # noqa: E402
                           wait_for)
from volume import Volume, VolumeError  # noqa: E402

WRITER = HARNESS / "crash_writer.py"
HOME = "/home/daytona"
PHASES = ("daemon", "runner", "server")


class CrashLoopFailure(AssertionError):
    pass


class Stats:
    def __init__(self, phase):
        self.phase = phase
        self.iterations = 0
        self.operations = 0
        self.recoveries = []
        self.lifecycle = 0  # sandboxes created or deleted across a kill

    def line(self):
        r = sorted(self.recoveries) or [0]
        return (f"{self.phase}: {self.iterations} kills, {self.operations} acknowledged operations, 0 lost, "
                f"{self.lifecycle} sandboxes created/deleted across a kill; "
                f"recovery median {statistics.median(r):.2f}s, max {r[-1]:.2f}s")


def verify(root, journal, what, resolve):
    """Compares the tree with the journal's model; records the pending operation's outcome if
    `resolve` (no writer runs). Returns the number of acknowledged operations."""
    model, pending, acked = crash_writer.replay(crash_writer.read_journal(journal))
    if acked == 0 and pending is None:
        return 0
    # The SQLite files as found, before SQLite opens (and recovers) them: kept with the work
    # directory of a failed run.
    evidence = Path(journal).parent / f"{Path(journal).stem}-sqlite-before-check"
    shutil.rmtree(evidence, ignore_errors=True)
    if (Path(root) / "sqlite").is_dir():
        shutil.copytree(Path(root) / "sqlite", evidence)
    problems, resolution = crash_writer.check(model, pending, str(root))
    if problems:
        raise CrashLoopFailure(f"{what}: data lost (pending operation {pending}; the SQLite files before the "
                               f"check: {evidence}):\n  " + "\n  ".join(problems[:20]))
    if resolve:
        crash_writer.resolve(journal, resolution)
    return acked


def writer_errors(path, expected_errors):
    """A MISMATCH is always a failure; other errors only where none may happen (the mount must
    stay up). Empties the file."""
    text = path.read_text() if path.exists() else ""
    path.unlink(missing_ok=True)
    bad = [line for line in text.splitlines() if line.startswith("MISMATCH") or not expected_errors]
    if bad:
        raise CrashLoopFailure("the writer failed:\n  " + "\n  ".join(bad[:5]))


def fsck_clean(run_fsck, what):
    code, output = run_fsck()
    if code != 0:
        raise CrashLoopFailure(f"{what}: cellar fsck exited {code}:\n{output[-3000:]}")


def no_leaks(run_cellar, what):
    """`cellar gc --grace 0s` (waiting out the maintenance lease a killed daemon may still hold),
    then `cellar fsck` with a zero grace: no object may be left that no slice references."""
    deadline = time.monotonic() + 300
    while True:
        code, output = run_cellar("gc", "--grace", "0s")
        if code == 0:
            break
        if "maintenance lease" not in output or time.monotonic() > deadline:
            raise CrashLoopFailure(f"{what}: cellar gc exited {code}: {output[-2000:]}")
        time.sleep(5)
    code, output = run_cellar("fsck", env={"CELLAR_GC_GRACE_SECS": "0"})
    if code != 0:
        raise CrashLoopFailure(f"{what}: after gc, cellar fsck exited {code} (leaked objects?):\n{output[-3000:]}")


def volume_runner(volume):
    def run(*args, env=None):
        result = volume.run_cellar(*args, *volume.volume_args(), check=False, timeout=600, env=env)
        return result.returncode, (result.stdout + result.stderr).strip()
    return run


# ---- phase 1: the mount daemon

def daemon_phase(work, rng, iterations):
    stats = Stats("daemon")
    volume = Volume(work / "daemon")
    journal, errors = work / "daemon-journal.jsonl", work / "daemon-errors"
    root = volume.mount_point / "crash"
    volume.mount()
    try:
        for iteration in range(1, iterations + 1):
            writer = subprocess.Popen([sys.executable, WRITER, root, journal, str(rng.randrange(1 << 30)), errors],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.3, 4.0))
            if writer.poll() is not None:
                writer_errors(errors, expected_errors=False)
                raise CrashLoopFailure(f"the writer exited {writer.returncode} before the kill")
            killed = time.monotonic()
            volume.kill()
            dead = time.monotonic()
            # Gone before the detach (see Volume.kill) and the remount, so that it cannot write
            # to the disk underneath or to the new mount.
            try:
                writer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                writer.kill()
                writer.wait()
            detaching = time.monotonic()
            volume.detach()
            volume.mount()
            # Kill to usable again: the daemon gone, the dead mount detached, mounted anew.
            stats.recoveries.append(dead - killed + time.monotonic() - detaching)
            writer_errors(errors, expected_errors=True)
            stats.operations = verify(root, journal, f"daemon iteration {iteration}", resolve=True)
            fsck_clean(volume.fsck, f"daemon iteration {iteration}")
            stats.iterations = iteration
            print(f"crash_loops: daemon {iteration}/{iterations}: {stats.operations} operations acknowledged, "
                  f"recovered in {stats.recoveries[-1]:.2f}s", flush=True)
        volume.umount()
        fsck_clean(volume.fsck, "daemon phase, after a clean unmount")
        no_leaks(volume_runner(volume), "daemon phase")
        volume.mount()
        verify(root, journal, "daemon phase, final", resolve=True)
        volume.destroy()
    finally:
        volume.cleanup()
    return stats


# ---- phases 2 and 3: the runner and the server, with a sandbox writing all along

class ApiWriter(threading.Thread):
    """Writes files through the server (file API uploads, replacing a few names) and through the
    runner (exec: a new file each time, fsynced and renamed into place), recording what was
    acknowledged. A call that failed may still have happened (an exec may even finish later)."""

    def __init__(self, server, volume_id, sandbox_id, seed):
        super().__init__(daemon=True)
        self.server, self.volume_id, self.sandbox_id = server, volume_id, sandbox_id
        self.rng = random.Random(seed)
        self.uploads = {}  # name -> {"acked": sha or None, "maybe": {sha}}
        self.execs = {}  # name -> sha, acknowledged
        self.failed_execs = set()
        self.acked = 0
        self.go = threading.Event()
        self.idle = threading.Event()
        self.stopping = False
        self.go.set()

    def run(self):
        n = 0
        while not self.stopping:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            self.idle.clear()
            n += 1
            try:
                if self.rng.random() < 0.5:
                    self.upload()
                else:
                    self.exec_write(f"e{n}")
            except (ServerError, OSError):
                pass  # the server or the runner is down: recorded as maybe-happened
            time.sleep(0.05)
        self.idle.set()

    def upload(self):
        name = f"u{self.rng.randrange(8)}"
        data = self.rng.randbytes(self.rng.choice([10, 5_000, 200_000, 2_000_000]))
        entry = self.uploads.setdefault(name, {"acked": None, "maybe": set()})
        digest = hashlib.sha256(data).hexdigest()
        entry["maybe"].add(digest)
        self.server.upload(self.volume_id, f"/api/{name}", data, timeout=60)
        entry["acked"], entry["maybe"] = digest, set()
        self.acked += 1

    def exec_write(self, name):
        self.failed_execs.add(name)
        size = self.rng.choice([10, 5_000, 200_000, 2_000_000])
        path = f"{SANDBOX_VOLUME}/api/{name}"
        _, output = self.server.execute(
            self.sandbox_id, f"mkdir -p {SANDBOX_VOLUME}/api && head -c {size} /dev/urandom > {path}.tmp && "
                             f"sync {path}.tmp && mv {path}.tmp {path} && sha256sum {path}", timeout=60)
        self.execs[name] = output.split()[0]
        self.failed_execs.discard(name)
        self.acked += 1

    def pause(self):
        self.go.clear()
        wait_for("the API writer pausing", self.idle.is_set, 180)

    def resume(self):
        self.go.set()

    def stop(self):
        self.stopping = True
        self.go.set()
        self.join(timeout=180)

    def check(self, mount_point, what):
        base = Path(mount_point) / "api"
        problems = []

        def content(name):
            try:
                return hashlib.sha256((base / name).read_bytes()).hexdigest()
            except FileNotFoundError:
                return None
        for name, entry in self.uploads.items():
            allowed = entry["maybe"] | ({entry["acked"]} if entry["acked"] else {None})
            if content(name) not in allowed:
                problems.append(f"upload {name}: acknowledged {entry['acked']}, found {content(name)}")
        for name, digest in self.execs.items():
            if content(name) != digest:
                problems.append(f"exec-written {name}: acknowledged {digest}, found {content(name)}")
        if problems:
            raise CrashLoopFailure(f"{what}: data written through the API lost:\n  " + "\n  ".join(problems[:10]))


def sandbox_journal(sandbox):
    """The journal of the sandbox's writer, inside it: named after the sandbox, so that the
    writer's command line tells it from those of other runs on the machine."""
    return f"{HOME}/journal-{sandbox}.jsonl"


def sandbox_writer_pid(journal):
    """The host pid of the sandbox's writer (its command line names its journal)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"crash_writer.py") for a in args) and journal.encode() in args:
                return int(proc.name)
    return None


def postgres_database(work):
    """A fresh database of the test PostgreSQL; returns (URL, drop function)."""
    base = os.environ.get("CELLAR_TEST_POSTGRES_URL")
    if not base:
        raise CrashLoopFailure("the runner phase needs CELLAR_TEST_POSTGRES_URL (tests/harness/postgres.sh, or "
                               "run it through tests/run.sh)")
    url = urllib.parse.urlsplit(base)
    name = f"crash_{uuid.uuid4().hex[:10]}"
    # The password goes through the environment, never a command line.
    env = {**os.environ, "PGHOST": url.hostname, "PGPORT": str(url.port or 5432), "PGUSER": url.username,
           "PGPASSWORD": urllib.parse.unquote(url.password or ""), "PGDATABASE": url.path.lstrip("/")}

    def sql(statement):
        result = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-qc", statement], env=env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise CrashLoopFailure(f"psql {statement!r}: {result.stderr.strip()}")
    sql(f"CREATE DATABASE {name}")
    return url._replace(path=f"/{name}").geturl(), lambda: sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pause_outside_sqlite(writer_pid, journal):
    """SIGSTOPs the writer where it holds no SQLite connection (it opens one per transaction, after
    journaling its intent, and closes it before the acknowledgement): a writer stopped inside one
    may hold a lock that keeps the check out."""
    deadline = time.monotonic() + 60
    while True:
        os.kill(writer_pid, signal.SIGSTOP)
        _, pending, _ = crash_writer.replay(crash_writer.read_journal(journal))
        if not pending or pending["op"] != "sqlite":
            return
        if time.monotonic() > deadline:
            raise CrashLoopFailure("the sandbox's writer stays in an SQLite transaction for a minute")
        os.kill(writer_pid, signal.SIGCONT)
        time.sleep(0.02)


def start_sandbox_writer(server, sandbox, rng):
    """Starts the writer in the sandbox, detached from the exec; returns its host pid."""
    server.execute(sandbox, f"setsid nohup python3 {HOME}/crash_writer.py {SANDBOX_VOLUME}/crash "
                            f"{sandbox_journal(sandbox)} {rng.randrange(1 << 30)} {HOME}/errors "
                            f"> /dev/null 2>&1 < /dev/null &")
    return wait_for("the sandbox's writer", lambda: sandbox_writer_pid(sandbox_journal(sandbox)), 30)


def kill_daemon_under_sandbox(server, sandbox, mount_point, journal, errors, api, volume_id, rng, stats):
    """SIGKILLs the mount daemon of the sandbox's volume: its runner must replace it and renew the
    sandbox's bind by itself. The writer dies on the dead mount; checks, then a new writer."""
    what = f"{stats.phase} {stats.iterations + 1}"
    pids = mount_daemon_pids(mount_point)
    if len(pids) != 1:
        raise CrashLoopFailure(f"{what}: {len(pids)} mount daemons serve {mount_point}")
    killed = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    # A new daemon first (the old one may still answer for an instant after the signal).
    wait_for(f"{what}: a new mount daemon", lambda: mount_daemon_pids(mount_point) not in ([], pids), 60, 0.05)
    probe = f"test -d {SANDBOX_VOLUME}/crash"
    wait_for(f"{what}: the sandbox seeing its volume again",
             lambda: server.execute(sandbox, probe, timeout=10, check=False)[0] == 0, 60, 0.05)
    stats.recoveries.append(time.monotonic() - killed)
    writer = sandbox_writer_pid(sandbox_journal(sandbox))
    if writer:
        # Blocked in no call: its next one fails on the dead mount; a straggler is ended here.
        try:
            wait_for(f"{what}: the writer exiting", lambda: sandbox_writer_pid(sandbox_journal(sandbox)) is None, 30)
        except ServerError:
            os.kill(writer, signal.SIGKILL)
    writer_errors(errors, expected_errors=True)
    api.pause()
    try:
        stats.operations = verify(mount_point / "crash", journal, what, resolve=True)
        api.check(mount_point, what)
        fsck_clean(lambda: server.cellar_run(volume_id, "fsck"), what)
    finally:
        api.resume()
    stats.iterations += 1
    print(f"crash_loops: {what}: the sandbox saw its volume again {stats.recoveries[-1]:.2f}s after its "
          f"daemon was killed", flush=True)
    return start_sandbox_writer(server, sandbox, rng)


def sandbox_phase(work, rng, iterations, phase):
    """The runner or the server phase; returns its stats and those of the kills of the mount
    daemon under the sandbox (some iterations)."""
    stats = Stats(phase)
    under = Stats(f"{phase}: mount daemon under the sandbox")
    drop_database = None
    if phase == "runner":
        database, drop_database = postgres_database(work)
        server = CellarServer(work / phase, embedded_runner=False, runner_timeout="3s", database=database)
    else:
        server = CellarServer(work / phase)
    server.start()
    runner = None
    sandboxes = []
    state_dir = server.data_dir / "runner"
    try:
        if phase == "runner":
            runner = CellarRunner(server)
            runner.start()
        state_dir = (runner.data_dir if runner else server.data_dir) / "runner"
        volume_id = server.create_volume(f"crash-{phase}-{uuid.uuid4().hex[:6]}")
        sandbox = server.create_sandbox(volume_id, runner=runner.name if runner else None)
        sandboxes.append(sandbox)
        home = state_dir / "sandboxes" / sandbox / "home"
        mount_point = state_dir / "mounts" / volume_id
        journal, errors = home / Path(sandbox_journal(sandbox)).name, home / "errors"
        script = WRITER.read_text()
        server.execute(sandbox, f"cat > {HOME}/crash_writer.py <<'CRASH_WRITER_END'\n{script}\nCRASH_WRITER_END\n")
        writer_pid = start_sandbox_writer(server, sandbox, rng)
        api = ApiWriter(server, volume_id, sandbox, rng.randrange(1 << 30))
        api.start()
        process = runner.process if runner else server.process
        for iteration in range(1, iterations + 1):
            time.sleep(rng.uniform(0.5, 3.0))
            if rng.random() < 0.2:
                writer_pid = kill_daemon_under_sandbox(server, sandbox, mount_point, journal, errors, api, volume_id,
                                                       rng, under)
                continue
            _, _, acked_before = crash_writer.replay(crash_writer.read_journal(journal))
            if rng.random() < 0.3:
                churning = churn(server, volume_id, runner.name if runner else None, rng)
                time.sleep(rng.uniform(0, 1.5))
            else:
                churning = None
            killed = time.monotonic()
            process.kill()
            if phase == "runner" and rng.random() < 0.25:
                # Down past the runner timeout: the server marks it and its sandbox lost.
                time.sleep(rng.uniform(4, 6))
            (runner or server).start()
            wait_for(f"{phase} iteration {iteration}: the sandbox answering exec",
                     lambda: exec_works(server, sandbox), 120, 0.05)
            stats.recoveries.append(time.monotonic() - killed)
            state = wait_for("the sandbox's state", lambda: server.sandbox_state(sandbox, unless="lost"), 60, 0.2)
            if state != "started":
                raise CrashLoopFailure(f"{phase} iteration {iteration}: the sandbox is {state} after the restart")
            # The mount outlived the kill: the sandbox's writer went on without an error.
            wait_for(f"{phase} iteration {iteration}: the sandbox's writer acknowledging again",
                     lambda: crash_writer.replay(crash_writer.read_journal(journal))[2] > acked_before, 60, 0.1)
            if sandbox_writer_pid(sandbox_journal(sandbox)) != writer_pid:
                writer_errors(errors, expected_errors=False)
                raise CrashLoopFailure(f"{phase} iteration {iteration}: the sandbox's writer died")
            writer_errors(errors, expected_errors=False)
            if churning:
                churning.join(timeout=120)
                stats.lifecycle += settle_others(server, sandbox, state_dir, f"{phase} iteration {iteration}")
            api.pause()
            pause_outside_sqlite(writer_pid, journal)
            try:
                acked = verify(mount_point / "crash", journal, f"{phase} iteration {iteration}", resolve=False)
                api.check(mount_point, f"{phase} iteration {iteration}")
                fsck_clean(lambda: server.cellar_run(volume_id, "fsck"), f"{phase} iteration {iteration}")
            finally:
                os.kill(writer_pid, signal.SIGCONT)
                api.resume()
            stats.operations = acked + api.acked
            stats.iterations += 1
            print(f"crash_loops: {phase} {iteration}/{iterations}: {stats.operations} operations acknowledged, "
                  f"the sandbox answered again {stats.recoveries[-1]:.2f}s after the kill", flush=True)
        api.stop()
        os.kill(writer_pid, signal.SIGKILL)
        check_after_release(server, volume_id, sandbox, journal, api, work / f"{phase}-mount")
        sandboxes.clear()
        no_leaks(lambda *args, env=None: server_cellar(server, volume_id, args, env), f"{phase} phase")
        server.api("DELETE", f"/api/volumes/{volume_id}", ok=(200, 202, 204))
    except BaseException:
        # The sandbox's home goes with it: keep its journal for the failure's analysis.
        for path in state_dir.glob("sandboxes/*/home/journal*"):
            shutil.copytree(path, work / path.name) if path.is_dir() else shutil.copy(path, work)
        raise
    finally:
        if runner:
            runner.process.stop()
        server.teardown(sandboxes)
        if drop_database:
            drop_database()
    return [stats, under]


def churn(server, volume_id, runner, rng):
    """Creates a sandbox on the volume (and sometimes deletes it at once) in a thread, so that the
    kill lands in the middle of a sandbox's creation or destruction."""
    delete = rng.random() < 0.5

    def run():
        try:
            sandbox = server.create_sandbox(volume_id, runner=runner, timeout=60)
            if delete:
                server.api("DELETE", f"/api/sandbox/{sandbox}", ok=(200, 204, 404))
        except (ServerError, OSError):
            pass  # the kill came first
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def settle_others(server, keep, state_dir, what):
    """Every sandbox but `keep` ends up started or error (never stuck in creating/destroying),
    is deleted, and leaves no process behind."""
    listed = server.api("GET", "/api/sandbox?limit=1000")
    others = [s["id"] for s in (listed["items"] if isinstance(listed, dict) else listed)
              if s["id"] != keep and s["state"] != "destroyed"]
    for sandbox in others:
        state = wait_for(f"{what}: sandbox {sandbox} settling",
                         lambda: server.sandbox_state(sandbox) not in ("creating", "destroying") and
                         server.sandbox_state(sandbox), 180, 0.2)
        if state not in ("started", "error"):
            raise CrashLoopFailure(f"{what}: sandbox {sandbox} created across a kill is {state}")
        server.delete_sandbox(sandbox)

    def leftovers():
        marks = [f"{state_dir}/sandboxes/{sandbox}/".encode() for sandbox in others]
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                if any(mark in cmdline for mark in marks):
                    found.append(int(proc.name))
        return found
    try:
        wait_for(f"{what}: the processes of deleted sandboxes gone", lambda: not leftovers(), 60, 0.2)
    except ServerError as error:
        raise CrashLoopFailure(f"{error}: {leftovers()} still run") from None
    return len(others)


def exec_works(server, sandbox):
    try:
        return server.execute(sandbox, "true", timeout=10, check=False)[0] == 0
    except (ServerError, OSError):
        return False


def server_cellar(server, volume_id, args, env):
    saved = server.env
    server.env = {**saved, **(env or {})}
    try:
        return server.cellar_run(volume_id, *args)
    finally:
        server.env = saved


def check_after_release(server, volume_id, sandbox, journal, api, work_dir):
    """Deletes the sandbox (its runner unmounts the volume, flushing it), then mounts the volume
    here, checks everything and records the pending operation's outcome; fsck after unmounting."""
    server.delete_sandbox(sandbox)
    volume = Volume(work_dir, existing=(volume_id, server.volume_meta_url(volume_id)))
    volume.mount()
    try:
        verify(volume.mount_point / "crash", journal, "after the sandbox was deleted", resolve=True)
        api.check(volume.mount_point, "after the sandbox was deleted")
        volume.umount()
    finally:
        volume.cleanup()
    fsck_clean(lambda: server.cellar_run(volume_id, "fsck"), "after the sandbox was deleted")


def main():
    seed = int(os.environ.get("CELLAR_CRASH_LOOP_SEED") or random.SystemRandom().randrange(1 << 32))
    total = int(os.environ.get("CELLAR_CRASH_LOOP_ITERATIONS", "45"))
    phases = [p for p in os.environ.get("CELLAR_CRASH_LOOP_PHASES", ",".join(PHASES)).split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        print(f"crash_loops: unknown phases {sorted(unknown)} (one of {PHASES})", file=sys.stderr)
        return 2
    print(f"crash_loops: seed={seed} iterations={total} phases={','.join(phases)} "
          f"(rerun with CELLAR_CRASH_LOOP_SEED={seed})", flush=True)
    work = Path(tempfile.mkdtemp(prefix="cellar-crash-loops-"))
    os.chmod(work, 0o755)
    rng = random.Random(seed)
    results = []
    started = time.monotonic()
    try:
        for number, phase in enumerate(phases):
            iterations = total // len(phases) + (1 if number < total % len(phases) else 0)
            phase_rng = random.Random(rng.randrange(1 << 32))
            done = [daemon_phase(work, phase_rng, iterations)] if phase == "daemon" else \
                sandbox_phase(work, phase_rng, iterations, phase)
            results += done
            for stats in done:
                print(f"crash_loops: {stats.line()}", flush=True)
    except (CrashLoopFailure, ServerError, VolumeError, subprocess.SubprocessError, OSError) as error:
        print(f"crash_loops: FAILED (seed={seed}): {error}", file=sys.stderr)
        print(f"crash_loops: work directory kept: {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    summary = {s.phase: {"kills": s.iterations, "operations": s.operations, "lost": 0, "lifecycle": s.lifecycle,
                         "recovery_median_s": round(statistics.median(s.recoveries), 2),
                         "recovery_max_s": round(max(s.recoveries), 2)} for s in results if s.recoveries}
    print(f"crash_loops: ok in {time.monotonic() - started:.0f}s: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
