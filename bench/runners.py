"""Sandboxes across runners: the measuring half of bench/runners.sh.

1. Start rate: N sandboxes (`{}` bodies) created by C concurrent clients against a server whose
   runners are `cellar runner` processes; the wall time from the first request to the last sandbox
   `started` gives sandboxes started per second. Prints how many landed on each runner.
2. Dead-runner detection: after `kill -9` of a runner (done by runners.sh, which then tells this
   script the time of the kill through a file), the time until a sandbox of that runner reads
   `error` ("runner ... lost") through the API, polled every 20 ms.

Prints machine-readable lines:

    runners_start sandboxes=N concurrency=C runners=R seconds=… per_second=… spread=a:…,b:…
    runner_detect_ms timeout_ms=… run=i ms=…

Plain python3 stdlib.

Usage: python3 runners.py start --url URL --count N --concurrency C
       python3 runners.py pin --url URL --runner NAME          (prints the new sandbox's id)
       python3 runners.py detect --url URL --sandbox ID --killed-at EPOCH_SECONDS
       python3 runners.py destroy-all --url URL
       (the API key comes from RUNNERS_API_KEY)
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import sys
import time

import sandbox_start  # same directory: the Daytona API client of the other benchmark
from sandbox_start import TIMEOUT


class Api(sandbox_start.Api):
    """The benchmark client of sandbox_start.py, plus waiting for a sandbox state."""

    def wait_state(self, sandbox_id: str, want: str, poll: float = 0.05) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, sandbox = self.request("GET", f"/api/sandbox/{sandbox_id}")
            if status == 200 and sandbox["state"] == want:
                return sandbox
            if status != 200 or (sandbox["state"] == "error" and want != "error"):
                raise SystemExit(f"sandbox {sandbox_id}: {status} {sandbox}")
            if time.monotonic() > deadline:
                raise SystemExit(f"sandbox {sandbox_id} never reached {want}: {sandbox}")
            time.sleep(poll)


def create_started(api: Api, body: dict) -> dict:
    status, sandbox = api.request("POST", "/api/sandbox", body)
    if status != 200:
        raise SystemExit(f"create: {status} {sandbox}")
    if sandbox["state"] != "started":
        sandbox = api.wait_state(sandbox["id"], "started")
    return sandbox


def start(api: Api, count: int, concurrency: int) -> None:
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        sandboxes = list(pool.map(lambda _: create_started(api, {}), range(count)))
    seconds = time.monotonic() - began
    spread = collections.Counter(s["runnerId"] for s in sandboxes)
    print(
        f"runners_start sandboxes={count} concurrency={concurrency} runners={len(spread)} "
        f"seconds={seconds:.2f} per_second={count / seconds:.2f} "
        f"spread={','.join(f'{k}:{v}' for k, v in sorted(spread.items()))}"
    )


def pin(api: Api, runner: str) -> None:
    sandbox = create_started(api, {"labels": {"cellar.io/runner": runner}})
    print(sandbox["id"])


def detect(api: Api, sandbox_id: str, killed_at: float, run: int, timeout_ms: int) -> None:
    lost = api.wait_state(sandbox_id, "error", poll=0.02)
    ms = (time.time() - killed_at) * 1000
    if "lost" not in (lost.get("errorReason") or ""):
        raise SystemExit(f"sandbox {sandbox_id} failed for another reason: {lost}")
    print(f"runner_detect_ms timeout_ms={timeout_ms} run={run} ms={ms:.0f}")


def destroy_all(api: Api) -> None:
    status, page = api.request("GET", "/api/sandbox?limit=100000")
    ids = [s["id"] for s in page["items"]] if status == 200 else []
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: api.request("DELETE", f"/api/sandbox/{i}"), ids))
    for sandbox_id in ids:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            status, sandbox = api.request("GET", f"/api/sandbox/{sandbox_id}")
            if status == 404 or sandbox["state"] == "destroyed":
                break
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["start", "pin", "detect", "destroy-all"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--runner")
    parser.add_argument("--sandbox")
    parser.add_argument("--killed-at", type=float)
    parser.add_argument("--run", type=int, default=1)
    parser.add_argument("--timeout-ms", type=int, default=10000)
    args = parser.parse_args()
    api = Api(args.url, os.environ["RUNNERS_API_KEY"])
    if args.what == "start":
        start(api, args.count, args.concurrency)
    elif args.what == "pin":
        pin(api, args.runner)
    elif args.what == "detect":
        detect(api, args.sandbox, args.killed_at, args.run, args.timeout_ms)
    else:
        destroy_all(api)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
