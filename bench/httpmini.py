"""Minimal HTTP/1.1 over asyncio streams, for the bench's Python tools.

Just enough of HTTP/1.1 for a load generator and mock servers on loopback:
keep-alive, content-length and chunked bodies. It is deliberately small so the
Python side costs as little CPU as possible and is not the bottleneck (urllib and
http.client open a connection or a thread per request; this reuses one stream).
Only loopback addresses are accepted, so the tools can never send traffic
anywhere else.
"""
import asyncio
import ipaddress

LOOPBACK_NAMES = {"localhost"}


def check_loopback(host):
    if host in LOOPBACK_NAMES:
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"refusing non-loopback address {host!r}")


def _parse_headers(block):
    """block: bytes up to and including the blank line. Returns (first line, {name: value})."""
    lines = block.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return lines[0].decode("latin-1"), headers


async def _read_body(reader, headers, allow_eof=False):
    length = headers.get("content-length")
    if length is not None:
        return await reader.readexactly(int(length)) if int(length) else b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers (if any) end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
    return await reader.read() if allow_eof else b""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


class Client:
    """One keep-alive connection; reconnects transparently when the peer closed it."""

    def __init__(self, host, port):
        check_loopback(host)
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.host_header = f"{host}:{port}"

    async def connect(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None

    async def request(self, method, path, headers=None, body=b""):
        if self.writer is None:
            await self.connect()
        head = [f"{method} {path} HTTP/1.1\r\nhost: {self.host_header}\r\n"]
        if headers:
            head += [f"{k}: {v}\r\n" for k, v in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        try:
            self.writer.write("".join(head).encode("latin-1") + body)
            block = await self.reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            # A keep-alive connection the server already closed: retry once on a new one.
            self.close()
            await self.connect()
            self.writer.write("".join(head).encode("latin-1") + body)
            block = await self.reader.readuntil(b"\r\n\r\n")
        first, rheaders = _parse_headers(block)
        status = int(first.split(" ", 2)[1])
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            rbody = b""
        else:
            rbody = await _read_body(self.reader, rheaders, allow_eof=True)
        if rheaders.get("connection", "").lower() == "close" or (
            "content-length" not in rheaders and "transfer-encoding" not in rheaders and rbody
        ):
            self.close()
        return Response(status, rheaders, rbody)


async def read_request(reader):
    """Server side: read one request. Returns (method, path, headers, body) or None at EOF."""
    try:
        block = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    first, headers = _parse_headers(block)
    method, path, _ = first.split(" ", 2)
    body = await _read_body(reader, headers)
    return method, path, headers, body


def response_bytes(status, body=b"", headers=None, reason="X"):
    """Serialise a response with content-length (keep-alive friendly)."""
    head = [f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"]
    if headers:
        head += [f"{k}: {v}\r\n" for k, v in headers.items()]
    head.append("\r\n")
    return "".join(head).encode("latin-1") + body
