#!/usr/bin/env python3
"""A fault-injecting HTTP proxy for S3 on loopback, between Cellar and a tests/harness/rgw.sh RGW.

Each request from the client is read whole, forwarded on a fresh upstream connection and its
answer read whole, so that the proxy can delay, refuse, fail, cut or corrupt any exchange. Faults
are switched at run time through a small control endpoint (plain HTTP on another loopback port):

    GET /mode?mode=M[&ms=N][&status=S&code=C][&p=P][&methods=GET,PUT][&keep=F][&flips=N]
    GET /stats    counters as JSON (requests, faulted, per mode)

Modes (`p`: fraction of matching requests that get the fault, default 1; `methods`: only
requests of these methods get it, default all; the others pass):
    pass        forward everything
    delay       wait `ms` milliseconds before forwarding
    refuse      stop listening (connections are refused); idle client connections are closed
    reset       accept, read the request, reset the connection (TCP RST) without an answer
    error       answer `status` (500, 503) with an S3 XML error body of code `code`
                (InternalError, ServiceUnavailable, SlowDown) without forwarding
    truncate    forward; a GET body comes back cut to `keep` of its length (default 0.5),
                with headers that agree with the cut (a well-formed short answer)
    corrupt     forward; `flips` bytes (default 3) of a GET body are flipped
    blackhole   accept and read requests, never answer (connections stay open)
    stop        like the server dying: stop listening and drop every open connection at once

Library: `start(upstream)` runs the proxy as a child process and returns a `FaultProxy`, whose
`set(mode, **params)` switches faults; `in_front_of_rgw()` starts one in front of the RGW named
by CELLAR_TEST_S3_ENDPOINT and returns it with the store URL that goes through it.
CLI: faultproxy.py --upstream http://127.0.0.1:PORT [--port-file FILE] prints
"PROXY_PORT CONTROL_PORT" (and writes them to FILE) once both listen. Stdlib only.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

MODES = ("pass", "delay", "refuse", "reset", "error", "truncate", "corrupt", "blackhole", "stop")
ERROR_MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Please reduce your request rate.",
    "SlowDown": "Please reduce your request rate.",
}
# Longest a request or answer may take to arrive before the proxy gives up on it.
IO_TIMEOUT = 120


class Fault:
    def __init__(self, params=None):
        params = params or {}
        self.mode = params.get("mode", "pass")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (one of {', '.join(MODES)})")
        self.ms = int(params.get("ms", 0))
        self.status = int(params.get("status", 503))
        self.code = params.get("code", "SlowDown" if self.status == 503 else "InternalError")
        if self.code not in ERROR_MESSAGES:
            raise ValueError(f"unknown S3 error code {self.code!r}")
        self.p = float(params.get("p", 1.0))
        methods = params.get("methods", "")
        self.methods = {m.upper() for m in methods.split(",") if m}
        self.keep = float(params.get("keep", 0.5))
        self.flips = int(params.get("flips", 3))

    def applies(self, method):
        if self.methods and method not in self.methods:
            return False
        return self.p >= 1.0 or random.random() < self.p


async def read_head(reader):
    """Start line and headers (as a list, case kept) of an HTTP message; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            return None
        raise
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def header(headers, name):
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


async def read_body(reader, headers, until_eof=False):
    length = header(headers, "content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if (header(headers, "transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readline()).strip():
                    pass
                return bytes(body)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return await reader.read() if until_eof else b""


def render(start, headers, body):
    out = [start]
    out += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body


def without(headers, *names):
    return [(k, v) for k, v in headers if k.lower() not in names]


def s3_error(status, code, resource):
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{ERROR_MESSAGES[code]}</Message>"
        f"<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    headers = [
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
        ("x-amz-request-id", "faultproxy"),
    ]
    return render(f"HTTP/1.1 {status} {reason}", headers, body)


