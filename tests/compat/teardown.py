"""Deletes every sandbox of the test server and waits until each is destroyed, so stopping the
server leaves no sandbox processes or FUSE mounts behind (the server keeps sandboxes running across
its own restarts by design). Plain HTTP, independent of the clients under test.

Usage: python teardown.py   (reads DAYTONA_API_URL and DAYTONA_API_KEY; exit 1 if some remain)
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

API = os.environ["DAYTONA_API_URL"].rstrip("/")
HEADERS = {"Authorization": f"Bearer {os.environ['DAYTONA_API_KEY']}"}
GONE = ("destroyed",)


def request(method: str, path: str):
    req = urllib.request.Request(API + path, method=method, headers=HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as err:
        return err.code, None


def sandboxes() -> list[dict]:
    found, cursor = [], None
    while True:
        status, page = request("GET", "/sandbox?limit=1000" + (f"&cursor={cursor}" if cursor else ""))
        if status != 200:
            raise SystemExit(f"teardown: GET /sandbox answered {status}")
        items = page["items"] if isinstance(page, dict) else page
        found += [s for s in items if s.get("state") not in GONE]
        cursor = page.get("nextCursor") if isinstance(page, dict) else None
        if not cursor:
            return found


def main() -> int:
    pending = {s["id"] for s in sandboxes()}
    for sandbox_id in pending:
        request("DELETE", f"/sandbox/{sandbox_id}")
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for sandbox_id in list(pending):
            status, body = request("GET", f"/sandbox/{sandbox_id}")
            if status == 404 or (body or {}).get("state") in GONE:
                pending.discard(sandbox_id)
        time.sleep(0.2)
    if pending:
        print(f"teardown: {len(pending)} sandbox(es) not destroyed after 120 s: {sorted(pending)[:5]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
