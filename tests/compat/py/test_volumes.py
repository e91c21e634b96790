"""Cellar against the official `daytona` Python client: volumes and the sandbox calls they need.

Test names start with the case letter of issue 3, point 6 (test_c_... is case c); run.sh prints
the matrix. Every client call is recorded through the `rec` fixture.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    Daytona,
    DaytonaBadRequestError,
    DaytonaConflictError,
    DaytonaError,
    VolumeMount,
)
from daytona_api_client import CreateSandbox, SandboxVolume

from conftest import Cleanup, Recorder, wait_until_volume_gone

CREATE_TIMEOUT = 60


def create_sandbox(daytona, rec, cleanup, mounts, call="create"):
    """mounts: [(volume, mount_path)] or [(volume, mount_path, subpath)]."""
    volumes = [VolumeMount(volume_id=m[0].id, mount_path=m[1], subpath=m[2] if len(m) > 2 else None) for m in mounts]
    params = CreateSandboxFromSnapshotParams(language="python", volumes=volumes)
    sandbox = rec.call(call, daytona.create, params, timeout=CREATE_TIMEOUT)
    cleanup.sandboxes.append(sandbox)
    assert sandbox.state == "started", f"create() returned a sandbox in state {sandbox.state}"
    return sandbox


def get_volume(daytona, rec, cleanup, name):
    volume = rec.call("volume.get(create=True)", daytona.volume.get, name, create=True)
    assert volume is not None, "volume.get(create=True) returned None (POST /volumes must answer 200)"
    cleanup.volumes.append(volume)
    return volume


def sh(rec, sandbox, command):
    """Runs a shell line in the sandbox, returns (exit code, output)."""
    response = rec.call("process.exec", sandbox.process.exec, command, timeout=120)
    return response.exit_code, response.result


def ok(rec, sandbox, command) -> str:
    code, output = sh(rec, sandbox, command)
    assert code == 0, f"{command!r} exited {code}: {output}"
    return output


# --- b: the docs' Python example with the current client's VolumeMount(volume_id=, mount_path=) ---


def test_b_docs_example(daytona: Daytona, rec, cleanup):
    # examples/python/volumes/volume.py of the Daytona repo, plus the volume deletion the docs show.
    volume = rec.call("volume.get(create=True)", daytona.volume.get, "my-volume", create=True)
    assert volume is not None, "volume.get(create=True) returned None"
    cleanup.volumes.append(volume)

    mount_dir_1 = "/home/daytona/volume"
    params = CreateSandboxFromSnapshotParams(
        language="python",
        volumes=[VolumeMount(volume_id=volume.id, mount_path=mount_dir_1)],
    )
    sandbox = rec.call("create", daytona.create, params)
    cleanup.sandboxes.append(sandbox)

    new_dir = os.path.join(mount_dir_1, "new-dir")
    rec.call("fs.create_folder", sandbox.fs.create_folder, new_dir, "755")

    new_file = os.path.join(mount_dir_1, "new-file.txt")
    rec.call("fs.upload_file", sandbox.fs.upload_file, b"Hello, World!", new_file)

    mount_dir_2 = "/home/daytona/my-files"
    params = CreateSandboxFromSnapshotParams(
        language="python",
        volumes=[VolumeMount(volume_id=volume.id, mount_path=mount_dir_2)],
    )
    sandbox2 = rec.call("create", daytona.create, params)
    cleanup.sandboxes.append(sandbox2)

    files = rec.call("fs.list_files", sandbox2.fs.list_files, mount_dir_2)
    assert {"new-dir", "new-file.txt"} <= {f.name for f in files}, files
    assert [f.is_dir for f in files if f.name == "new-dir"] == [True]

    content = rec.call("fs.download_file", sandbox2.fs.download_file, os.path.join(mount_dir_2, "new-file.txt"))
    assert content == b"Hello, World!"

    mount_dir_3 = "/home/daytona/subpath"
    params = CreateSandboxFromSnapshotParams(
        language="python",
        volumes=[VolumeMount(volume_id=volume.id, mount_path=mount_dir_3, subpath="users/alice")],
    )
    sandbox3 = rec.call("create (subpath)", daytona.create, params)
    cleanup.sandboxes.append(sandbox3)
    subpath_file = os.path.join(mount_dir_3, "alice-file.txt")
    rec.call("fs.upload_file", sandbox3.fs.upload_file, b"Hello from Alice's subpath!", subpath_file)

    # The file is stored at volume-root/users/alice/alice-file.txt.
    stored = rec.call(
        "fs.download_file", sandbox2.fs.download_file, os.path.join(mount_dir_2, "users/alice/alice-file.txt")
    )
    assert stored == b"Hello from Alice's subpath!"

    for each in (sandbox, sandbox2, sandbox3):
        rec.call("delete(sandbox)", daytona.delete, each)

    listed = rec.call("volume.list", daytona.volume.list)
    assert volume.id in {v.id for v in listed}

    # Deleting right after the sandboxes: they are being destroyed, so no 409.
    rec.call("volume.delete", daytona.volume.delete, volume)
    wait_until_volume_gone(daytona, rec, "my-volume")
    again = rec.call("volume.get(create=True)", daytona.volume.get, "my-volume", create=True)
    assert again is not None and again.id != volume.id, "the name of a deleted volume can be used again"
    cleanup.volumes.append(again)


# --- c: two sandboxes, one volume, different mount paths ---


def test_c_two_sandboxes_share_a_volume(daytona, rec, cleanup, unique):
    volume = get_volume(daytona, rec, cleanup, unique("shared"))
    first = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/one")])
    second = create_sandbox(daytona, rec, cleanup, [(volume, "/mnt/two")])

    ok(rec, first, "echo from-first > /home/daytona/one/a.txt")
    assert ok(rec, second, "cat /mnt/two/a.txt").strip() == "from-first"
    assert rec.call("fs.download_file", second.fs.download_file, "/mnt/two/a.txt") == b"from-first\n"

    rec.call("fs.upload_file", second.fs.upload_file, b"from-second", "/mnt/two/b.txt")
    assert ok(rec, first, "cat /home/daytona/one/b.txt") == "from-second"

    ok(rec, first, "mkdir /home/daytona/one/dir")
    assert ok(rec, second, "ls /mnt/two").split() == ["a.txt", "b.txt", "dir"]

    # An append in one sandbox is seen whole by the other (close-to-open).
    ok(rec, second, "echo line2 >> /mnt/two/a.txt")
    assert ok(rec, first, "cat /home/daytona/one/a.txt") == "from-first\nline2\n"


# --- d: one sandbox, two volumes ---


def test_d_one_sandbox_two_volumes(daytona, rec, cleanup, unique):
    one = get_volume(daytona, rec, cleanup, unique("one"))
    two = get_volume(daytona, rec, cleanup, unique("two"))
    both = create_sandbox(daytona, rec, cleanup, [(one, "/home/daytona/one"), (two, "/home/daytona/two")])

    ok(rec, both, "echo in-one > /home/daytona/one/x.txt && echo in-two > /home/daytona/two/y.txt")
    assert ok(rec, both, "ls /home/daytona/one").split() == ["x.txt"]
    assert ok(rec, both, "ls /home/daytona/two").split() == ["y.txt"]

    only_two = create_sandbox(daytona, rec, cleanup, [(two, "/data")])
    assert ok(rec, only_two, "ls /data").split() == ["y.txt"]
    assert ok(rec, only_two, "cat /data/y.txt") == "in-two\n"


# --- e: the volume outlives its sandbox ---


def test_e_volume_outlives_sandbox(daytona, rec, cleanup, unique):
    name = unique("persist")
    volume = get_volume(daytona, rec, cleanup, name)
    writer = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/volume")])
    ok(rec, writer, "mkdir -p /home/daytona/volume/d && seq 1 1000 > /home/daytona/volume/d/numbers.txt")
    rec.call("sandbox.delete(wait=True)", writer.delete, wait=True)

    found = rec.call("volume.get", daytona.volume.get, name)
    assert found.id == volume.id and found.state == "ready", found

    assert volume.id in {v.id for v in rec.call("volume.list", daytona.volume.list)}
    reader = create_sandbox(daytona, rec, cleanup, [(found, "/srv/data")])
    assert ok(rec, reader, "wc -l < /srv/data/d/numbers.txt").strip() == "1000"
    assert ok(rec, reader, "tail -n 1 /srv/data/d/numbers.txt") == "1000\n"


# --- f: deleting a volume in use -> the client's conflict error ---


def test_f_delete_volume_in_use_conflicts(daytona, rec, cleanup, unique):
    name = unique("busy")
    volume = get_volume(daytona, rec, cleanup, name)
    sandbox = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/volume")])

    error = rec.expect_error("volume.delete (in use) -> 409", DaytonaConflictError, 409, daytona.volume.delete, volume)
    assert error.message, "the conflict error carries a message"
    still = rec.call("volume.get", daytona.volume.get, name)
    assert still.state == "ready", f"a refused delete must leave the volume ready, got {still.state}"
    ok(rec, sandbox, "touch /home/daytona/volume/still-mounted")

    rec.call("delete(sandbox)", daytona.delete, sandbox)
    rec.call("volume.delete", daytona.volume.delete, volume)
    wait_until_volume_gone(daytona, rec, name)


# --- g: every mount-path rule -> the client's bad-request error ---

MOUNT_RULES = json.loads((Path(__file__).parent.parent / "mount_rules.json").read_text())
SINGLE_MOUNT_VIOLATIONS = [(r["label"], r["mountPath"], r.get("subpath")) for r in MOUNT_RULES["single"]]
MULTI_MOUNT_VIOLATIONS = [(r["label"], r["mountPaths"]) for r in MOUNT_RULES["multi"]]


@pytest.fixture(scope="module")
def two_volumes(daytona):
    rec = Recorder("g")
    registry = Cleanup(daytona)
    volumes = []
    for stem in ("rules-a", "rules-b"):
        volume = rec.call(
            "volume.get(create=True)", daytona.volume.get, f"py-{stem}-{uuid.uuid4().hex[:8]}", create=True
        )
        registry.volumes.append(volume)
        volumes.append(volume)
    yield volumes
    registry.run()


def expect_bad_request(daytona, rec, cleanup, label, volumes):
    params = CreateSandboxFromSnapshotParams(language="python", volumes=volumes)
    try:
        error = rec.expect_error(
            f"create -> 400: {label}", DaytonaBadRequestError, 400, daytona.create, params, timeout=30
        )
    except AssertionError as unexpected:
        if getattr(unexpected, "result", None) is not None:
            cleanup.sandboxes.append(unexpected.result)
        raise
    assert error.message, "the bad-request error names the rule"


@pytest.mark.parametrize(
    "label,mount_path,subpath", SINGLE_MOUNT_VIOLATIONS, ids=[v[0] for v in SINGLE_MOUNT_VIOLATIONS]
)
def test_g_mount_rule(daytona, rec, cleanup, two_volumes, label, mount_path, subpath):
    mount = VolumeMount(volume_id=two_volumes[0].id, mount_path=mount_path, subpath=subpath)
    expect_bad_request(daytona, rec, cleanup, label, [mount])


@pytest.mark.parametrize("label,paths", MULTI_MOUNT_VIOLATIONS, ids=[v[0] for v in MULTI_MOUNT_VIOLATIONS])
def test_g_mount_set_rule(daytona, rec, cleanup, two_volumes, label, paths):
    mounts = [VolumeMount(volume_id=v.id, mount_path=p) for v, p in zip(two_volumes, paths)]
    expect_bad_request(daytona, rec, cleanup, label, mounts)


def test_g_lookalike_paths_are_accepted(daytona, rec, cleanup, two_volumes):
    # Rules are about path components, not string prefixes.
    sandbox = create_sandbox(
        daytona,
        rec,
        cleanup,
        [(two_volumes[0], "/etcetera"), (two_volumes[1], "/home/daytona/lib", "team.one/..bob")],
        call="create (look-alike paths)",
    )
    ok(rec, sandbox, "touch /etcetera/ok /home/daytona/lib/ok")


def test_g_sibling_mounts_are_accepted(daytona, rec, cleanup, two_volumes):
    sandbox = create_sandbox(
        daytona,
        rec,
        cleanup,
        [(two_volumes[0], "/home/daytona/a"), (two_volumes[1], "/home/daytona/ab")],
        call="create (sibling paths)",
    )
    ok(rec, sandbox, "touch /home/daytona/a/ok /home/daytona/ab/ok")


# --- h: read-only mounts; a subpath cannot be escaped ---


def create_read_only(daytona, rec, cleanup, volume, mount_path):
    """Neither the Python VolumeMount nor daytona.create() carries readOnly (create() rebuilds each
    mount from volume_id/mount_path/subpath), so this goes through the client's generated API."""
    body = CreateSandbox(
        env={},
        labels={"code-toolbox-language": "python"},
        volumes=[SandboxVolume(volume_id=volume.id, mount_path=mount_path, additional_properties={"readOnly": True})],
    )
    created = rec.call("create (readOnly, generated API)", daytona._sandbox_api.create_sandbox, body)
    sandbox = rec.call("get", daytona.get, created.id)
    cleanup.sandboxes.append(sandbox)
    rec.call("wait_for_sandbox_start", sandbox.wait_for_sandbox_start, timeout=CREATE_TIMEOUT)
    return sandbox


