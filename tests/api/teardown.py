"""Deletes every sandbox of the organizations whose keys are given, and waits until they are
destroyed (a server keeps sandboxes running across its restarts). Usage: teardown.py URL KEY..."""

import json
import sys
import time
import urllib.request

base, keys = sys.argv[1], sys.argv[2:]


def call(method, path, key):
    request = urllib.request.Request(
        base + path, method=method, headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
        return json.loads(text) if text else None


for key in keys:
    ids = []
    cursor = ""
    while True:
        page = call("GET", f"/api/sandbox?limit=100{cursor}", key)
        ids += [item["id"] for item in page["items"] if item["state"] != "destroyed"]
        if not page["nextCursor"]:
            break
        cursor = f"&cursor={page['nextCursor']}"
    for sandbox_id in ids:
        call("DELETE", f"/api/sandbox/{sandbox_id}", key)
    deadline = time.time() + 120
    for sandbox_id in ids:
        while call("GET", f"/api/sandbox/{sandbox_id}", key)["state"] not in ("destroyed", "error"):
            if time.time() > deadline:
                sys.exit(f"sandbox {sandbox_id} was not destroyed within 120 s")
            time.sleep(0.2)
    print(f"teardown: destroyed {len(ids)} sandbox(es)")
