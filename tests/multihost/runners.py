"""The runner-level test bed: one `cellar server` on this machine (control state and volume
metadata on the cluster's PostgreSQL, blocks on its RGW, no embedded runner) and a `cellar runner`
on each host, joined with a runner token; volumes and sandboxes made through the Daytona API."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lib import HARNESS, REPO, TestFailure, check, note, run

SANDBOX_VOLUME = "/home/daytona/volume"


class Server:
    def __init__(self, cluster):
        self.cluster = cluster
        self.data_dir = cluster.work_dir / "server"
        self.data_dir.mkdir()
        with socket.socket() as s:
            s.bind((cluster.addr, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{cluster.addr}:{self.port}"
        self.log = cluster.work_dir / "server.log"
        self.env = {**cluster.cellar_env(), "CELLAR_DATABASE": cluster.postgres_url}
        self.key = None
        self.proc = subprocess.Popen(
            [cluster.cellar, "server", "--listen", f"{cluster.addr}:{self.port}", "--data-dir", self.data_dir,
             "--store", cluster.store_url, "--no-embedded-runner"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self.env,
        )
        cluster.cleanups.append(self.stop)
        deadline = time.monotonic() + 60
        while True:
            check(self.proc.poll() is None, f"cellar server exited {self.proc.returncode} (log: {self.log})")
            match = re.search(r"cellar_[0-9a-f]{64}", self.log.read_text(errors="replace"))
            if match:
                self.key = match.group(0)
                try:
                    self.api("GET", "/api/volumes")
                    break
                except (OSError, TestFailure):
                    pass
            check(time.monotonic() < deadline, f"cellar server not serving within 60 s (log: {self.log})")
            time.sleep(0.2)

    def api(self, method, path, body=None, timeout=120, ok_statuses=(200, 201, 204)):
        request = urllib.request.Request(
            self.url + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode(errors="replace")
        check(status in ok_statuses, f"{method} {path} answered {status}: {text[:500]}")
        return json.loads(text) if text.strip() else None

    def admin(self, *args):
        return run([self.cluster.cellar, "admin", "--data-dir", self.data_dir, *args], timeout=60, env=self.env)

    def runners(self):
        """{name: state} from `cellar admin runner list`."""
        lines = self.admin("runner", "list").stdout.splitlines()[1:]
        return {line.split()[0]: line.split()[1] for line in lines if line.strip()}

    def stop(self):
        if self.proc.poll() is None:
            # Sandboxes outlive a server stop by design: delete them (and wait) first.
            subprocess.run([sys.executable, REPO / "tests/compat/teardown.py"], timeout=300,
                           env={**os.environ, "DAYTONA_API_URL": f"{self.url}/api", "DAYTONA_API_KEY": self.key})
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Runners:
    """A `cellar runner` per host, named hostI, its data directory the host's /var/lib/cellar."""

    def __init__(self, cluster, server, hosts):
        self.cluster = cluster
        self.server = server
        # Printed once on stdout; it reaches the runners only through their environment.
        self.token = server.admin("runner-token", "create", "--name", "multihost").stdout.strip()
        for host in hosts:
            self.start(host)
        self.wait_state(hosts, "live")

    def name(self, host):
        return f"host{host}"

    def start(self, host):
        addr = self.cluster.host_addrs[host - 1]
        run(["bash", HARNESS / "hosts.sh", "spawn", self.cluster.hosts_dir, str(host), "runner",
             self.cluster.cellar, "runner", "--server", self.server.url, "--name", self.name(host),
             "--listen", f"{addr}:3987", "--advertise", f"http://{addr}:3987"],
            timeout=60, env={**self.cluster.cellar_env(), "CELLAR_RUNNER_TOKEN": self.token})

    def wait_state(self, hosts, state, within=60):
        """Waits until the runners of `hosts` are all in `state`; returns the seconds it took."""
        started = time.monotonic()
        while True:
            states = self.server.runners()
            if all(states.get(self.name(h)) == state for h in hosts):
                return time.monotonic() - started
            check(time.monotonic() - started < within,
                  f"runners {[self.name(h) for h in hosts]} not {state} within {within}s: {states} "
                  f"(logs: {self.cluster.hosts_dir}/host*/runner.log)")
            time.sleep(0.2)