def test_h_read_only_mount_refuses_writes(daytona, rec, cleanup, unique):
    volume = get_volume(daytona, rec, cleanup, unique("ro"))
    writer = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/rw")])
    ok(rec, writer, "echo original > /home/daytona/rw/data.txt && mkdir /home/daytona/rw/dir")

    reader = create_read_only(daytona, rec, cleanup, volume, "/home/daytona/ro")
    assert ok(rec, reader, "cat /home/daytona/ro/data.txt") == "original\n"
    for command in (
        "touch /home/daytona/ro/new",
        "echo more >> /home/daytona/ro/data.txt",
        "mkdir /home/daytona/ro/newdir",
        "rm /home/daytona/ro/data.txt",
        "mv /home/daytona/ro/data.txt /home/daytona/ro/moved.txt",
        "chmod 600 /home/daytona/ro/data.txt",
        "ln -s data.txt /home/daytona/ro/link",
        "rmdir /home/daytona/ro/dir",
    ):
        code, output = sh(rec, reader, command + " 2>&1")
        assert code != 0, f"{command!r} succeeded on a read-only mount"
        assert "Read-only file system" in output, f"{command!r}: {output}"
    # The toolbox writes on the sandbox's behalf: it must not bypass readOnly either.
    with pytest.raises(DaytonaError):
        reader.fs.upload_file(b"sneaky", "/home/daytona/ro/uploaded.txt")
    assert ok(rec, writer, "ls /home/daytona/rw").split() == ["data.txt", "dir"]
    assert ok(rec, writer, "cat /home/daytona/rw/data.txt") == "original\n"


