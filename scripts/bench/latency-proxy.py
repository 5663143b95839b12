#!/usr/bin/env python3
"""A latency-injecting, request-counting HTTP/1.1 proxy for the S3 benchmark.

    latency-proxy.py LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS STATS_FILE

Listens on 127.0.0.1:LISTEN_PORT and forwards every connection to the
upstream S3 server. Each request's head is held DELAY_MS before it is sent
on (one added round trip per request, as a distant S3 endpoint adds), then
its body is streamed through; responses flow back unchanged. The Host header
is kept as the client sent it, so SigV4 signatures still verify upstream.

Counts requests by method and the bytes of request and response bodies, and
rewrites STATS_FILE (JSON) after every request, so a caller reads the
counters before and after a phase and takes the difference. With
LATENCY_PROXY_LOG=FILE every request line is also appended to FILE, after
the event loop's clock in seconds.

Why not `tc netem`: it delays every packet of every program on loopback (the
machine is shared), not each request of the tool under test.
"""

import asyncio
import json
import os
import sys

HEAD_LIMIT = 64 * 1024
# LATENCY_PROXY_LOG=FILE: every request line appended there (for diagnosis).
LOG = open(os.environ["LATENCY_PROXY_LOG"], "a") if os.environ.get("LATENCY_PROXY_LOG") else None


class Stats:
    def __init__(self, path):
        self.path = path
        self.requests = 0
        self.by_method = {}
        self.bytes_up = 0
        self.bytes_down = 0

    def request(self, method):
        self.requests += 1
        self.by_method[method] = self.by_method.get(method, 0) + 1

    def write(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "requests": self.requests,
                    "by_method": self.by_method,
                    "bytes_up": self.bytes_up,
                    "bytes_down": self.bytes_down,
                },
                f,
            )
        os.replace(tmp, self.path)


async def copy_body(reader, writer, length, stats):
    while length > 0:
        data = await reader.read(min(length, 1 << 16))
        if not data:
            raise ConnectionError("client closed inside a request body")
        writer.write(data)
        stats.bytes_up += len(data)
        length -= len(data)
        await writer.drain()


async def copy_chunked(reader, writer, stats):
    # Transfer-Encoding: chunked requests: size line, data, CRLF; 0 ends (then trailers).
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while True:
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await copy_body(reader, writer, size + 2, stats)


async def requests(client_r, upstream_w, delay, stats):
    """Client to upstream, one request at a time: delay, head, body."""
    try:
        while True:
            try:
                head = await client_r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # the client closed between requests
            if len(head) > HEAD_LIMIT:
                raise ConnectionError("request head too large")
            lines = head.split(b"\r\n")
            method = lines[0].split(b" ", 1)[0].decode("ascii", "replace")
            headers = {}
            for line in lines[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            stats.request(method)
            if LOG:
                rng = headers.get(b"range", b"").decode("ascii", "replace")
                at = f"{asyncio.get_running_loop().time():.3f} "
                LOG.write(at + lines[0].decode("ascii", "replace") + (f" range={rng}" if rng else "") + "\n")
                LOG.flush()
            if delay:
                await asyncio.sleep(delay)
            upstream_w.write(head)
            await upstream_w.drain()
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                await copy_chunked(client_r, upstream_w, stats)
            else:
                await copy_body(client_r, upstream_w, int(headers.get(b"content-length", b"0")), stats)
            stats.write()
    finally:
        upstream_w.close()


async def responses(upstream_r, client_w, stats):
    """Upstream to client, byte for byte."""
    try:
        while True:
            data = await upstream_r.read(1 << 16)
            if not data:
                return
            stats.bytes_down += len(data)
            client_w.write(data)
            await client_w.drain()
    finally:
        client_w.close()


async def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    port, upstream, delay_ms, stats_path = sys.argv[1:]
    up_host, up_port = upstream.rsplit(":", 1)
    stats = Stats(stats_path)
    stats.write()
    delay = float(delay_ms) / 1000.0

    async def handle(client_r, client_w):
        try:
            upstream_r, upstream_w = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            client_w.close()
            return
        up = asyncio.ensure_future(requests(client_r, upstream_w, delay, stats))
        down = asyncio.ensure_future(responses(upstream_r, client_w, stats))
        # Either side closing ends the connection.
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        for t in (up, down):
            t.cancel()
        for t in (up, down):
            try:
                await t
            except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, ValueError, OSError):
                pass
        upstream_w.close()
        client_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", int(port), limit=HEAD_LIMIT * 2)
    print(f"latency-proxy: 127.0.0.1:{port} -> {upstream}, {delay_ms} ms per request", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
