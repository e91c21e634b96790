"""Many concurrent clients against a running server, as a hostile tenant would try it: every
answer must be the expected one (no 5xx, no refused or dropped connection, no wrong status).

    python3 load.py BASE_URL KEY_A KEY_B SANDBOX_ID VOLUME_ID   (sandbox and volume of A)

Environment: LOAD_CLIENTS (default 200), LOAD_SECONDS (default 20).
Each client keeps one connection and cycles through: list volumes, get A's sandbox, get A's
volume with B's key (404), a request without a valid key (401), an unknown route (404), and
every tenth round a command in the sandbox. Prints totals; exits 1 on any unexpected answer.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

BASE, KEY_A, KEY_B, SANDBOX, VOLUME = sys.argv[1:6]
CLIENTS = int(os.environ.get("LOAD_CLIENTS", "200"))
SECONDS = float(os.environ.get("LOAD_SECONDS", "20"))
HOST = urlsplit(BASE)

# (method, path, key, body, expected status)
ROUND = [
    ("GET", "/api/volumes", KEY_A, None, 200),
    ("GET", f"/api/sandbox/{SANDBOX}", KEY_A, None, 200),
    ("GET", f"/api/volumes/{VOLUME}", KEY_B, None, 404),
    ("GET", "/api/sandbox", "cellar_invalid", None, 401),
    ("GET", "/api/no-such-route", KEY_A, None, 404),
]
EXEC = ("POST", f"/toolbox/{SANDBOX}/process/execute", KEY_A, {"command": "echo load"}, 200)

counts: Counter[str] = Counter()
failures: list[str] = []
lock = threading.Lock()


def client(deadline: float) -> None:
    conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
    n = 0
    while time.monotonic() < deadline:
        requests = ROUND + ([EXEC] if n % 10 == 0 else [])
        n += 1
        for method, path, key, body, expected in requests:
            data = json.dumps(body) if body is not None else None
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                conn = http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=60)
                with lock:
                    counts["connection errors"] += 1
                    failures.append(f"{method} {path}: {err!r}")
                continue
            ok = status == expected
            if ok and status >= 400:
                # Every error carries the JSON error body.
                ok = "message" in json.loads(payload or b"{}")
            with lock:
                counts["requests"] += 1
                if not ok:
                    counts["unexpected"] += 1
                    failures.append(f"{method} {path}: {status} (expected {expected}) {payload[:200]!r}")
    conn.close()


deadline = time.monotonic() + SECONDS
threads = [threading.Thread(target=client, args=(deadline,)) for _ in range(CLIENTS)]
started = time.monotonic()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
elapsed = time.monotonic() - started
print(
    f"load: {CLIENTS} clients for {elapsed:.0f} s: {counts['requests']} answers "
    f"({counts['requests'] / elapsed:.0f}/s), {counts['unexpected']} unexpected, "
    f"{counts['connection errors']} connection errors"
)
for failure in failures[:20]:
    print("  " + failure)
sys.exit(1 if failures or counts["requests"] == 0 else 0)