def truncated(start, headers, body, keep):
    """A well-formed answer carrying only the first `keep` of the body."""
    cut = body[: int(len(body) * keep)]
    headers = without(headers, "content-length", "transfer-encoding")
    headers.append(("Content-Length", str(len(cut))))
    content_range = header(headers, "content-range")
    if content_range and cut:
        # bytes A-B/T -> bytes A-(A+len-1)/T, so the short answer looks deliberate.
        unit, _, rest = content_range.partition(" ")
        span, _, total = rest.partition("/")
        first = int(span.split("-")[0])
        headers = without(headers, "content-range")
        headers.append(("Content-Range", f"{unit} {first}-{first + len(cut) - 1}/{total}"))
    return render(start, headers, cut)


def corrupted(body, flips):
    data = bytearray(body)
    for _ in range(flips if data else 0):
        at = random.randrange(len(data))
        data[at] ^= 0xFF
    return bytes(data)


def reset(writer):
    """Closes with a TCP RST: SO_LINGER on with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    def __init__(self, upstream):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError("upstream must be http://HOST:PORT")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.fault = Fault()
        self.server = None
        self.port = None
        self.connections = set()
        self.stats = {"requests": 0, "faulted": 0, "by_mode": {}}

    async def listen(self, port=0):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close_listener(self):
        if self.server is not None:
            self.server.close()
            self.server = None

    async def set_fault(self, fault):
        self.fault = fault
        if fault.mode in ("refuse", "stop"):
            await self.close_listener()
            for writer in list(self.connections):
                if fault.mode == "stop" or not getattr(writer, "busy", False):
                    writer.transport.abort()
        elif self.server is None:
            # The same port again, so that clients reconnect to where they were.
            for _ in range(50):
                try:
                    await self.listen(self.port)
                    break
                except OSError:
                    await asyncio.sleep(0.1)

    async def serve(self, reader, writer):
        self.connections.add(writer)
        writer.busy = False
        try:
            while True:
                request = await asyncio.wait_for(read_head(reader), IO_TIMEOUT * 10)
                if request is None:
                    return
                writer.busy = True
                start, headers = request
                body = await asyncio.wait_for(read_body(reader, headers), IO_TIMEOUT)
                if not await self.answer(start, headers, body, reader, writer):
                    return
                writer.busy = False
                if self.fault.mode in ("refuse", "stop"):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            return
        finally:
            self.connections.discard(writer)
            if not writer.transport.is_closing():
                writer.close()

    def count(self, mode):
        self.stats["faulted"] += 1
        self.stats["by_mode"][mode] = self.stats["by_mode"].get(mode, 0) + 1

    async def answer(self, start, headers, body, reader, writer):
        """Handles one request; returns whether the connection may carry another."""
        self.stats["requests"] += 1
        method, target = start.split(" ")[:2]
        fault = self.fault
        mode = fault.mode if fault.mode != "pass" and fault.applies(method) else "pass"
        if mode != "pass":
            self.count(mode)
        if mode in ("refuse", "stop", "reset"):
            reset(writer)
            return False
        if mode == "blackhole":
            # Hold the connection open until the client gives up (or the mode changes and the
            # client closes it).
            while not writer.transport.is_closing() and await reader.read(1 << 16):
                pass
            return False
        if mode == "error":
            writer.write(s3_error(fault.status, fault.code, target.split("?")[0]))
            await writer.drain()
            return True
        if mode == "delay":
            await asyncio.sleep(fault.ms / 1000)
        answer = await self.forward(method, start, headers, body)
        if answer is None:
            reset(writer)
            return False
        rstart, rheaders, rbody = answer
        status = int(rstart.split(" ")[1])
        is_data = method == "GET" and status in (200, 206) and rbody
        if mode == "truncate" and is_data:
            writer.write(truncated(rstart, rheaders, rbody, fault.keep))
        else:
            if mode == "corrupt" and is_data:
                rbody = corrupted(rbody, fault.flips)
            rheaders = without(rheaders, "content-length", "transfer-encoding", "connection")
            rheaders.append(("Content-Length", str(len(rbody))))
            writer.write(render(rstart, rheaders, rbody if method != "HEAD" else b""))
        await writer.drain()
        return True

    async def forward(self, method, start, headers, body):
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream), IO_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            out = without(headers, "connection", "keep-alive")
            out.append(("Connection", "close"))
            up_writer.write(render(start, out, body))
            await up_writer.drain()
            head = await asyncio.wait_for(read_head(up_reader), IO_TIMEOUT)
            if head is None:
                return None
            rstart, rheaders = head
            status = int(rstart.split(" ")[1])
            if method == "HEAD" or status in (204, 304):
                rbody = b""
            else:
                rbody = await asyncio.wait_for(
                    read_body(up_reader, rheaders, until_eof=True), IO_TIMEOUT
                )
            return rstart, rheaders, rbody
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            return None
        finally:
            up_writer.close()


async def control(proxy, reader, writer):
    try:
        head = await asyncio.wait_for(read_head(reader), 30)
        if head is None:
            return
        target = head[0].split(" ")[1]
        url = urllib.parse.urlsplit(target)
        params = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/mode":
            try:
                fault = Fault(params)
            except ValueError as e:
                status, body = 400, {"error": str(e)}
            else:
                await proxy.set_fault(fault)
                status, body = 200, {"mode": fault.mode}
        elif url.path == "/stats":
            status, body = 200, {**proxy.stats, "mode": proxy.fault.mode}
        else:
            status, body = 404, {"error": "unknown path"}
        data = json.dumps(body).encode()
        writer.write(
            render(
                f"HTTP/1.1 {status} X",
                [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                 ("Connection", "close")],
                data,
            )
        )
        await writer.drain()
    finally:
        writer.close()


async def run(upstream, port_file):
    proxy = Proxy(upstream)
    await proxy.listen()
    ctl = await asyncio.start_server(lambda r, w: control(proxy, r, w), "127.0.0.1", 0)
    ports = f"{proxy.port} {ctl.sockets[0].getsockname()[1]}"
    if port_file:
        tmp = f"{port_file}.tmp"
        Path(tmp).write_text(ports + "\n")
        os.replace(tmp, port_file)
    print(ports, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Nothing to clean up; tearing the loop down would only report the connections it cuts.
    sys.stdout.flush()
    os._exit(0)


class FaultProxy:
    """A proxy child process (see `start`)."""

    def __init__(self, process, port, control_port):
        self.process = process
        self.endpoint = f"http://127.0.0.1:{port}"
        self.control = f"http://127.0.0.1:{control_port}"

    def set(self, mode, **params):
        query = urllib.parse.urlencode({"mode": mode, **params})
        with urllib.request.urlopen(f"{self.control}/mode?{query}", timeout=10) as answer:
            return json.load(answer)

    def stats(self):
        with urllib.request.urlopen(f"{self.control}/stats", timeout=10) as answer:
            return json.load(answer)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(upstream):
    process = subprocess.Popen(
        [sys.executable, __file__, "--upstream", upstream],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline().split()
    if len(line) != 2:
        process.kill()
        raise RuntimeError(f"faultproxy did not start (exit {process.wait()})")
    return FaultProxy(process, int(line[0]), int(line[1]))


def in_front_of_rgw():
    """(proxy, store URL through it) for the RGW of tests/harness/rgw.sh's env."""
    endpoint = os.environ.get("CELLAR_TEST_S3_ENDPOINT")
    store_url = os.environ.get("CELLAR_TEST_S3_URL")
    if not endpoint or not store_url:
        raise RuntimeError(
            "CELLAR_TEST_S3_ENDPOINT / CELLAR_TEST_S3_URL are not set: start RGW with "
            "tests/harness/rgw.sh and source its env file"
        )
    proxy = start(endpoint)
    return proxy, store_url.replace(
        urllib.parse.quote(endpoint, safe=""), urllib.parse.quote(proxy.endpoint, safe="")
    ).replace(endpoint, proxy.endpoint)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the S3 server")
    parser.add_argument("--port-file", help="also write 'PROXY_PORT CONTROL_PORT' here")
    args = parser.parse_args()
    asyncio.run(run(args.upstream, args.port_file))


if __name__ == "__main__":
    main()
