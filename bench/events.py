#!/usr/bin/env python3
"""Change-event latency: from close() of a file in a FUSE mount to the arrival of its event at a
server-sent-events client of `GET /api/volumes/{id}/events` (the setup of tests/fs/events.py: a
real `cellar server`, the volume mounted by `cellar mount` in another process, blocks on the
test RGW; metadata in SQLite, or PostgreSQL with CELLAR_TEST_META=postgres).

One writer writes and closes EVENTS_FILES files (default 300) of EVENTS_BYTES bytes (default
4096) one after the other, each once the previous one's event arrived (an agent waiting on
another's output); the latency of a file is from the start of its close() to the arrival of its
`modified` event (close commits the data: the event cannot come earlier), and also from the
return of close(). Prints p50, p90, p99 and max. Needs the rgw.sh env (and postgres.sh's for
PostgreSQL) and a release build (CELLAR_BIN).

    python3 bench/events.py
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fs"))
from events import Setup, check  # noqa: E402


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main():
    files = int(os.environ.get("EVENTS_FILES", "300"))
    size = int(os.environ.get("EVENTS_BYTES", "4096"))
    work = Path(tempfile.mkdtemp(prefix="bench-events-"))
    setup = Setup(work)
    try:
        stream = setup.subscribe(path="/bench")
        os.mkdir(setup.mount_point / "bench")
        stream.until(lambda e: e["data"]["path"] == "/bench")
        data = os.urandom(size)
        from_start, from_return = [], []
        for i in range(files):
            path = f"/bench/f{i:05d}"
            f = open(setup.mount_point / path.lstrip("/"), "wb")
            f.write(data)
            started = time.monotonic()
            f.close()
            returned = time.monotonic()
            while True:
                arrived, event = stream.next()
                if event["event"] == "modified" and event["data"]["path"] == path:
                    check(event["data"].get("size") == size, f"{event}")
                    break
            from_start.append(arrived - started)
            from_return.append(arrived - returned)
        stream.close()
        engine = "PostgreSQL" if setup.database else "SQLite"
        print(f"event latency over {files} files of {size} B ({engine} metadata, RGW blocks), ms:")
        for name, values in (("close() start -> event", from_start),
                             ("close() return -> event", from_return)):
            ms = [v * 1000 for v in values]
            print(f"  {name:24} p50 {percentile(ms, 50):7.1f}  p90 {percentile(ms, 90):7.1f}  "
                  f"p99 {percentile(ms, 99):7.1f}  max {max(ms):7.1f}  mean {statistics.mean(ms):7.1f}")
    finally:
        setup.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