def test_h_subpath_cannot_be_escaped(daytona, rec, cleanup, unique):
    volume = get_volume(daytona, rec, cleanup, unique("tenants"))
    token = f"outside-subpath-{uuid.uuid4().hex}"
    admin = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/all")])
    ok(
        rec,
        admin,
        f"cd /home/daytona/all && echo {token} > secret.txt && mkdir -p users/alice users/bob"
        f" && echo {token} > users/bob/bob.txt && cd users/alice"
        " && ln -s / root-link && ln -s ../.. up-link && ln -s ../../secret.txt secret-link"
        " && ln -s /home/daytona/all/secret.txt abs-link && ln -s ../bob bob-link && echo mine > mine.txt",
    )

    # Same mount path as the admin's, so the absolute symlink is a real attempt.
    alice = create_sandbox(
        daytona, rec, cleanup, [(volume, "/home/daytona/all", "users/alice")], call="create (subpath)"
    )
    listing = ok(rec, alice, "ls -A /home/daytona/all").split()
    assert sorted(listing) == ["abs-link", "bob-link", "mine.txt", "root-link", "secret-link", "up-link"], listing
    assert ok(rec, alice, "cat /home/daytona/all/mine.txt") == "mine\n"

    attempts = [
        "cat /home/daytona/all/../all/secret.txt",
        "cat /home/daytona/all/../secret.txt",
        "cd /home/daytona/all && cd .. && cat secret.txt all/secret.txt",
        "cat /home/daytona/all/up-link/secret.txt /home/daytona/all/up-link/all/secret.txt",
        "cat /home/daytona/all/secret-link",
        "cat /home/daytona/all/abs-link",
        "cat /home/daytona/all/bob-link/bob.txt",
        "cat /home/daytona/all/root-link/home/daytona/all/secret.txt",
    ]
    for command in attempts:
        _, output = sh(rec, alice, command + " 2>&1")
        assert token not in output, f"{command!r} reached outside the subpath: {output[:500]}"

    # No file anywhere in the sandbox holds the token (the server's data dir included, if it leaked in).
    _, found = sh(
        rec,
        alice,
        "timeout 90 grep -rsl --binary-files=text --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev"
        f" --exclude-dir=usr --exclude-dir=target --exclude-dir=node_modules --exclude-dir=.git {token} /"
        '; echo "grep-exit=$?"',
    )
    files, _, status = found.rpartition("grep-exit=")
    assert status.strip() != "124", "grep over the sandbox's file system timed out"
    assert files.strip() == "", f"files outside the subpath are readable from the subpath sandbox: {files[:500]}"

    # A write through the subpath lands inside it.
    ok(rec, alice, "echo from-alice > /home/daytona/all/new.txt")
    assert ok(rec, admin, "cat /home/daytona/all/users/alice/new.txt") == "from-alice\n"
    ok(rec, admin, "test ! -e /home/daytona/all/new.txt")


