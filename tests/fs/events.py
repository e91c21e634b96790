#!/usr/bin/env python3
"""Change events end to end: a real `cellar server` (blocks on the test RGW; metadata in SQLite
files, or in PostgreSQL with CELLAR_TEST_META=postgres), a volume made through its API and
FUSE-mounted by `cellar mount` (another process, as the runners mount volumes), a writer closing
files in the mount, and subscribers of `GET /api/volumes/{id}/events` (server-sent events):

- created, modified, renamed (with oldPath) and removed events of what the writer did, in order;
- `?path=` filters (a rename out of the watched directory is seen, nothing else outside it);
- a stream resumed from an id (Last-Event-ID) gets exactly what it missed, then live events;
- an id older than the trimmed log gives one `lost` event, then live events.

Library: `Setup` (server + volume + mount) and `EventStream` (an SSE client) serve
bench/events.py too.
"""

import http.client
import json
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from volume import REPO, is_mounted, meta_engine  # noqa: E402

# A loaded machine is slow; an event never takes this long.
EVENT_WAIT = 30


class Failure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_url():
    """The test bucket, under a prefix of this run's own."""
    base = os.environ.get("CELLAR_TEST_S3_URL")
    if not base:
        raise Failure("CELLAR_TEST_S3_URL is not set: start tests/harness/rgw.sh and source its env")
    url = urllib.parse.urlsplit(base)
    path = f"{url.path.rstrip('/')}/events-{secrets.token_hex(4)}"
    return urllib.parse.urlunsplit((url.scheme, url.netloc, path, url.query, ""))


