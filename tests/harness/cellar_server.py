"""A real `cellar server` on loopback (blocks on the RGW of tests/harness/rgw.sh, control state and
volume metadata in SQLite files in its data directory, or in a PostgreSQL database: needed by
sandboxes on a `cellar runner`), optionally a `cellar runner` joined to it,
and the sandboxes and volumes of the Daytona API, for the end-to-end suites in tests/fs/ that need
sandboxes (crash_loops.py, soak.py).

Both processes can be killed with SIGKILL and started again on the same data directory: the
bootstrap API key of the first start is kept. Every wait has a timeout. Secrets (S3 keys, the
runner token) reach `cellar` only through its environment.

Environment: CELLAR_TEST_S3_URL (+ AWS keys) from tests/harness/rgw.sh; CELLAR_BIN (default
target/release/cellar).
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SANDBOX_VOLUME = "/home/daytona/volume"


class ServerError(AssertionError):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cellar_bin():
    path = os.environ.get("CELLAR_BIN", str(REPO / "target/release/cellar"))
    if not os.access(path, os.X_OK):
        raise ServerError(f"{path} is not executable: build it (cargo build --release -p cellar-cli) or set CELLAR_BIN")
    return path


def store_url():
    url = os.environ.get("CELLAR_TEST_S3_URL")
    if not url:
        raise ServerError("CELLAR_TEST_S3_URL is not set: start RGW with tests/harness/rgw.sh and source its env "
                          "file (or run tests/run.sh)")
    return url


def rss_kib(pid):
    """VmRSS of a process in KiB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mount_daemon_pids(mount_point):
    """Pids of the `cellar mount` processes serving `mount_point` (one while it is healthy)."""
    target = str(mount_point)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if len(args) > 1 and Path(args[0]).name == "cellar" and args[1] == "mount" and args[-1] == target:
            found.append(int(proc.name))
    return found


def is_mounted(path):
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4].encode().decode("unicode_escape") == target for line in mounts)


