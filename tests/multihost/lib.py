"""The multi-host test bed: N hosts (tests/harness/hosts.sh: network + mount + PID namespaces),
one PostgreSQL and one Ceph RGW listening on this machine's address on the hosts' network, and
volumes mounted on the hosts, either by `cellar mount` processes started on each host
(`MountVolume`) or by `cellar runner`s joined to one `cellar server` (`RunnerVolume`, in
tests/multihost/runners.py).

Every wait has a timeout: a hung mount fails the test instead of hanging it. Secrets (the database
password, S3 keys) reach `cellar` only through its environment.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "tests/harness"
WORKER = REPO / "tests/multihost/worker.py"


class TestFailure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise TestFailure(message)


def note(message):
    print(f"multihost: {message}", flush=True)


def read_env(path):
    """The `export NAME=VALUE` lines of a harness env file (values possibly single-quoted)."""
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.removeprefix("export ").strip()
        if "=" in line:
            name, value = line.split("=", 1)
            env[name] = value[1:-1] if value[:1] == "'" and value[-1:] == "'" else value
    return env


def run(argv, timeout, env=None, check_status=True):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check_status and result.returncode != 0:
        raise TestFailure(
            f"`{' '.join(map(str, argv[:6]))}` exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return result


class Cluster:
    """Hosts 1..n, PostgreSQL and RGW. Use as a context manager: everything is torn down on exit,
    also after a failure or SIGTERM (tests/run.sh's timeout)."""

    def __init__(self, work_dir, n_hosts=3, meta="postgres"):
        """meta: where volumes keep their metadata: "postgres", or "sqlite" (one database file
        per volume in the work directory, shared by the hosts: possible only because these hosts
        share one kernel; it compares the local change feed with PostgreSQL's)."""
        check(meta in ("postgres", "sqlite"), f"unknown metadata engine {meta}")
        self.meta = meta
        self.work_dir = Path(work_dir)
        self.n_hosts = n_hosts
        self.hosts_dir = self.work_dir / "hosts"
        self.pg_dir = self.work_dir / "pg"
        self.rgw_dir = self.work_dir / "rgw"
        self.cellar = os.environ.get("CELLAR_BIN", str(REPO / "target/release/cellar"))
        if not os.access(self.cellar, os.X_OK):
            raise TestFailure(f"{self.cellar} is not executable: build it (cargo build --release -p cellar-cli) or set CELLAR_BIN")
        self.env = {}
        self.cleanups = []

    def __enter__(self):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit("multihost: terminated"))
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_):
        self.stop()

    def start(self):
        started = time.monotonic()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work_dir, 0o755)  # PostgreSQL runs as user postgres
        run(["bash", HARNESS / "hosts.sh", "start", self.hosts_dir, str(self.n_hosts)], timeout=120)
        hosts = read_env(self.hosts_dir / "env")
        self.addr = hosts["HOSTS_ADDR"]
        self.host_addrs = [hosts[f"HOST{i}_ADDR"] for i in range(1, self.n_hosts + 1)]
        run(["bash", HARNESS / "postgres.sh", "start", self.pg_dir, "--listen", hosts["HOSTS_CIDR"]], timeout=120)
        run(["bash", HARNESS / "rgw.sh", "start", self.rgw_dir, "--listen", self.addr], timeout=600)
        pg = read_env(self.pg_dir / "env")
        rgw = read_env(self.rgw_dir / "env")
        # This machine reaches the hosts' network too: one URL of each service serves everyone.
        self.postgres_url = pg["CELLAR_TEST_POSTGRES_HOSTS_URL"]
        self.store_url = rgw["CELLAR_TEST_S3_HOSTS_URL"]
        self.env = {
            "AWS_ACCESS_KEY_ID": rgw["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": rgw["AWS_SECRET_ACCESS_KEY"],
        }
        note(f"{self.n_hosts} hosts, PostgreSQL and RGW on {self.addr} up in {time.monotonic() - started:.1f}s")

    def stop(self):
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as error:  # the rest must still be torn down
                note(f"cleanup: {error}")
        self.cleanups.clear()
        subprocess.run(["bash", HARNESS / "hosts.sh", "stop", self.hosts_dir], timeout=120)
        subprocess.run(["bash", HARNESS / "rgw.sh", "stop", self.rgw_dir], timeout=120)
        subprocess.run(["bash", HARNESS / "postgres.sh", "stop", self.pg_dir], timeout=120)

    # ---- running things on the hosts (1-based host numbers)

    def host_dir(self, host):
        return self.hosts_dir / f"host{host}"

    def cellar_env(self, meta_url=None):
        env = {**os.environ, **self.env}
        if meta_url:
            env["CELLAR_META_URL"] = meta_url
        return env

    def on(self, host, argv, timeout=120, env=None, check_status=True):
        """Runs argv on `host` to completion."""
        return run(["bash", HARNESS / "hosts.sh", "exec", self.hosts_dir, str(host), *map(str, argv)],
                   timeout=timeout, env=env, check_status=check_status)

    def start_on(self, host, argv, env=None):
        """Starts argv on `host`; the caller waits for (or kills) the returned Popen."""
        return subprocess.Popen(
            ["bash", HARNESS / "hosts.sh", "exec", self.hosts_dir, str(host), *map(str, argv)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def worker(self, host):
        worker = Worker(self, host)
        self.cleanups.append(worker.close)
        return worker

    def run_everywhere(self, commands, timeout):
        """Runs {host: argv} (a list of (host, argv)) at once; returns their outputs; fails if any
        fails or all have not finished within timeout."""
        procs = [(host, argv, self.start_on(host, argv)) for host, argv in commands]
        deadline = time.monotonic() + timeout
        outputs = []
        failures = []
        for host, argv, proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for _, _, p in procs:
                    p.kill()
                raise TestFailure(f"host {host}: `{' '.join(map(str, argv[:4]))}` still running after {timeout}s")
            if proc.returncode != 0:
                failures.append(f"host {host}: `{' '.join(map(str, argv[:4]))}` exited {proc.returncode}: {err.strip()[-1500:]}")
            outputs.append(out)
        check(not failures, "; ".join(failures))
        return outputs

    def kill_host(self, host):
        run(["bash", HARNESS / "hosts.sh", "kill", self.hosts_dir, str(host)], timeout=60)

    def revive_host(self, host):
        run(["bash", HARNESS / "hosts.sh", "revive", self.hosts_dir, str(host)], timeout=60)

    def new_volume_name(self):
        return f"mh-{uuid.uuid4().hex[:10]}"

    def volume_meta_url(self, name):
        if self.meta == "sqlite":
            return f"sqlite://{self.work_dir / ('meta-' + name + '.db')}"
        return f"{self.postgres_url}?volume={name}"

    def fsck(self, name, meta_url=None):
        """`cellar fsck` of a volume, from this machine; returns (exit code, output)."""
        result = run([self.cellar, "fsck", "--store", self.store_url, "--volume", name], timeout=600,
                     env=self.cellar_env(meta_url or self.volume_meta_url(name)), check_status=False)
        return result.returncode, (result.stdout + result.stderr).strip()


class Worker:
    """tests/multihost/worker.py serve, running on a host: call(op, **args) -> result."""

    def __init__(self, cluster, host):
        self.host = host
        self.proc = cluster.start_on(host, ["python3", WORKER, "serve"])

    def call(self, op, timeout=60, **args):
        self.send(op, **args)
        return self.receive(op, timeout, args.get("path", ""))

    def send(self, op, **args):
        """Sends a request without waiting for its answer (receive() it later)."""
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, op, timeout=60, what=""):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TestFailure(f"host {self.host}: {op} {what} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise TestFailure(f"host {self.host}: worker died: {self.proc.stderr.read()[-1500:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(self.host, op, answer["error"], answer["errno"])
        return answer["ok"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class WorkerError(TestFailure):
    def __init__(self, host, op, message, errno):
        super().__init__(f"host {host}: {op}: {message}")
        self.errno = errno


class MountVolume:
    """One volume, mounted by a `cellar mount` process on each of the given hosts at
    DIR/hostI/mnt-NAME. `path(host)` is where it is mounted on that host."""

    def __init__(self, cluster, hosts, meta_url=None, name=None):
        self.cluster = cluster
        self.name = name or cluster.new_volume_name()
        self.meta_url = meta_url or cluster.volume_meta_url(self.name)
        self.hosts = list(hosts)
        self.mounted = set()
        cluster.cleanups.append(self.unmount_all)
        for host in self.hosts:
            self.mount(host)

    def path(self, host):
        return self.cluster.host_dir(host) / f"mnt-{self.name}"

    def mount(self, host):
        mnt = self.path(host)
        mnt.mkdir(exist_ok=True)
        self.cluster.on(host, [self.cluster.cellar, "mount", "--store", self.cluster.store_url, "--volume", self.name,
                               "--log-file", self.cluster.host_dir(host) / f"mount-{self.name}.log", mnt],
                        env=self.cluster.cellar_env(self.meta_url), timeout=120)
        self.mounted.add(host)

    def unmount(self, host):
        self.cluster.on(host, [self.cluster.cellar, "umount", self.path(host)], timeout=120)
        self.mounted.discard(host)

    def forget(self, host):
        """The host crashed: its mount is gone with it."""
        self.mounted.discard(host)

    def unmount_all(self):
        for host in sorted(self.mounted):
            self.unmount(host)

    def fsck(self):
        return self.cluster.fsck(self.name, self.meta_url)


def fresh_work_dir(prefix):
    parent = Path(os.environ.get("TMPDIR", "/tmp"))
    work = parent / f"{prefix}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    return work


def remove_work_dir(work):
    shutil.rmtree(work, ignore_errors=True)