# --- i: a sandbox never sees the store's or the database's credentials ---


def test_i_no_credentials_in_sandbox(daytona, rec, cleanup, unique, canary, server_data_dir):
    volume = get_volume(daytona, rec, cleanup, unique("creds"))
    sandbox = create_sandbox(daytona, rec, cleanup, [(volume, "/home/daytona/volume")])
    ok(rec, sandbox, "echo data > /home/daytona/volume/f.txt")

    probes = {
        "env": "env",
        "environ of every process": "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done",
        "/proc/mounts": "cat /proc/mounts",
        "mountinfo": "cat /proc/self/mountinfo",
        "ps aux": "ps auxww || (for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done)",
        "cmdline of every process": "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done",
    }
    for label, command in probes.items():
        _, output = sh(rec, sandbox, command + " 2>&1")
        assert output.strip(), f"{label}: no output at all, the probe did not run"
        assert canary not in output, f"{label} shows a credential: {output[:800]}"
        assert "AWS_SECRET_ACCESS_KEY" not in output, f"{label} shows AWS_SECRET_ACCESS_KEY"

    # The server's data directory (SQLite control DB and metadata) is not reachable.
    code, output = sh(rec, sandbox, f"ls -la {server_data_dir} 2>&1")
    assert code != 0, f"the server's data directory is visible in the sandbox: {output[:500]}"
    # No cellar server/runner process is visible in the sandbox's PID namespace (argv[0] of each).
    programs = ok(rec, sandbox, "for f in /proc/[0-9]*/cmdline; do head -z -n 1 $f | tr -d '\\0'; echo; done; true")
    assert not [p for p in programs.split() if os.path.basename(p) == "cellar"], programs