def wait_for(what, condition, timeout, interval=0.1):
    """Polls `condition` until it returns something true; returns it, or fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ServerError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class Process:
    """A long-running `cellar` process that logs to a file and can be SIGKILLed and restarted."""

    def __init__(self, argv, env, log):
        self.argv = [str(a) for a in argv]
        self.env = env
        self.log = Path(log)
        self.proc = None

    def start(self):
        # Its own session: a kill of this process alone never reaches what it started.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL; returns once the process is gone."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout=60):
        """SIGTERM, then SIGKILL after `timeout` s."""
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    @property
    def pid(self):
        return self.proc.pid


class CellarServer:
    """`cellar server` on a free loopback port with its data directory under work_dir; with
    `embedded_runner=False` only runners that join run sandboxes."""

    def __init__(self, work_dir, embedded_runner=True, runner_timeout="10s", database=None):
        """`database`: a PostgreSQL URL for the control state and the volumes' metadata."""
        self.work_dir = Path(work_dir)
        self.database = database
        self.data_dir = self.work_dir / "server"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cellar = cellar_bin()
        self.store = store_url()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "CELLAR_BIN": self.cellar}
        if database:
            self.env["CELLAR_DATABASE"] = database
        argv = [self.cellar, "server", "--listen", f"127.0.0.1:{self.port}", "--data-dir", self.data_dir,
                "--store", self.store, "--runner-timeout", runner_timeout]
        if not embedded_runner:
            argv.append("--no-embedded-runner")
        self.process = Process(argv, self.env, self.work_dir / "server.log")
        self.key = None

    # ---- the process

    def start(self, timeout=60):
        """Starts the server and waits until its API answers (the first start prints the key)."""
        self.process.start()
        started = time.monotonic()
        while True:
            if not self.process.alive():
                raise ServerError(f"cellar server exited {self.process.proc.returncode} (log: {self.process.log})")
            if self.key is None:
                match = re.search(r"cellar_[0-9a-f]{64}", self.process.log.read_text(errors="replace"))
                self.key = match.group(0) if match else None
            if self.key is not None and self.answers():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise ServerError(f"cellar server not serving within {timeout} s (log: {self.process.log})")
            time.sleep(0.05)

    def answers(self):
        try:
            self.api("GET", "/api/volumes", timeout=5)
            return True
        except (OSError, ServerError):
            return False

    def kill(self):
        self.process.kill()

    def restart(self):
        """SIGKILLs a live server and starts it again; returns the seconds until it answered."""
        self.kill()
        return self.start()

    @property
    def pid(self):
        return self.process.pid

    # ---- the API

    def api(self, method, path, body=None, timeout=120, ok=(200, 201, 204), raw=None, content_type=None):
        """Calls the API; returns the decoded JSON answer (or None). `raw`: bytes to send as is."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Authorization": f"Bearer {self.key}",
                   "Content-Type": content_type or "application/json"}
        request = urllib.request.Request(self.url + path, method=method, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        if status not in ok:
            raise ServerError(f"{method} {path} answered {status}: {text[:500].decode(errors='replace')}")
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    def create_volume(self, name, timeout=60):
        volume = self.api("POST", "/api/volumes", {"name": name})
        wait_for(f"volume {name} ready",
                 lambda: self.api("GET", f"/api/volumes/{volume['id']}")["state"] == "ready", timeout, 0.2)
        return volume["id"]

    def create_sandbox(self, volume_id, runner=None, timeout=120):
        """A sandbox (no network) with the volume at SANDBOX_VOLUME; returns its id once started."""
        body = {"volumes": [{"volumeId": volume_id, "mountPath": SANDBOX_VOLUME}], "networkBlockAll": True}
        if runner:
            body["labels"] = {"cellar.io/runner": runner}
        sandbox = self.api("POST", "/api/sandbox", body, timeout=timeout)
        state = wait_for(f"sandbox {sandbox['id']} started", lambda: self.sandbox_state(sandbox["id"], "creating"),
                         timeout, 0.2)
        if state != "started":
            raise ServerError(f"sandbox {sandbox['id']} is {state}: {self.api('GET', '/api/sandbox/' + sandbox['id'])}")
        return sandbox["id"]

    def sandbox_state(self, sandbox_id, unless=None):
        """The sandbox's state; None while it is `unless`."""
        state = self.api("GET", f"/api/sandbox/{sandbox_id}")["state"]
        return None if state == unless else state

    def delete_sandbox(self, sandbox_id, timeout=120):
        self.api("DELETE", f"/api/sandbox/{sandbox_id}", ok=(200, 204, 404))

        def gone():
            try:
                return self.sandbox_state(sandbox_id) == "destroyed"
            except ServerError as error:
                return "404" in str(error)
        wait_for(f"sandbox {sandbox_id} destroyed", gone, timeout, 0.2)

    def execute(self, sandbox_id, command, timeout=120, check=True):
        """Runs a shell line in the sandbox; returns (exit code, output)."""
        answer = self.api("POST", f"/toolbox/{sandbox_id}/process/execute", {"command": command, "timeout": timeout},
                          timeout=timeout + 30)
        if check and answer["exitCode"] != 0:
            raise ServerError(f"sandbox {sandbox_id}: `{command[:200]}` exited {answer['exitCode']}: "
                              f"{answer['result'][-2000:]}")
        return answer["exitCode"], answer["result"]

    def upload(self, volume_id, path, data, timeout=120):
        """Writes a file through the server's volume file API (parents created)."""
        query = urllib.parse.urlencode({"path": path, "parents": "true"})
        self.api("PUT", f"/api/volumes/{volume_id}/files/content?{query}", raw=data,
                 content_type="application/octet-stream", timeout=timeout)

    def download(self, volume_id, path, timeout=120):
        query = urllib.parse.urlencode({"path": path})
        request = urllib.request.Request(f"{self.url}/api/volumes/{volume_id}/files/content?{query}",
                                         headers={"Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def volume_meta_url(self, volume_id):
        if self.database:
            return f"{self.database}{'&' if '?' in self.database else '?'}volume={volume_id}"
        return f"sqlite://{self.data_dir / 'volumes' / (volume_id + '.db')}"

    def cellar_run(self, volume_id, *args, timeout=600):
        """Runs `cellar ARGS --store S --volume ID` on a volume of this server; returns (code, output)."""
        result = subprocess.run([self.cellar, *args, "--store", self.store, "--volume", volume_id],
                                capture_output=True, text=True, timeout=timeout,
                                env={**self.env, "CELLAR_META_URL": self.volume_meta_url(volume_id)})
        return result.returncode, (result.stdout + result.stderr).strip()

    def teardown(self, sandboxes=()):
        """Deletes the given sandboxes (a server keeps sandboxes across its own stops), then stops
        the server; whatever outlived it (processes naming a data directory, mounts under it) ends."""
        for sandbox_id in sandboxes:
            try:
                if self.process.alive():
                    self.delete_sandbox(sandbox_id)
            except ServerError as error:
                print(f"teardown: {error}", flush=True)
        self.process.stop()
        subprocess.run(["bash", "-c", f'source "{REPO}/tests/harness/server.sh" && server_end_leftovers "$1"',
                        "end", str(self.work_dir)], timeout=120)


class CellarRunner:
    """`cellar runner` on a free loopback port, joined to `server` with a runner token."""

    def __init__(self, server, name="runner1"):
        self.server = server
        self.name = name
        self.data_dir = server.work_dir / name
        token = subprocess.run([server.cellar, "admin", "--data-dir", server.data_dir, "runner-token", "create",
                                "--name", name], capture_output=True, text=True, timeout=60, env=server.env)
        if token.returncode != 0:
            raise ServerError(f"cellar admin runner-token create: {token.stderr.strip()}")
        port = free_port()
        self.process = Process(
            [server.cellar, "runner", "--server", server.url, "--name", name, "--listen", f"127.0.0.1:{port}",
             "--data-dir", self.data_dir],
            {**server.env, "CELLAR_RUNNER_TOKEN": token.stdout.strip()},
            server.work_dir / f"{name}.log",
        )

    def state(self):
        """The runner's state as the server lists it (`live`, `lost`), None if not listed."""
        listed = subprocess.run([self.server.cellar, "admin", "--data-dir", self.server.data_dir, "runner", "list"],
                                capture_output=True, text=True, timeout=60, env=self.server.env).stdout
        for line in listed.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.name:
                return fields[1]
        return None

    def registrations(self):
        try:
            return self.process.log.read_text(errors="replace").count("registered with the server")
        except FileNotFoundError:
            return 0

    def start(self, timeout=60):
        """Starts the runner; returns once it registered (so the server can call it) and the
        server lists it live."""
        before = self.registrations()
        self.process.start()
        started = time.monotonic()
        wait_for(f"runner {self.name} registered (log: {self.process.log})",
                 lambda: not self.process.alive() or (self.registrations() > before and self.state() == "live"),
                 timeout, 0.1)
        if not self.process.alive():
            raise ServerError(f"cellar runner exited {self.process.proc.returncode} (log: {self.process.log})")
        return time.monotonic() - started

    def kill(self):
        self.process.kill()

    @property
    def pid(self):
        return self.process.pid
