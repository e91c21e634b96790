#!/usr/bin/env python3
"""Copies and holes without bytes, on a real mount over the test RGW:

- `cp` (coreutils: copy_file_range) of a big file (CELLAR_CP_MIB, default 1024) adds no object
  to the store, reads back equal, and takes at most CELLAR_CP_MAX_SECS (default 5; moving the
  bytes takes many seconds; the time is printed);
- copy_file_range of a 300 MiB sparse file holding 10 bytes uploads nothing and the copy stays
  sparse; `cp` (which finds the data by SEEK_DATA and moves those 10 bytes with read/write)
  uploads only them; `cp --sparse=always` and `tar -S` keep the file sparse too (st_blocks);
- `fallocate -p` / `-z` (util-linux) make holes: zeros read back, st_blocks drops, no object is
  added, and os.lseek(SEEK_DATA / SEEK_HOLE) reports them;
- `cellar fsck` is clean at the end.
"""

import datetime
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))
from volume import Volume, VolumeError  # noqa: E402

MIB = 1 << 20


class Failure(AssertionError):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


def s3_keys():
    """Every key of the test bucket (ListObjectsV2, signed with SigV4, standard library only)."""
    url = urllib.parse.urlparse(os.environ["CELLAR_TEST_S3_URL"])
    bucket = url.netloc
    query = urllib.parse.parse_qs(url.query)
    region = query.get("region", ["us-east-1"])[0]
    endpoint = urllib.parse.urlparse(os.environ["CELLAR_TEST_S3_ENDPOINT"])
    access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    keys, token = [], None
    while True:
        params = {"list-type": "2"}
        if token:
            params["continuation-token"] = token
        canonical_query = "&".join(
            f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}"
            for k, v in sorted(params.items())
        )
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload = hashlib.sha256(b"").hexdigest()
        host = endpoint.netloc
        canonical = "\n".join([
            "GET", f"/{bucket}", canonical_query,
            f"host:{host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n",
            "host;x-amz-content-sha256;x-amz-date", payload,
        ])
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join([
            "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()
        ])
        key = ("AWS4" + secret).encode()
        for part in (day, region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            f"{endpoint.scheme}://{host}/{bucket}?{canonical_query}",
            headers={
                "x-amz-date": amz_date,
                "x-amz-content-sha256": payload,
                "Authorization": f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
                f"SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            root = ET.fromstring(response.read())
        ns = {"s3": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
        find = (lambda e, name: e.find(f"s3:{name}", ns)) if ns else (lambda e, name: e.find(name))
        for item in (root.findall("s3:Contents", ns) if ns else root.findall("Contents")):
            keys.append(find(item, "Key").text)
        truncated = find(root, "IsTruncated")
        if truncated is None or truncated.text != "true":
            return keys
        token = find(root, "NextContinuationToken").text


class Store:
    """The objects of this volume (its keys sit under its uuid, learnt from its first object)."""

    def __init__(self):
        self.before = set(s3_keys())
        self.prefix = None

    def objects(self):
        keys = set(s3_keys())
        if self.prefix is None:
            new = sorted(keys - self.before)
            check(new, "the volume has no object in the store yet")
            self.prefix = new[0].split("/chunks/")[0] + "/chunks/"
        return {k for k in keys if k.startswith(self.prefix)}


def write_random(path, size):
    with open(path, "wb") as f:
        for at in range(0, size, 16 * MIB):
            f.write(os.urandom(min(16 * MIB, size - at)))


def same(a, b):
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def blocks(path):
    return os.stat(path).st_blocks


def run(mnt, store):
    big_mib = int(os.environ.get("CELLAR_CP_MIB", "1024"))
    max_secs = float(os.environ.get("CELLAR_CP_MAX_SECS", "5"))

    # A big file, then cp (copy_file_range): metadata only.
    big = mnt / "big"
    write_random(big, big_mib * MIB)
    objects = store.objects()
    started = time.monotonic()
    subprocess.run(["cp", str(big), str(mnt / "big.copy")], check=True)
    took = time.monotonic() - started
    print(f"copies_holes: cp of {big_mib} MiB took {took:.3f} s", flush=True)
    after = store.objects()
    check(after == objects, f"cp added {len(after - objects)} object(s) to the store")
    check(took <= max_secs, f"cp of {big_mib} MiB took {took:.2f} s (more than {max_secs} s)")
    check(blocks(mnt / "big.copy") == blocks(big), "the copy holds what the source holds")
    check(same(big, mnt / "big.copy"), "the copy reads back different bytes")
    os.unlink(big)
    check(os.stat(mnt / "big.copy").st_size == big_mib * MIB, "the copy outlives its source")

    # A sparse file: 10 bytes in 300 MiB.
    sparse = mnt / "sparse"
    with open(sparse, "wb") as f:
        f.seek(150 * MIB)
        f.write(b"ten bytes!")
        f.truncate(300 * MIB)
    objects = store.objects()
    with open(sparse, "rb") as src, open(mnt / "sparse.cfr", "wb") as dst:
        copied = 0
        while copied < 300 * MIB:
            n = os.copy_file_range(src.fileno(), dst.fileno(), 300 * MIB - copied)
            check(n > 0, "copy_file_range stopped short")
            copied += n
    check(store.objects() == objects, "copy_file_range of a sparse file uploaded something")
    # cp finds the data by SEEK_DATA and moves its 10 bytes with read/write: one tiny object.
    subprocess.run(["cp", str(sparse), str(mnt / "sparse.cp")], check=True)
    added = store.objects() - objects
    check(sum(int(k.rsplit("_", 1)[1]) for k in added) <= 10,
          f"cp of a sparse file uploaded more than its data: {sorted(added)}")
    subprocess.run(["cp", "--sparse=always", str(sparse), str(mnt / "sparse.always")], check=True)
    (mnt / "untar").mkdir()
    tar = subprocess.run(
        f"tar -C {mnt} -cSf - sparse | tar -C {mnt / 'untar'} -xSf -", shell=True
    )
    check(tar.returncode == 0, "tar -S failed")
    for copy in ("sparse.cfr", "sparse.cp", "sparse.always", "untar/sparse"):
        path = mnt / copy
        check(os.stat(path).st_size == 300 * MIB, f"{copy}: wrong size")
        check(blocks(path) <= 8, f"{copy} is not sparse: {blocks(path)} blocks")
        with open(path, "rb") as f:
            check(os.lseek(f.fileno(), 0, os.SEEK_DATA) == 150 * MIB, f"{copy}: SEEK_DATA")
            check(os.lseek(f.fileno(), 150 * MIB, os.SEEK_HOLE) == 150 * MIB + 10,
                  f"{copy}: SEEK_HOLE")
            f.seek(150 * MIB - 1)
            check(f.read(12) == b"\0ten bytes!\0", f"{copy}: wrong bytes")

    # Punched and zeroed holes (util-linux fallocate).
    holes = mnt / "holes"
    write_random(holes, 8 * MIB)
    data = holes.read_bytes()
    objects = store.objects()
    full = blocks(holes)
    subprocess.run(["fallocate", "-p", "-o", str(MIB), "-l", str(2 * MIB), str(holes)], check=True)
    subprocess.run(["fallocate", "-z", "-o", str(5 * MIB), "-l", str(MIB), str(holes)], check=True)
    check(store.objects() == objects, "making holes uploaded something")
    check(blocks(holes) == full - 3 * MIB // 512, f"holes still hold data: {blocks(holes)} blocks")
    expected = data[:MIB] + bytes(2 * MIB) + data[3 * MIB:5 * MIB] + bytes(MIB) + data[6 * MIB:]
    check(holes.read_bytes() == expected, "the holes do not read as zeros")
    with open(holes, "rb") as f:
        fd = f.fileno()
        seeks = [(0, os.SEEK_HOLE, MIB), (MIB, os.SEEK_DATA, 3 * MIB),
                 (3 * MIB, os.SEEK_HOLE, 5 * MIB), (5 * MIB, os.SEEK_DATA, 6 * MIB),
                 (6 * MIB, os.SEEK_HOLE, 8 * MIB)]
        for offset, whence, want in seeks:
            got = os.lseek(fd, offset, whence)
            check(got == want, f"lseek({offset}, {whence}) = {got}, expected {want}")
        try:
            os.lseek(fd, 8 * MIB, os.SEEK_DATA)
            raise Failure("SEEK_DATA at the end did not fail")
        except OSError as e:
            check(e.errno == 6, f"SEEK_DATA at the end: {e} (expected ENXIO)")


def main():
    work_dir = Path(tempfile.mkdtemp(prefix="cellar-copies-"))
    volume = Volume(work_dir / "v")
    try:
        store = Store()
        mnt = Path(volume.mount())
        run(mnt, store)
        volume.umount()
        code, output = volume.fsck()
        check(code == 0, f"fsck not clean: {output}")
        volume.mount()
        volume.destroy()
    except (Failure, VolumeError, subprocess.SubprocessError, OSError) as error:
        print(f"copies_holes: FAILED: {error}", file=sys.stderr)
        print(f"copies_holes: work directory kept: {work_dir}", file=sys.stderr)
        volume.cleanup()
        return 1
    shutil.rmtree(work_dir)
    print("copies_holes: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
