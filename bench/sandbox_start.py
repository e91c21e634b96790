"""Sandbox start time against a running Cellar server: the measuring half of bench/sandbox_start.sh.

Each run: POST /api/sandbox (body {} or one volume mounted at /home/daytona/vol), then, if the
answer is still `creating`, GET /api/sandbox/{id} until `started`. The wall time from sending the
create request to seeing `started` is the run's time. Not timed: checking the sandbox runs
(POST /toolbox/{id}/process/execute `true`, exit code 0) and deleting it (DELETE, then GET until
`destroyed` or 404). Prints each run, then min/median/p90/max in ms and one machine-readable line:

    sandbox_start_ms volume=0 runs=20 min=… median=… p90=… max=…

Median: the mean of the two middle values for an even count. p90: nearest rank (ceil(0.9 n)-th
smallest, the 18th of 20). Plain python3 stdlib.

Usage: python3 sandbox_start.py --url http://127.0.0.1:PORT --key KEY [--runs 20] [--volume]
       [--warmup 0]   (the API key may also come from SANDBOX_START_API_KEY)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import urllib.error
import urllib.request

MOUNT_PATH = "/home/daytona/vol"
TIMEOUT = 120.0  # seconds, for a sandbox to start or to be destroyed, and for a volume to be ready


class Api:
    def __init__(self, base: str, key: str):
        self.base = base.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, raw.decode(errors="replace")


def fail(message: str) -> None:
    raise SystemExit(f"sandbox_start: {message}")


def make_volume(api: Api) -> str:
    name = f"bench-start-{os.getpid()}-{int(time.time())}"
    status, volume = api.request("POST", "/api/volumes", {"name": name})
    if status != 200:
        fail(f"POST /api/volumes answered {status}: {volume}")
    deadline = time.monotonic() + TIMEOUT
    while volume.get("state") != "ready":
        if volume.get("state") == "error":
            fail(f"volume {name} is in error: {volume.get('errorReason')}")
        if time.monotonic() > deadline:
            fail(f"volume {name} not ready after {TIMEOUT:.0f} s (state {volume.get('state')})")
        time.sleep(0.05)
        status, volume = api.request("GET", f"/api/volumes/{volume['id']}")
        if status != 200:
            fail(f"GET /api/volumes/{volume} answered {status}")
    print(f"volume {name} ({volume['id']}) ready; each sandbox mounts it at {MOUNT_PATH}")
    return volume["id"]


def one_run(api: Api, body: dict) -> float:
    start = time.monotonic()
    status, sandbox = api.request("POST", "/api/sandbox", body)
    if status != 200:
        fail(f"POST /api/sandbox answered {status}: {sandbox}")
    sandbox_id = sandbox["id"]
    while sandbox.get("state") != "started":
        if sandbox.get("state") == "error":
            fail(f"sandbox {sandbox_id} is in error: {sandbox.get('errorReason')}")
        if time.monotonic() - start > TIMEOUT:
            fail(f"sandbox {sandbox_id} not started after {TIMEOUT:.0f} s (state {sandbox.get('state')})")
        time.sleep(0.01)
        status, sandbox = api.request("GET", f"/api/sandbox/{sandbox_id}")
        if status != 200:
            fail(f"GET /api/sandbox/{sandbox_id} answered {status}: {sandbox}")
    elapsed_ms = (time.monotonic() - start) * 1000.0

    # Not timed: it runs, then it is gone.
    status, result = api.request("POST", f"/toolbox/{sandbox_id}/process/execute", {"command": "true"})
    if status != 200 or (result or {}).get("exitCode") != 0:
        fail(f"process/execute `true` in {sandbox_id} answered {status}: {result}")
    if body.get("volumes"):
        probe = f"test -d {MOUNT_PATH} && grep -q ' {MOUNT_PATH} ' /proc/mounts"
        status, result = api.request("POST", f"/toolbox/{sandbox_id}/process/execute", {"command": probe})
        if status != 200 or (result or {}).get("exitCode") != 0:
            fail(f"{MOUNT_PATH} is not a mount in {sandbox_id}: {status} {result}")
    status, _ = api.request("DELETE", f"/api/sandbox/{sandbox_id}")
    if status != 200:
        fail(f"DELETE /api/sandbox/{sandbox_id} answered {status}")
    deadline = time.monotonic() + TIMEOUT
    while True:
        status, sandbox = api.request("GET", f"/api/sandbox/{sandbox_id}")
        if status == 404 or (sandbox or {}).get("state") == "destroyed":
            break
        if time.monotonic() > deadline:
            fail(f"sandbox {sandbox_id} not destroyed after {TIMEOUT:.0f} s")
        time.sleep(0.05)
    return elapsed_ms


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:3000")
    parser.add_argument("--key", default=os.environ.get("SANDBOX_START_API_KEY"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs before the measured ones")
    parser.add_argument("--volume", action="store_true", help=f"mount one volume at {MOUNT_PATH}")
    args = parser.parse_args()
    if not args.key:
        fail("no API key (--key or SANDBOX_START_API_KEY)")
    if args.runs < 1:
        fail("--runs must be at least 1")

    api = Api(args.url, args.key)
    body: dict = {}
    if args.volume:
        body = {"volumes": [{"volumeId": make_volume(api), "mountPath": MOUNT_PATH}]}

    for i in range(args.warmup):
        print(f"warm-up {i + 1}/{args.warmup}: {one_run(api, body):8.1f} ms (not counted)", flush=True)
    times = []
    for i in range(args.runs):
        ms = one_run(api, body)
        times.append(ms)
        print(f"run {i + 1:2d}/{args.runs}: {ms:8.1f} ms", flush=True)

    low, med, high, p = min(times), statistics.median(times), max(times), p90(times)
    mode = "one volume" if args.volume else "no volume"
    print(f"sandbox start ({mode}), {len(times)} runs: "
          f"min {low:.1f} ms, median {med:.1f} ms, p90 {p:.1f} ms, max {high:.1f} ms")
    print(f"sandbox_start_ms volume={int(args.volume)} runs={len(times)} "
          f"min={low:.1f} median={med:.1f} p90={p:.1f} max={high:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