class RunnerVolume:
    """A volume made through the API, and a sandbox using it on each of the given hosts (pinned
    to that host's runner). `path(host)` is the runner's FUSE mount of it on that host: the one
    the host's sandboxes see at SANDBOX_VOLUME."""

    def __init__(self, cluster, server, runners, hosts):
        self.cluster = cluster
        self.server = server
        self.runners = runners
        volume = server.api("POST", "/api/volumes", {"name": cluster.new_volume_name()})
        self.id = volume["id"]
        deadline = time.monotonic() + 60
        while volume["state"] != "ready":
            check(time.monotonic() < deadline, f"volume {self.id} is {volume['state']} after 60 s")
            time.sleep(0.2)
            volume = server.api("GET", f"/api/volumes/{self.id}")
        self.sandboxes = {}
        self.paths = {}
        for host in hosts:
            self.add_sandbox(host)

    def add_sandbox(self, host):
        sandbox = self.server.api("POST", "/api/sandbox", {
            "volumes": [{"volumeId": self.id, "mountPath": SANDBOX_VOLUME}],
            "labels": {"cellar.io/runner": self.runners.name(host)},
        })
        deadline = time.monotonic() + 120
        while sandbox["state"] == "creating":
            check(time.monotonic() < deadline, f"sandbox {sandbox['id']} still creating after 120 s")
            time.sleep(0.2)
            sandbox = self.server.api("GET", f"/api/sandbox/{sandbox['id']}")
        check(sandbox["state"] == "started", f"sandbox on host {host} is {sandbox['state']}: {sandbox}")
        check(sandbox.get("runnerId") == self.runners.name(host),
              f"sandbox {sandbox['id']} pinned to {self.runners.name(host)} runs on {sandbox.get('runnerId')}")
        self.sandboxes[host] = sandbox["id"]
        return sandbox["id"]

    def execute(self, host, command, timeout=60):
        """Runs `command` in the volume's sandbox on `host` (toolbox API); returns its output."""
        answer = self.server.api("POST", f"/toolbox/{self.sandboxes[host]}/process/execute",
                                 {"command": command, "timeout": timeout}, timeout=timeout + 30)
        check(answer["exitCode"] == 0, f"sandbox on host {host}: `{command}` exited {answer['exitCode']}: {answer['result']}")
        return answer["result"]

    def path(self, host):
        """The runner's mount of the volume on `host` (found in the host's mount table)."""
        if host not in self.paths:
            table = self.cluster.on(host, ["cat", "/proc/self/mountinfo"]).stdout
            found = [line.split()[4] for line in table.splitlines()
                     if line.split()[4].endswith(f"/mounts/{self.id}") and " - fuse" in line]
            check(len(found) == 1, f"host {host} has {len(found)} mounts of volume {self.id}: {found}")
            self.paths[host] = Path(found[0])
        return self.paths[host]

    def sandbox_state(self, host):
        return self.server.api("GET", f"/api/sandbox/{self.sandboxes[host]}")

    def kill(self, host):
        """Host `host` crashes (its runner, mounts and sandboxes are SIGKILLed at once); the
        server must mark its runner, then its sandbox, lost."""
        self.cluster.kill_host(host)
        killed = time.monotonic()
        self.paths.pop(host, None)
        detected = self.runners.wait_state([host], "lost", within=60)
        sandbox = self.sandbox_state(host)
        check(sandbox["state"] == "error", f"the sandbox of dead host {host} is {sandbox['state']}, not error")
        note(f"host {host} killed: its runner was lost after {detected:.1f}s; its sandbox: {sandbox.get('errorReason')}")
        return killed

    def revive(self, host):
        """The host comes back with its runner (same data directory): it rejoins, and a new
        sandbox on it uses the volume."""
        self.cluster.revive_host(host)
        self.runners.start(host)
        self.runners.wait_state([host], "live")
        self.server.api("DELETE", f"/api/sandbox/{self.sandboxes.pop(host)}", ok_statuses=(200, 204))
        self.add_sandbox(host)

    def unmount_all(self):
        for host, sandbox in list(self.sandboxes.items()):
            self.server.api("DELETE", f"/api/sandbox/{sandbox}", ok_statuses=(200, 204, 404))
        self.sandboxes.clear()

    def fsck(self):
        return self.cluster.fsck(self.id, f"{self.cluster.postgres_url}?volume={self.id}")
