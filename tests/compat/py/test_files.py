"""The sandbox file calls of the official `daytona` Python client (issue 9, point 5): case j, every
`fs` call on a volume and in the home with real results; case k, a large file streamed in with
`upload_file`/`upload_file_stream` and out with `download_file`/`download_file_stream`, checksums
equal, the server's memory bounded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from daytona import (
    DaytonaBadRequestError,
    DaytonaConflictError,
    DaytonaFileAccessDeniedError,
    DaytonaFileNotFoundError,
)

from test_volumes import create_sandbox, get_volume, ok, sh

# A name the shell would expand if a path ever reached it unquoted.
ODD = "odd $(touch pwned) `touch pwned` 'q' name.txt"


def test_j_file_calls(daytona, rec, cleanup, unique):
    volume = get_volume(daytona, rec, cleanup, unique("files"))
    sandbox = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/vol")])
    fs = sandbox.fs
    base = "/home/daytona/vol/tree"
    rec.call("fs.upload_file", fs.upload_file, b"hello world\nsecond hello\n", f"{base}/a.txt")
    rec.call("fs.upload_file", fs.upload_file, b"print('hello')\n", f"{base}/src/b.py")
    rec.call("fs.upload_file", fs.upload_file, b"nothing here\n", f"{base}/src/deep/c.txt")
    rec.call("fs.upload_file", fs.upload_file, b"\0binary hello\n", f"{base}/blob.bin")
    # A relative path is relative to the home.
    rec.call("fs.upload_file", fs.upload_file, b"hello odd\n", f"vol/tree/{ODD}")

    # get_file_info: the fields, against stat(1) in the sandbox.
    info = rec.call("fs.get_file_info", fs.get_file_info, f"{base}/a.txt")
    assert (info.name, info.is_dir, info.size) == ("a.txt", False, 25), info
    assert info.permissions == "0" + ok(rec, sandbox, f"stat -c %a {base}/a.txt").strip(), info
    assert info.mode == ok(rec, sandbox, f"stat -c %A {base}/a.txt").strip(), info
    assert (info.owner, info.group) == ("daytona", "daytona"), info
    assert info.mod_time and info.modified_at, info
    directory = rec.call("fs.get_file_info", fs.get_file_info, "vol/tree/src")
    assert (directory.name, directory.is_dir) == ("src", True), directory
    rec.expect_error("fs.get_file_info (missing) -> 404", DaytonaFileNotFoundError, 404, fs.get_file_info, f"{base}/absent")

    # find_files: lines that contain the text; the binary file is skipped.
    matches = rec.call("fs.find_files", fs.find_files, base, "hello")
    found = sorted((m.file, m.line, m.content) for m in matches)
    assert found == [
        (f"{base}/a.txt", 1, "hello world"),
        (f"{base}/a.txt", 2, "second hello"),
        (f"{base}/{ODD}", 1, "hello odd"),
        (f"{base}/src/b.py", 1, "print('hello')"),
    ], found
    assert rec.call("fs.find_files", fs.find_files, base, "no such text") == []
    rec.expect_error("fs.find_files (missing) -> 404", DaytonaFileNotFoundError, 404, fs.find_files, f"{base}/x", "a")

    # search_files: names at any depth, or paths relative to the searched directory.
    result = rec.call("fs.search_files", fs.search_files, base, "*.txt")
    assert sorted(result.files) == [f"{base}/a.txt", f"{base}/{ODD}", f"{base}/src/deep/c.txt"], result
    result = rec.call("fs.search_files", fs.search_files, base, "src/**/*.{py,txt}")
    assert sorted(result.files) == [f"{base}/src/b.py", f"{base}/src/deep/c.txt"], result
    assert rec.call("fs.search_files", fs.search_files, base, "*.rs").files == []

    # replace_in_files: per-file results; the text really changed, a missing file is reported.
    results = rec.call(
        "fs.replace_in_files", fs.replace_in_files, [f"{base}/a.txt", f"{base}/src/b.py", f"{base}/gone"], "hello", "bye"
    )
    assert [(r.file, r.success) for r in results] == [
        (f"{base}/a.txt", True),
        (f"{base}/src/b.py", True),
        (f"{base}/gone", False),
    ], results
    assert results[2].error, results
    assert ok(rec, sandbox, f"cat {base}/a.txt") == "bye world\nsecond bye\n"
    assert ok(rec, sandbox, f"cat {base}/src/b.py") == "print('bye')\n"

    # set_file_permissions: the mode bits as stat(1) sees them; chown to root is refused.
    rec.call("fs.set_file_permissions", fs.set_file_permissions, f"{base}/a.txt", mode="640")
    assert ok(rec, sandbox, f"stat -c %a {base}/a.txt").strip() == "640"
    rec.call("fs.set_file_permissions", fs.set_file_permissions, f"vol/tree/{ODD}", mode="0700")
    assert ok(rec, sandbox, f"stat -c %a {base}/odd*").strip() == "700"
    rec.call("fs.set_file_permissions", fs.set_file_permissions, f"{base}/a.txt", owner="daytona", group="daytona")
    rec.expect_error(
        "fs.set_file_permissions (owner root) -> 403",
        DaytonaFileAccessDeniedError,
        403,
        fs.set_file_permissions,
        f"{base}/a.txt",
        owner="root",
    )
    rec.expect_error(
        "fs.set_file_permissions (missing) -> 404",
        DaytonaFileNotFoundError,
        404,
        fs.set_file_permissions,
        f"{base}/absent",
        mode="644",
    )

    # move_files: renamed, the source is gone; an existing destination is a conflict.
    rec.call("fs.move_files", fs.move_files, f"{base}/a.txt", f"{base}/src/moved.txt")
    assert sh(rec, sandbox, f"test -e {base}/a.txt")[0] == 1
    assert ok(rec, sandbox, f"cat {base}/src/moved.txt") == "bye world\nsecond bye\n"
    rec.expect_error(
        "fs.move_files (destination exists) -> 409",
        DaytonaConflictError,
        409,
        fs.move_files,
        f"{base}/src/moved.txt",
        f"{base}/src/b.py",
    )
    rec.expect_error(
        "fs.move_files (missing) -> 404", DaytonaFileNotFoundError, 404, fs.move_files, f"{base}/absent", f"{base}/x"
    )
    # Into the home, off the volume: a move across file systems.
    rec.call("fs.move_files", fs.move_files, f"{base}/src/deep", "/home/daytona/deep")
    assert ok(rec, sandbox, "cat /home/daytona/deep/c.txt") == "nothing here\n"

    # delete_file: a file; a directory only with recursive=True.
    rec.call("fs.delete_file", fs.delete_file, f"vol/tree/{ODD}")
    assert sh(rec, sandbox, f"test -e {base}/odd*")[0] == 1
    rec.expect_error("fs.delete_file (directory) -> 400", DaytonaBadRequestError, 400, fs.delete_file, f"{base}/src")
    rec.call("fs.delete_file", fs.delete_file, f"{base}/src", recursive=True)
    assert ok(rec, sandbox, f"ls -A {base}") == "blob.bin\n"
    rec.expect_error("fs.delete_file (missing) -> 404", DaytonaFileNotFoundError, 404, fs.delete_file, f"{base}/src")
    rec.expect_error(
        "fs.delete_file (read-only system) -> 403", DaytonaFileAccessDeniedError, 403, fs.delete_file, "/etc/hostname"
    )

    # No path ever reached a shell unquoted.
    assert ok(rec, sandbox, "find /home/daytona /tmp -name pwned") == ""


LARGE_MIB = int(os.environ.get("COMPAT_LARGE_FILE_MIB", "1024"))
# Far below the file's size: the server streams, it does not hold the file.
SERVER_PEAK_LIMIT_MIB = 256


def server_peak_rss_mib() -> float | None:
    pid = os.environ.get("COMPAT_SERVER_PID")
    if not pid:
        return None
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def test_k_large_file_streams(daytona, rec, cleanup, unique, scratch):
    volume = get_volume(daytona, rec, cleanup, unique("large"))
    sandbox = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/vol")])
    local = scratch / "large.bin"
    digest = hashlib.sha256()
    chunk = 8 << 20
    with open(local, "wb") as out:
        for _ in range(LARGE_MIB * (1 << 20) // chunk):
            data = os.urandom(chunk)
            digest.update(data)
            out.write(data)
    expected = digest.hexdigest()
    remote = "/home/daytona/vol/large.bin"

    started = time.monotonic()
    rec.call("fs.upload_file (large, from a path)", sandbox.fs.upload_file, str(local), remote, timeout=1800)
    upload_seconds = time.monotonic() - started
    remote_sum = ok(rec, sandbox, f"sha256sum {remote}").split()[0]
    assert remote_sum == expected, "the uploaded file differs"
    # The streaming variants: from an open file, chunked, and back as an iterator of chunks.
    streamed = "/home/daytona/vol/streamed.bin"
    with open(local, "rb") as source:
        rec.call("fs.upload_file_stream (large)", sandbox.fs.upload_file_stream, source, streamed, 1800)
    assert ok(rec, sandbox, f"sha256sum {streamed}").split()[0] == expected, "the stream-uploaded file differs"
    local.unlink()
    digest, size = hashlib.sha256(), 0
    for block in rec.call("fs.download_file_stream (large)", sandbox.fs.download_file_stream, streamed, 1800):
        digest.update(block)
        size += len(block)
    assert (size, digest.hexdigest()) == (LARGE_MIB << 20, expected), "the stream-downloaded file differs"

    back = scratch / "back.bin"
    started = time.monotonic()
    rec.call("fs.download_file (large, to a path)", sandbox.fs.download_file, remote, str(back), 1800)
    download_seconds = time.monotonic() - started
    digest = hashlib.sha256()
    with open(back, "rb") as data:
        while block := data.read(chunk):
            digest.update(block)
    assert digest.hexdigest() == expected, "the downloaded file differs"
    assert back.stat().st_size == LARGE_MIB << 20

    peak = server_peak_rss_mib()
    print(
        f"\n{LARGE_MIB} MiB: upload_file {LARGE_MIB / upload_seconds:.0f} MiB/s, "
        f"download_file {LARGE_MIB / download_seconds:.0f} MiB/s, server peak RSS {peak} MiB"
    )
    if peak is not None:
        assert peak < SERVER_PEAK_LIMIT_MIB, f"server peak RSS {peak:.0f} MiB during a {LARGE_MIB} MiB transfer"


@pytest.fixture
def scratch():
    # Under /var/tmp: /tmp may be a small tmpfs.
    path = Path(tempfile.mkdtemp(prefix="cellar-compat-large.", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
