#!/usr/bin/env python3
"""Streaming a file several times larger than the memory budget through a mount.

Writes a file of pseudo-random bytes (CELLAR_STREAM_GIB GiB, default 2), remounts (a fresh
daemon, no page cache), reads it back sequentially and checks that the bytes read hash the same
as those written, and that the reading daemon's peak resident memory (VmHWM) stayed under the
memory budget (the default of `cellar mount --cache-mem-mb`, 512 MiB) plus OVERHEAD_MIB for
everything else the daemon holds (code, runtime, metadata engine, FUSE request buffers).
Prints the write and read throughput and both daemons' peaks.
"""

import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from volume import Volume, VolumeError  # noqa: E402

BUDGET_MIB = 512
# The daemon's memory besides the cache and read-ahead: measured at 75-105 MiB while streaming.
OVERHEAD_MIB = 128
PIECE = 8 << 20


class StreamFailure(Exception):
    pass


def peak_mib(pid):
    """VmHWM of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise StreamFailure(f"no VmHWM in /proc/{pid}/status")


def run(volume, size):
    path = volume.mount() / "stream.bin"
    rng = random.Random(20261201)
    written = hashlib.sha256()
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size // PIECE):
            piece = rng.randbytes(PIECE)
            written.update(piece)
            f.write(piece)
        os.fsync(f.fileno())
    write_secs = time.monotonic() - started
    writer_peak = peak_mib(volume.daemon_pid())

    volume.remount()
    reader = volume.daemon_pid()
    read = hashlib.sha256()
    started = time.monotonic()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            read.update(chunk)
            total += len(chunk)
    read_secs = time.monotonic() - started
    reader_peak = peak_mib(reader)
    print(f"stream_read: wrote {size >> 20} MiB in {write_secs:.1f}s "
          f"({size / write_secs / 1e6:.0f} MB/s, writer peak {writer_peak} MiB); read it in "
          f"{read_secs:.1f}s ({size / read_secs / 1e6:.0f} MB/s, reader peak {reader_peak} MiB)",
          flush=True)
    if total != size:
        raise StreamFailure(f"read {total} bytes of {size}")
    if read.digest() != written.digest():
        raise StreamFailure("the bytes read differ from the bytes written")
    if reader_peak > BUDGET_MIB + OVERHEAD_MIB:
        raise StreamFailure(f"the reading daemon peaked at {reader_peak} MiB, over the "
                            f"{BUDGET_MIB} MiB budget + {OVERHEAD_MIB} MiB overhead")
    volume.destroy()


def main():
    size = int(float(os.environ.get("CELLAR_STREAM_GIB", "2")) * (1 << 30)) // PIECE * PIECE
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-stream-"))
    volume = Volume(work_dir / "v")
    try:
        run(volume, size)
    except (StreamFailure, VolumeError, OSError) as error:
        print(f"stream_read: FAILED: {error}", file=sys.stderr)
        print(f"stream_read: work directory kept: {work_dir}", file=sys.stderr)
        volume.cleanup()
        return 1
    volume.cleanup()
    shutil.rmtree(work_dir)
    print("stream_read: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
