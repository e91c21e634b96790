#!/usr/bin/env python3
"""The S3 gateway end to end: a real `cellar server --s3-listen` over the RGW, credentials
minted through its API, the real `aws` CLI (s3 cp/sync/ls/rm) and boto3 (put, ranged get,
multipart, listings with delimiters and continuation tokens, deletes), scoped credentials
(read-only, prefix, expired, revoked) refused with AccessDenied, and files written through the
gateway visible in a FUSE mount of the volume and the other way round.

awscli and boto3 (pinned in gateway-requirements.txt) live in tests/fs/.venv, made on the first
run; the script runs itself again with that interpreter.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
REQUIREMENTS = HERE / "gateway-requirements.txt"
sys.path.insert(0, str(HERE.parent / "harness"))


def ensure_tools():
    """Runs this script again inside the venv with awscli and boto3 (creating it if needed)."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    wanted = REQUIREMENTS.read_text().split()
    frozen = ""
    if python.exists():
        frozen = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    if not all(line in frozen.split() for line in wanted):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-r", REQUIREMENTS], check=True)
    os.execv(python, [str(python), __file__, *sys.argv[1:]])


ensure_tools()

import boto3  # noqa: E402
import botocore.config  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402
from volume import Volume, VolumeError  # noqa: E402

CELLAR = os.environ.get("CELLAR_BIN", str(HERE.parents[1] / "target/release/cellar"))
AWS = str(VENV / "bin" / "aws")
passed = 0


class GatewayFailure(Exception):
    pass