class Setup:
    """A server with one ready volume, FUSE-mounted in another process."""

    def __init__(self, work):
        self.work = Path(work)
        self.cellar = os.environ.get("CELLAR_BIN", str(REPO / "target/release/cellar"))
        self.port = free_port()
        self.data_dir = self.work / "server"
        self.env = dict(os.environ)
        self.database = None
        if meta_engine() == "postgres":
            self.database = self.fresh_database()
            self.env["CELLAR_DATABASE"] = self.database
        self.store = store_url()
        self.server_log = self.work / "server.log"
        with open(self.server_log, "w") as log:
            self.server = subprocess.Popen(
                [self.cellar, "server", "--listen", f"127.0.0.1:{self.port}",
                 "--data-dir", str(self.data_dir), "--store", self.store, "--no-embedded-runner"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        self.key = self.bootstrap_key()
        self.volume = self.create_volume("events")
        self.mount_point = self.work / "mnt"
        self.mount_point.mkdir()
        self.mount_log = self.work / "mount.log"
        subprocess.run(
            [self.cellar, "mount", "--store", self.store, "--volume", self.volume,
             "--log-file", str(self.mount_log), str(self.mount_point)],
            check=True, env={**self.env, "CELLAR_META_URL": self.meta_url()}, timeout=120,
        )
        check(is_mounted(self.mount_point), f"{self.mount_point} is not mounted")

    @staticmethod
    def fresh_database():
        base = os.environ["CELLAR_TEST_POSTGRES_URL"]
        name = f"events_{secrets.token_hex(4)}"
        subprocess.run(["psql", base, "-qc", f"CREATE DATABASE {name}"], check=True,
                       capture_output=True)
        url = urllib.parse.urlsplit(base)
        return urllib.parse.urlunsplit((url.scheme, url.netloc, f"/{name}", url.query, ""))

    def meta_url(self):
        if self.database:
            sep = "&" if "?" in self.database else "?"
            return f"{self.database}{sep}volume={self.volume}"
        return f"sqlite://{self.data_dir / 'volumes' / (self.volume + '.db')}"

    def bootstrap_key(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            check(self.server.poll() is None, f"the server exited; see {self.server_log}")
            for word in re.findall(r"cellar_[0-9a-f]{64}", self.server_log.read_text()):
                try:
                    self.request("GET", "/api/volumes", key=word)
                    return word
                except (OSError, Failure):
                    pass
            time.sleep(0.1)
        raise Failure(f"the server did not start; see {self.server_log}")

    def request(self, method, path, body=None, key=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {key or self.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
            return json.loads(text) if text else None

    def create_volume(self, name):
        volume = self.request("POST", "/api/volumes", {"name": name})
        deadline = time.time() + 60
        while volume["state"] != "ready":
            check(time.time() < deadline, f"volume never ready: {volume}")
            time.sleep(0.1)
            volume = self.request("GET", f"/api/volumes/{volume['id']}")
        return volume["id"]

    def subscribe(self, path=None, last_event_id=None, after=None):
        query = {}
        if path:
            query["path"] = path
        if after is not None:
            query["after"] = str(after)
        target = f"/api/volumes/{self.volume}/events"
        if query:
            target += "?" + urllib.parse.urlencode(query)
        return EventStream(self.port, target, self.key, last_event_id)

    def trim_log(self):
        """Trims the whole change log, as the mount holding the maintenance lease does with
        changes older than the retention."""
        if self.database:
            sql = (f'SET search_path TO "vol_{self.volume}"; '
                   "UPDATE counters SET value = (SELECT max(seq) FROM changes) WHERE name = 'trimmed_changes'; "
                   "DELETE FROM changes;")
            subprocess.run(["psql", self.database, "-qc", sql], check=True, capture_output=True)
            return
        import sqlite3
        db = sqlite3.connect(self.data_dir / "volumes" / f"{self.volume}.db", timeout=30)
        with db:
            db.execute("UPDATE counters SET value = (SELECT max(seq) FROM changes) "
                       "WHERE name = 'trimmed_changes'")
            db.execute("DELETE FROM changes")
        db.close()

    def close(self):
        if is_mounted(self.mount_point):
            subprocess.run([self.cellar, "umount", str(self.mount_point)], timeout=120,
                           capture_output=True)
            if is_mounted(self.mount_point):
                subprocess.run(["fusermount3", "-uz", str(self.mount_point)], capture_output=True)
        if self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        if self.database:
            name = urllib.parse.urlsplit(self.database).path.lstrip("/")
            subprocess.run(["psql", os.environ["CELLAR_TEST_POSTGRES_URL"], "-qc",
                            f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True)


class EventStream:
    """A server-sent event client: a thread parses the stream into a queue of
    (arrival time, event dict with id, event, data)."""

    def __init__(self, port, target, key, last_event_id=None):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=EVENT_WAIT * 4)
        headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.connection.request("GET", target, headers=headers)
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            raise Failure(f"GET {target}: {self.response.status} {self.response.read()!r}")
        self.events = queue.Queue()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        event = {}
        try:
            while True:
                line = self.response.readline()
                if not line:
                    break
                line = line.decode().rstrip("\n")
                if not line:
                    if "data" in event:
                        event["data"] = json.loads(event["data"])
                        event["id"] = int(event["id"])
                        self.events.put((time.monotonic(), event))
                    event = {}
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    event[field] = value[1:] if value.startswith(" ") else value
        except (OSError, ValueError, AttributeError):
            pass  # closed (http.client raises AttributeError when its socket goes mid-read)
        self.events.put((time.monotonic(), None))

    def next(self, timeout=EVENT_WAIT):
        try:
            arrived, event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise Failure(f"no event within {timeout} s") from None
        check(event is not None, "the event stream ended")
        return arrived, event

    def until(self, done):
        """Events up to and with the first that `done` accepts."""
        events = []
        while True:
            event = self.next()[1]
            events.append(event)
            if done(event):
                return events

    def close(self):
        try:
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()


def kinds(events):
    return [(e["event"], e["data"].get("path"), e["data"].get("oldPath")) for e in events]


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def run(setup):
    mnt = setup.mount_point
    everything = setup.subscribe()
    watched = setup.subscribe(path="/out")

    os.mkdir(mnt / "out")
    os.mkdir(mnt / "elsewhere")
    write(mnt / "out" / "a.txt", b"first")          # created, modified
    write(mnt / "out" / "a.txt", b"second version")  # modified (O_TRUNC, then the data)
    os.rename(mnt / "out" / "a.txt", mnt / "out" / "b.txt")
    write(mnt / "elsewhere" / "x", b"x")
    os.rename(mnt / "out" / "b.txt", mnt / "elsewhere" / "b.txt")  # moved out of /out
    os.unlink(mnt / "elsewhere" / "b.txt")
    os.mkdir(mnt / "out" / "done")

    events = everything.until(lambda e: e["data"]["path"] == "/out/done")
    seen = kinds(events)
    want = [
        ("created", "/out", None),
        ("created", "/elsewhere", None),
        ("created", "/out/a.txt", None),
        ("modified", "/out/a.txt", None),
        ("renamed", "/out/b.txt", "/out/a.txt"),
        ("created", "/elsewhere/x", None),
        ("renamed", "/elsewhere/b.txt", "/out/b.txt"),
        ("removed", "/elsewhere/b.txt", None),
        ("created", "/out/done", None),
    ]
    rest = iter(seen)
    check(all(w in rest for w in want), f"expected {want} in order, got {seen}")
    ids = [e["id"] for e in events]
    check(ids == sorted(set(ids)), f"ids ascend: {ids}")
    by = {(e["event"], e["data"]["path"]): e["data"] for e in events}
    check(by[("created", "/out")]["isDir"] is True, f"{by[('created', '/out')]}")
    sizes = [e["data"].get("size") for e in events
             if e["event"] == "modified" and e["data"]["path"] == "/out/a.txt"]
    # A size is the file's as the server read the change: absent if the file was gone by then
    # (a loaded server reads the log after the unlink below), else one the file had.
    check(sizes and all(size in (None, 0, 5, 14) for size in sizes), f"sizes of /out/a.txt: {sizes}")
    check("size" not in by[("removed", "/elsewhere/b.txt")], "a removed file has no size")
    print(f"all kinds, in order: {len(events)} events")

    filtered = watched.until(lambda e: e["data"]["path"] == "/out/done")
    under = lambda p: p is not None and (p == "/out" or p.startswith("/out/"))  # noqa: E731
    check(all(under(e["data"]["path"]) or under(e["data"].get("oldPath")) for e in filtered),
          f"only /out: {kinds(filtered)}")
    check(("renamed", "/elsewhere/b.txt", "/out/b.txt") in kinds(filtered),
          f"a move out of /out is seen: {kinds(filtered)}")
    check(not any(e["data"]["path"].startswith("/elsewhere/x") for e in filtered), "no /elsewhere/x")
    print(f"path filter: {len(filtered)} events, all under /out")

    # Resume: the stream goes away, the writer goes on, a new stream resumes from the last id.
    last = filtered[3]["id"]
    missed = kinds(filtered[4:])
    watched.close()
    everything.close()
    resumed = setup.subscribe(path="/out", last_event_id=last)
    replay = resumed.until(lambda e: e["data"]["path"] == "/out/done")
    check(kinds(replay) == missed, f"resumed after {last}: {kinds(replay)} != {missed}")
    write(mnt / "out" / "live", b"live")
    live = resumed.until(lambda e: e["event"] == "modified" and e["data"]["path"] == "/out/live")
    check(live[0]["event"] == "created" and live[0]["id"] > replay[-1]["id"], f"{kinds(live)}")
    resumed.close()
    print(f"resumed after id {last}: {len(replay)} missed events, then live ones")

    # Lost: the log was trimmed past the client's id.
    setup.trim_log()
    stale = setup.subscribe(path="/out", after=last)
    lost = stale.next()[1]
    check(lost["event"] == "lost", f"expected lost, got {lost}")
    check(lost["data"]["resumeAfter"] == lost["id"] and "rescan" in lost["data"]["message"], f"{lost}")
    os.unlink(mnt / "out" / "live")
    after_lost = stale.next()[1]
    check((after_lost["event"], after_lost["data"]["path"]) == ("removed", "/out/live"), f"{after_lost}")
    stale.close()
    print(f"an id before the trimmed log: lost (resume after {lost['id']}), then live events")


def main():
    work = Path(tempfile.mkdtemp(prefix="events-"))
    setup = None
    try:
        setup = Setup(work)
        run(setup)
    except BaseException:
        if setup:
            for log in (setup.server_log, setup.mount_log):
                if log.exists():
                    print(f"--- {log}", file=sys.stderr)
                    text = re.sub(r"cellar_[0-9a-f]{64}", "cellar_<redacted>", log.read_text())
                    print(text[-4000:], file=sys.stderr)
        raise
    finally:
        if setup:
            setup.close()
    shutil.rmtree(work, ignore_errors=True)
    print("events: ok")


if __name__ == "__main__":
    main()
