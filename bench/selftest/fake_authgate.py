#!/usr/bin/env python3
"""A stand-in for the authgate binary, used ONLY to check the bench harness
end to end before the real gateway exists (AUTHGATE_BIN=bench/selftest/fake_authgate.py).
It is slow (pure Python, HTTP/1.1 only) and its numbers mean nothing.

It understands the subset of the config the bench scripts write: [listen] addr,
[admin] addr (/readyz, /metrics), one provider (static or client_credentials),
[[routes]] prefix/upstream/provider. It injects the credential, and on a 401
refreshes once (coalesced, honouring min_refresh_interval) and replays once.
"""
import asyncio
import base64
import json
import os
import sys
import time
import tomllib
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from httpmini import Client, read_request, response_bytes  # noqa: E402


def dur(s, default):
    if not s:
        return default
    for suffix, mult in (("ms", 0.001), ("s", 1), ("m", 60)):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return default


class Provider:
    def __init__(self, cfg):
        self.cfg = cfg
        self.token, self.generation, self.last = None, 0, 0.0
        self.refreshes = 0
        self.inflight = None
        self.min_interval = dur(cfg.get("min_refresh_interval"), 5)
        if cfg["grant"] == "static":
            self.token, self.generation = os.environ[cfg["token_env"]], 1

    async def fetch(self):
        u = urlsplit(self.cfg["token_url"])
        c = Client(u.hostname, u.port)
        secret = os.environ[self.cfg["client_secret_env"]]
        basic = base64.b64encode(f"{self.cfg['client_id']}:{secret}".encode()).decode()
        r = await c.request("POST", u.path, {"authorization": "Basic " + basic,
                                             "content-type": "application/x-www-form-urlencoded"},
                            b"grant_type=client_credentials")
        c.close()
        new = json.loads(r.body)["access_token"]
        self.refreshes += 1
        self.last = time.monotonic()
        if new != self.token:
            self.token, self.generation = new, self.generation + 1

    async def refresh(self, sent_generation):
        if self.cfg["grant"] == "static" or sent_generation != self.generation:
            return
        if time.monotonic() - self.last < self.min_interval:
            return
        if self.inflight is None or self.inflight.done():
            self.inflight = asyncio.ensure_future(self.fetch())
        await asyncio.shield(self.inflight)


async def main(cfg):
    provider_name, pcfg = next(iter(cfg["providers"].items()))
    prov = Provider(pcfg)
    if prov.token is None:
        await prov.fetch()
    route = cfg["routes"][0]
    up = urlsplit(route["upstream"])
    prefix = route["prefix"]

    async def gateway(reader, writer):
        client = Client(up.hostname, up.port)  # one upstream connection per caller connection
        try:
            while (req := await read_request(reader)) is not None:
                method, path, headers, body = req
                if not (path == prefix or path.startswith(prefix + "/")):
                    writer.write(response_bytes(404, b'{"error":"no_route"}'))
                    continue
                target = (up.path.rstrip("/") + path[len(prefix):]) or "/"
                fwd = {k: v for k, v in headers.items() if k not in ("host", "authorization", "connection", "content-length")}
                for attempt in (0, 1):
                    gen = prov.generation
                    fwd["authorization"] = "Bearer " + prov.token
                    r = await client.request(method, target, fwd, body)
                    if r.status != 401 or attempt:
                        break
                    await prov.refresh(gen)
                    if prov.generation == gen:
                        break
                hdrs = {k: v for k, v in r.headers.items() if k not in ("content-length", "connection", "transfer-encoding")}
                writer.write(response_bytes(r.status, r.body, hdrs))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            client.close()
            writer.close()

    async def admin(reader, writer):
        try:
            while (req := await read_request(reader)) is not None:
                path = req[1]
                if path == "/readyz":
                    writer.write(response_bytes(200 if prov.token else 503, b'{"store":"ok"}'))
                elif path == "/metrics":
                    text = f'authgate_token_refreshes_total{{provider="{provider_name}",trigger="any",outcome="ok"}} {prov.refreshes}\n'
                    writer.write(response_bytes(200, text.encode()))
                else:
                    writer.write(response_bytes(200, b"ok"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    host, port = cfg["listen"]["addr"].rsplit(":", 1)
    servers = [await asyncio.start_server(gateway, host, int(port), backlog=4096)]
    if "admin" in cfg:
        h, p = cfg["admin"]["addr"].rsplit(":", 1)
        servers.append(await asyncio.start_server(admin, h, int(p)))
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    path = args[args.index("--config") + 1]
    with open(path, "rb") as f:
        asyncio.run(main(tomllib.load(f)))