def check(condition, what):
    global passed
    if not condition:
        raise GatewayFailure(what)
    passed += 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, url, key):
        self.url, self.key = url, key

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def start_server(work):
    data_dir, log = work / "server", work / "server.log"
    port, s3_port = free_port(), free_port()
    env = {**os.environ, "RUST_LOG": "info"}
    process = subprocess.Popen(
        [CELLAR, "server", "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
         "--s3-listen", f"127.0.0.1:{s3_port}", "--store", os.environ["CELLAR_TEST_S3_URL"],
         "--no-embedded-runner"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GatewayFailure(f"the server exited {process.returncode}: see {log}")
        text = log.read_text()
        if "cellar_" in text and "Cellar API" in text:
            key = next(w for w in text.split() if w.startswith("cellar_") and len(w) == 71)
            return process, data_dir, Api(f"http://127.0.0.1:{port}/api", key)
        time.sleep(0.1)
    raise GatewayFailure("the server did not start in 60 s")


def stop_server(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_client(cred):
    return boto3.client(
        "s3", endpoint_url=cred["endpoint"], region_name=cred["region"],
        aws_access_key_id=cred["accessKeyId"], aws_secret_access_key=cred["secretAccessKey"],
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


def error_code(call):
    try:
        call()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    return None, 200


def aws(cred, *args, check_ok=True):
    """The aws CLI with these credentials (and none of the environment's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=cred["accessKeyId"], AWS_SECRET_ACCESS_KEY=cred["secretAccessKey"],
               AWS_DEFAULT_REGION=cred["region"], AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    result = subprocess.run([AWS, "--endpoint-url", cred["endpoint"], "s3", *args],
                            capture_output=True, text=True, env=env, timeout=300)
    if check_ok and result.returncode != 0:
        raise GatewayFailure(f"aws s3 {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def run(work):
    server, data_dir, api = start_server(work)
    mount = None
    try:
        status, doc = api.call("GET", "/openapi.json")
        check("/api/volumes/{volumeId}/s3-credentials" in doc["paths"], "the endpoint is in the OpenAPI document")
        status, volume = api.call("POST", "/volumes", {"name": "Gateway_Vol"})
        check(status == 200 and volume["state"] == "ready", f"volume created: {status} {volume}")
        vid, bucket = volume["id"], volume["name"]
        mint = lambda body: api.call("POST", f"/volumes/{vid}/s3-credentials", body)  # noqa: E731
        status, rw = mint({})
        check(status == 201 and rw["bucket"] == bucket and rw["readOnly"] is False, f"minted: {status} {rw}")
        check(len(rw["secretAccessKey"]) >= 40, "a long secret")
        status, _ = mint({"prefix": "/abs"})
        check(status == 400, "an absolute prefix is refused")
        _, ro = mint({"readOnly": True})
        _, team = mint({"prefix": "team/"})
        _, short = mint({"expiresInSeconds": 1})
        _, revoked = mint({})
        status, listed = api.call("GET", f"/volumes/{vid}/s3-credentials")
        check(status == 200 and len(listed) == 5 and all("secretAccessKey" not in c for c in listed),
              "listed without secrets")
        status, _ = api.call("DELETE", f"/volumes/{vid}/s3-credentials/{revoked['accessKeyId']}")
        check(status == 204, "revoked")

        # The same volume on a FUSE mount (its metadata file and the server's store).
        mount = Volume(work / "mount")
        mount.name = vid
        mount.meta_url = f"sqlite://{data_dir}/volumes/{vid}.db"
        mnt = mount.mount()

        s3 = s3_client(rw)
        buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
        check(buckets == [bucket], f"list_buckets: {buckets}")
        s3.head_bucket(Bucket=bucket)
        body = bytes(range(256)) * 400
        s3.put_object(Bucket=bucket, Key="docs/a/one.bin", Body=body)
        got = s3.get_object(Bucket=bucket, Key="docs/a/one.bin", Range="bytes=10-19")
        check(got["Body"].read() == body[10:20] and got["ContentRange"] == f"bytes 10-19/{len(body)}",
              "ranged GET")
        head = s3.head_object(Bucket=bucket, Key="docs/a/one.bin")
        check(head["ContentLength"] == len(body) and head["ETag"] and head["LastModified"], "HEAD")
        check((mnt / "docs/a/one.bin").read_bytes() == body, "a PUT is a file in the mount")
        code = error_code(lambda: s3.get_object(Bucket=bucket, Key="docs/a/one.bin", Range=f"bytes={len(body) + 5}-"))
        check(code == ("InvalidRange", 416), f"InvalidRange: {code}")
        code = error_code(lambda: s3.get_object(Bucket=bucket, Key="docs/none"))
        check(code == ("NoSuchKey", 404), f"NoSuchKey: {code}")
        code = error_code(lambda: s3.list_objects_v2(Bucket="other-bucket"))
        check(code == ("AccessDenied", 403), f"another bucket: {code}")

        # Written in the mount, read through the gateway.
        (mnt / "docs/from-mount.txt").write_text("written by a mount\n")
        got = s3.get_object(Bucket=bucket, Key="docs/from-mount.txt")["Body"].read()
        check(got == b"written by a mount\n", "a file of the mount is an object")

        # Multipart, parts out of order on the wire.
        parts = [os.urandom(5 << 20), os.urandom(5 << 20), os.urandom(777)]
        upload = s3.create_multipart_upload(Bucket=bucket, Key="big/multi.bin")["UploadId"]
        etags = {}
        for n in (2, 1, 3):
            etags[n] = s3.upload_part(Bucket=bucket, Key="big/multi.bin", UploadId=upload,
                                      PartNumber=n, Body=parts[n - 1])["ETag"]
        s3.complete_multipart_upload(Bucket=bucket, Key="big/multi.bin", UploadId=upload, MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
        got = s3.get_object(Bucket=bucket, Key="big/multi.bin")["Body"].read()
        check(got == b"".join(parts), "multipart upload assembled in order")
        check((mnt / "big/multi.bin").stat().st_size == len(got), "the multipart object in the mount")
        aborted = s3.create_multipart_upload(Bucket=bucket, Key="big/aborted.bin")["UploadId"]
        s3.upload_part(Bucket=bucket, Key="big/aborted.bin", UploadId=aborted, PartNumber=1, Body=b"x")
        s3.abort_multipart_upload(Bucket=bucket, Key="big/aborted.bin", UploadId=aborted)
        check(not (mnt / "big/aborted.bin").exists(), "an aborted upload leaves no file")

        # Listings: delimiter, prefix, pages.
        for i in range(7):
            s3.put_object(Bucket=bucket, Key=f"list/k{i}", Body=b"%d" % i)
        s3.put_object(Bucket=bucket, Key="list/sub/deep", Body=b"d")
        s3.put_object(Bucket=bucket, Key="list/empty-dir/", Body=b"")
        check((mnt / "list/empty-dir").is_dir(), "a key ending in '/' is a directory")
        top = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
        check([p["Prefix"] for p in top["CommonPrefixes"]] == ["big/", "docs/", "list/"] and "Contents" not in top,
              f"top level: {top.get('CommonPrefixes')}")
        inside = s3.list_objects_v2(Bucket=bucket, Prefix="list/", Delimiter="/")
        check([o["Key"] for o in inside["Contents"]] == [f"list/k{i}" for i in range(7)]
              and [p["Prefix"] for p in inside["CommonPrefixes"]] == ["list/empty-dir/", "list/sub/"],
              f"list/ with a delimiter: {inside}")
        pages, token = [], None
        while True:
            args = {"Bucket": bucket, "Prefix": "list/", "MaxKeys": 3}
            if token:
                args["ContinuationToken"] = token
            page = s3.list_objects_v2(**args)
            pages.append([o["Key"] for o in page.get("Contents", [])])
            if not page["IsTruncated"]:
                break
            token = page["NextContinuationToken"]
        flat = [k for p in pages for k in p]
        check(flat == sorted(flat) and len(flat) == 9 and "list/empty-dir/" in flat and "list/sub/deep" in flat
              and all(len(p) <= 3 for p in pages) and len(pages) == 3, f"pages: {pages}")
        after = s3.list_objects_v2(Bucket=bucket, Prefix="list/", StartAfter="list/k5")
        check([o["Key"] for o in after["Contents"]] == ["list/k6", "list/sub/deep"], "StartAfter")

        # Deletes.
        s3.delete_object(Bucket=bucket, Key="list/sub/deep")
        check(not (mnt / "list/sub").exists(), "a directory emptied by a delete goes with it")
        gone = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"list/k{i}"} for i in range(7)]})
        check(len(gone["Deleted"]) == 7 and not (mnt / "list/k0").exists(), "DeleteObjects")

        # Scoped credentials: every refusal is AccessDenied.
        s3_ro = s3_client(ro)
        check(s3_ro.get_object(Bucket=bucket, Key="docs/a/one.bin")["Body"].read() == body, "read-only reads")
        for what, call in [
            ("put", lambda: s3_ro.put_object(Bucket=bucket, Key="docs/x", Body=b"x")),
            ("delete", lambda: s3_ro.delete_object(Bucket=bucket, Key="docs/a/one.bin")),
            ("multipart", lambda: s3_ro.create_multipart_upload(Bucket=bucket, Key="docs/y")),
        ]:
            code = error_code(call)
            check(code == ("AccessDenied", 403), f"read-only {what}: {code}")
        check((mnt / "docs/a/one.bin").exists(), "nothing deleted by a read-only credential")
        s3_team = s3_client(team)
        s3_team.put_object(Bucket=bucket, Key="team/t.txt", Body=b"team")
        code = error_code(lambda: s3_team.get_object(Bucket=bucket, Key="docs/a/one.bin"))
        check(code == ("AccessDenied", 403), f"outside the prefix: {code}")
        code = error_code(lambda: s3_team.put_object(Bucket=bucket, Key="teamx", Body=b"x"))
        check(code == ("AccessDenied", 403), f"a put outside the prefix: {code}")
        seen = s3_team.list_objects_v2(Bucket=bucket)
        check([o["Key"] for o in seen["Contents"]] == ["team/t.txt"], f"a scoped listing: {seen.get('Contents')}")
        time.sleep(1.5)
        for what, cred in [("expired", short), ("revoked", revoked)]:
            code = error_code(lambda: s3_client(cred).get_object(Bucket=bucket, Key="team/t.txt"))
            check(code == ("AccessDenied", 403), f"{what}: {code}")

        # The aws CLI: cp (one PUT, and multipart above its 8 MiB threshold), sync, ls, rm.
        local = work / "local"
        (local / "tree/sub").mkdir(parents=True)
        (local / "tree/a.txt").write_text("a\n")
        (local / "tree/sub/b.txt").write_text("b\n")
        (local / "big.bin").write_bytes(os.urandom(20 << 20))
        aws(rw, "cp", str(local / "big.bin"), f"s3://{bucket}/cli/big.bin")
        check((mnt / "cli/big.bin").read_bytes() == (local / "big.bin").read_bytes(), "aws s3 cp (multipart) up")
        aws(rw, "cp", f"s3://{bucket}/cli/big.bin", str(local / "back.bin"))
        check((local / "back.bin").read_bytes() == (local / "big.bin").read_bytes(), "aws s3 cp down")
        aws(rw, "sync", str(local / "tree"), f"s3://{bucket}/cli/tree")
        check((mnt / "cli/tree/sub/b.txt").read_text() == "b\n", "aws s3 sync up")
        (mnt / "cli/tree/c.txt").write_text("c\n")
        aws(rw, "sync", f"s3://{bucket}/cli/tree", str(local / "down"))
        check(sorted(str(p.relative_to(local / "down")) for p in (local / "down").rglob("*.txt"))
              == ["a.txt", "c.txt", "sub/b.txt"], "aws s3 sync down (with the mount's file)")
        listing = aws(rw, "ls", f"s3://{bucket}/cli/").stdout
        check("PRE tree/" in listing and "big.bin" in listing, f"aws s3 ls: {listing}")
        aws(rw, "rm", "--recursive", f"s3://{bucket}/cli/")
        check(not (mnt / "cli").exists(), "aws s3 rm --recursive")
        denied = aws(ro, "cp", str(local / "tree/a.txt"), f"s3://{bucket}/ro.txt", check_ok=False)
        check(denied.returncode != 0 and "AccessDenied" in denied.stderr, f"aws read-only: {denied.stderr}")
        mount.umount()
        status, _ = api.call("DELETE", f"/volumes/{vid}")
        check(status in (200, 202, 204), f"volume deleted (with its objects): {status}")
    finally:
        if mount is not None:
            mount.cleanup()
        stop_server(server)


def main():
    work = Path(tempfile.mkdtemp(prefix="cellar-gateway-"))
    try:
        run(work)
    except (GatewayFailure, VolumeError, ClientError, OSError, subprocess.SubprocessError) as error:
        print(f"gateway: FAILED after {passed} checks: {error}", file=sys.stderr)
        print(f"gateway: work directory kept: {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    print(f"gateway: ok ({passed} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
