#!/usr/bin/env python3
"""The seed scenario: the shared-token-in-a-database design versus authgate.

What authgate replaces: N services (default 50), each running M concurrent
request loops (default 4), share one OAuth access token stored in a database
(SQLite here, one connection per service as separate processes would have).
Every outbound call reads the token from the database and calls the API with it;
on a 401 the service re-reads the database (another service may have refreshed
already) and otherwise refreshes at the IdP itself — coalesced inside the service,
one refresh at a time — writes the new token back, and retries once. That is the
*careful* version of the design; `--naive` drops the re-read and the in-service
coalescing (every 401 refreshes), as many real services do.

Through authgate, the same services send plain requests to the gateway, which
holds the token in memory (client_credentials provider, min_refresh_interval 1s).

Both runs use the same in-process mock IdP and mock API (asyncio servers on
loopback, in a child process so they do not compete with the load generator's
event loop): the API accepts only the current token; the IdP counts token
requests and, like strict IdPs, revokes the previous token whenever it issues a
new one. Mid-run (--revoke-at) the current token is revoked at the IdP.

Reported per design: IdP token requests (after start-up), store reads and writes,
failed requests, p50/p99 latency. Output: bench/results/seed.md and seed.json.

Only the standard library is used; all traffic stays on 127.0.0.1.
"""
import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from httpmini import Client, read_request, response_bytes  # noqa: E402

HOST = "127.0.0.1"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
CLIENT_SECRET = "bench-secret"
BASIC = "Basic " + base64.b64encode(f"bench:{CLIENT_SECRET}".encode()).decode()


# ============================================================ mock IdP + API
class World:
    """The state the IdP and the API share: which token is valid right now."""

    def __init__(self, idp_latency, api_latency):
        self.idp_latency, self.api_latency = idp_latency, api_latency
        self.expected = None  # "Bearer <token>" the API accepts; None = revoked
        self.generation = 0
        self.reset()

    def reset(self):
        self.token_requests = 0
        self.revocations = 0
        self.api_requests = 0
        self.api_unauthorized = 0

    def issue(self):
        # A strict IdP: issuing a token revokes the previous one.
        self.generation += 1
        token = f"tok{self.generation}-{secrets.token_hex(12)}"
        self.expected = "Bearer " + token
        self.token_requests += 1
        return token

    def stats(self):
        return {
            "token_requests": self.token_requests,
            "revocations": self.revocations,
            "api_requests": self.api_requests,
            "api_unauthorized": self.api_unauthorized,
            "generation": self.generation,
        }


def _json(status, obj, extra=None):
    headers = {"content-type": "application/json", "cache-control": "no-store"}
    headers.update(extra or {})
    return response_bytes(status, json.dumps(obj).encode(), headers)


async def _serve(handler, reader, writer):
    try:
        while True:
            req = await read_request(reader)
            if req is None:
                break
            writer.write(await handler(*req))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def run_servers(conn, idp_latency, api_latency):
    """Child process: serve the IdP and the API; send their ports back on conn."""

    async def main():
        world = World(idp_latency, api_latency)

        async def idp(method, path, headers, body):
            path = path.split("?", 1)[0]
            if method == "POST" and path == "/token":
                if world.idp_latency:
                    await asyncio.sleep(world.idp_latency)
                token = world.issue()
                return _json(200, {"access_token": token, "token_type": "Bearer", "expires_in": 3600})
            if path == "/admin/revoke":
                world.expected = None
                world.revocations += 1
                return _json(200, {"revoked": True})
            if path == "/admin/stats":
                return _json(200, world.stats())
            if path == "/admin/reset":
                world.reset()
                return _json(200, {"reset": True})
            return _json(404, {"error": "not_found"})

        unauthorized = _json(401, {"error": "invalid_token"},
                             {"www-authenticate": 'Bearer error="invalid_token"'})
        ok = response_bytes(200, b'{"ok":true}', {"content-type": "application/json"})

        async def api(method, path, headers, body):
            world.api_requests += 1
            if world.api_latency:
                await asyncio.sleep(world.api_latency)
            if world.expected is not None and headers.get("authorization") == world.expected:
                return ok
            world.api_unauthorized += 1
            return unauthorized

        s1 = await asyncio.start_server(lambda r, w: _serve(idp, r, w), HOST, 0, backlog=4096)
        s2 = await asyncio.start_server(lambda r, w: _serve(api, r, w), HOST, 0, backlog=4096)
        conn.send((s1.sockets[0].getsockname()[1], s2.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


# ============================================================ load generator
class Stats:
    def __init__(self):
        self.latencies = []
        self.ok = 0
        self.failed = 0
        self.failures = {}
        self.store_reads = 0
        self.store_writes = 0
        self.unauthorized_seen = 0  # 401s the services saw (before any retry)
        self.retries = 0
        self.service_refreshes = 0

    def record(self, status, seconds):
        self.latencies.append(seconds)
        if status == 200:
            self.ok += 1
        else:
            self.failed += 1
            self.failures[str(status)] = self.failures.get(str(status), 0) + 1


class DbService:
    """One service of the shared-database design."""

    def __init__(self, db_path, idp_port, api_port, stats, naive):
        # One connection per service, like separate processes would each have.
        self.db = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        self.idp = Client(HOST, idp_port)
        self.api_port = api_port
        self.stats, self.naive = stats, naive
        self.refreshing = None

    def read_token(self):
        self.stats.store_reads += 1
        return self.db.execute("SELECT access_token FROM token WHERE id = 1").fetchone()[0]

    def write_token(self, token):
        self.stats.store_writes += 1
        self.db.execute("UPDATE token SET access_token = ?, generation = generation + 1, updated = ? WHERE id = 1",
                        (token, time.time()))

    async def _refresh(self):
        self.stats.service_refreshes += 1
        r = await self.idp.request("POST", "/token", {
            "content-type": "application/x-www-form-urlencoded", "authorization": BASIC,
        }, b"grant_type=client_credentials")
        token = json.loads(r.body)["access_token"]
        self.write_token(token)
        return token

    async def refresh(self):
        if self.naive:  # every 401 refreshes on its own
            return await self._refresh_uncoalesced()
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self.refreshing)

    async def _refresh_uncoalesced(self):
        idp = Client(HOST, self.idp.port)
        try:
            self.stats.service_refreshes += 1
            r = await idp.request("POST", "/token", {
                "content-type": "application/x-www-form-urlencoded", "authorization": BASIC,
            }, b"grant_type=client_credentials")
            token = json.loads(r.body)["access_token"]
            self.write_token(token)
            return token
        finally:
            idp.close()

    async def call(self, api):
        token = self.read_token()
        r = await api.request("GET", "/api/data", {"authorization": "Bearer " + token})
        if r.status != 401:
            return r.status
        self.stats.unauthorized_seen += 1
        if not self.naive:
            current = self.read_token()
            if current != token:  # another service already refreshed: use its token
                self.stats.retries += 1
                return (await api.request("GET", "/api/data", {"authorization": "Bearer " + current})).status
        token = await self.refresh()
        self.stats.retries += 1
        return (await api.request("GET", "/api/data", {"authorization": "Bearer " + token})).status


class GatewayService:
    """One service of the authgate design: plain requests, no token, no store."""

    async def call(self, api):
        return (await api.request("GET", "/api/data")).status


async def drive(services, port, args, idp_port, stats):
    """Run every service's M loops for --duration, revoking mid-run."""
    start = time.monotonic()
    deadline = start + args.duration
    think = args.think_ms / 1000

    async def loop(service):
        api = Client(HOST, port)
        await asyncio.sleep(random.uniform(0, think or 0.01))  # spread the start
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(args.request_timeout):
                    status = await service.call(api)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                status = type(e).__name__
                api.close()
                api = Client(HOST, port)
            stats.record(status, time.perf_counter() - t0)
            if think:
                await asyncio.sleep(think * random.uniform(0.5, 1.5))
        api.close()

    async def revoker():
        ctl = Client(HOST, idp_port)
        for frac in args.revoke_at:
            await asyncio.sleep(max(0.0, start + frac * args.duration - time.monotonic()))
            await ctl.request("POST", "/admin/revoke")
        ctl.close()

    tasks = [loop(s) for s in services for _ in range(args.concurrency)]
    await asyncio.wait_for(asyncio.gather(revoker(), *tasks), args.duration + args.request_timeout + 30)
    return time.monotonic() - start


async def control(idp_port, path, method="POST"):
    c = Client(HOST, idp_port)
    try:
        r = await c.request(method, path)
        return json.loads(r.body)
    finally:
        c.close()


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summarize(name, stats, idp, elapsed, revocations, extra=None):
    lat = sorted(stats.latencies)
    total = stats.ok + stats.failed
    out = {
        "design": name,
        "requests": total,
        "ok": stats.ok,
        "failed": stats.failed,
        "failures": stats.failures,
        "rps": total / elapsed if elapsed else 0,
        "idp_token_requests": idp["token_requests"],
        "revocations": revocations,
        "store_reads": stats.store_reads,
        "store_writes": stats.store_writes,
        "unauthorized_seen": stats.unauthorized_seen,
        "retries": stats.retries,
        "service_refreshes": stats.service_refreshes,
        "api_requests": idp["api_requests"],
        "api_unauthorized": idp["api_unauthorized"],
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
    }
    out.update(extra or {})
    return out


# ============================================================ the two designs
async def run_shared_db(args, idp_port, api_port, workdir):
    db_path = os.path.join(workdir, "tokens.sqlite")
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE token (id INTEGER PRIMARY KEY, access_token TEXT, generation INTEGER, updated REAL)")
    # Start-up: the first token, fetched once and stored (not counted below).
    c = Client(HOST, idp_port)
    r = await c.request("POST", "/token", {"content-type": "application/x-www-form-urlencoded",
                                           "authorization": BASIC}, b"grant_type=client_credentials")
    c.close()
    db.execute("INSERT INTO token VALUES (1, ?, 1, ?)", (json.loads(r.body)["access_token"], time.time()))
    db.close()

    await control(idp_port, "/admin/reset")
    stats = Stats()
    services = [DbService(db_path, idp_port, api_port, stats, args.naive) for _ in range(args.services)]
    elapsed = await drive(services, api_port, args, idp_port, stats)
    idp = await control(idp_port, "/admin/stats", "GET")
    for s in services:
        s.db.close()
        s.idp.close()
    return summarize("shared DB" + (" (naive)" if args.naive else ""), stats, idp, elapsed, idp["revocations"])


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


async def wait_ready(admin_port, proc, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"authgate exited with {proc.returncode}")
        try:
            c = Client(HOST, admin_port)
            r = await asyncio.wait_for(c.request("GET", "/readyz"), 2)
            c.close()
            if r.status == 200:
                return
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("authgate not ready (GET /readyz != 200)")


async def run_authgate(args, idp_port, api_port, workdir, procs):
    gw_port, admin_port = free_port(), free_port()
    cfg = os.path.join(workdir, "seed.toml")
    with open(cfg, "w") as f:
        f.write(f"""# generated by bench/seed_scenario.py
[listen]
addr = "{HOST}:{gw_port}"

[admin]
addr = "{HOST}:{admin_port}"

[store]
kind = "{args.store}"
{'path = "tokens.json"' if args.store == "file" else ""}

[providers.idp]
grant = "client_credentials"
token_url = "http://{HOST}:{idp_port}/token"
client_id = "bench"
client_secret_env = "BENCH_SECRET"
min_refresh_interval = "1s"

[[routes]]
prefix = "/api"
upstream = "http://{HOST}:{api_port}"
provider = "idp"
""")
    env = dict(os.environ, BENCH_SECRET=CLIENT_SECRET, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    log = open(os.path.join(workdir, "authgate.log"), "wb")
    proc = subprocess.Popen([args.authgate_bin, "run", "--config", cfg], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    procs.append(proc)
    try:
        await wait_ready(admin_port, proc)
    except RuntimeError:
        log.flush()
        sys.stderr.write(open(os.path.join(workdir, "authgate.log")).read()[-2000:])
        raise
    startup = await control(idp_port, "/admin/stats", "GET")
    await control(idp_port, "/admin/reset")

    stats = Stats()
    services = [GatewayService() for _ in range(args.services)]
    elapsed = await drive(services, gw_port, args, idp_port, stats)
    idp = await control(idp_port, "/admin/stats", "GET")

    # The gateway's own view of what happened (refreshes, waiters, replays).
    metrics = []
    try:
        c = Client(HOST, admin_port)
        r = await c.request("GET", "/metrics")
        c.close()
        keep = ("authgate_token_refreshes_total", "authgate_refresh_waiters_total", "authgate_replays_total")
        metrics = [l for l in r.body.decode().splitlines() if l.startswith(keep)]
    except (OSError, asyncio.IncompleteReadError):
        pass
    return summarize("authgate", stats, idp, elapsed, idp["revocations"],
                     {"startup_token_requests": startup["token_requests"], "metrics": metrics})


# ============================================================ report
def write_report(results, args, path_md, path_json, note):
    with open(path_json, "w") as f:
        json.dump({"parameters": vars(args), "results": results}, f, indent=2, default=str)

    def f(v, d=1):
        return "–" if v is None else f"{v:,.{d}f}"

    lines = [
        "# Seed scenario: shared token in a database vs authgate", "",
        f"- {args.services} services × {args.concurrency} concurrent request loops, {args.duration:g} s, "
        f"think time {args.think_ms:g} ms (±50%), token revoked at the IdP at "
        + ", ".join(f"{x * args.duration:g} s" for x in args.revoke_at) + ".",
        f"- Mock IdP latency {args.idp_latency_ms:g} ms, API latency {args.api_latency_ms:g} ms; the IdP "
        "revokes the previous token whenever it issues one; the API accepts only the current token.",
        "- Shared-DB services: SQLite, one connection per service, token read on every request; on 401 "
        + ("refresh at once (naive)." if args.naive else
           "re-read the DB, else refresh (one refresh at a time per service), write back, retry once."),
        f"- authgate: client_credentials provider, `min_refresh_interval = \"1s\"`, store `{args.store}`.",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} CPUs", "",
        "| design | requests | failed | IdP token requests | per revocation | store reads | store writes | 401s seen by services | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per = r["idp_token_requests"] / r["revocations"] if r["revocations"] else None
        lines.append(
            f"| {r['design']} | {r['requests']:,} | {r['failed']:,} | {r['idp_token_requests']} | {f(per)} "
            f"| {r['store_reads']:,} | {r['store_writes']:,} | {r['unauthorized_seen']:,} "
            f"| {f(r['p50_ms'], 2)} | {f(r['p99_ms'], 2)} | {f(r['max_ms'], 1)} |")
    lines += [
        "",
        "IdP token requests are counted by the mock IdP after start-up (the first token is not "
        "counted). Store reads/writes are the services' own database accesses; authgate's services "
        "hold no token and touch no store (authgate reads its store only at start-up).",
    ]
    for r in results:
        if r.get("failures"):
            lines.append(f"\nFailures ({r['design']}): " + ", ".join(f"{k}: {v}" for k, v in r["failures"].items()))
        if r.get("metrics"):
            lines += ["", f"authgate metrics after the run:", "```"] + r["metrics"] + ["```"]
    if note:
        lines += ["", f"**Note:** {note}"]
    lines.append("")
    with open(path_md, "w") as fh:
        fh.write("\n".join(lines))


async def main_async(args, procs, workdir):
    parent, child = mp.Pipe()
    server = mp.get_context("fork").Process(
        target=run_servers, args=(child, args.idp_latency_ms / 1000, args.api_latency_ms / 1000), daemon=True)
    server.start()
    procs.append(server)
    if not parent.poll(10):
        raise RuntimeError("mock servers did not start")
    idp_port, api_port = parent.recv()
    print(f"mock IdP on {HOST}:{idp_port}, mock API on {HOST}:{api_port}", file=sys.stderr)

    results, note = [], None
    if args.design in ("both", "shared-db"):
        print(f"shared-DB design: {args.services}×{args.concurrency} for {args.duration:g}s …", file=sys.stderr)
        results.append(await run_shared_db(args, idp_port, api_port, workdir))
        print(json.dumps(results[-1]), file=sys.stderr)
    if args.design in ("both", "authgate"):
        if os.access(args.authgate_bin, os.X_OK):
            print(f"authgate design: {args.services}×{args.concurrency} for {args.duration:g}s …", file=sys.stderr)
            results.append(await run_authgate(args, idp_port, api_port, workdir, procs))
            print(json.dumps(results[-1]), file=sys.stderr)
        else:
            note = (f"authgate binary not found at {args.authgate_bin}: the authgate half was skipped "
                    "(build it with `cargo build --release` or pass --authgate-bin).")
            print("NOTE: " + note, file=sys.stderr)
    return results, note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=4, help="concurrent request loops per service")
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--think-ms", type=float, default=50, help="pause between a loop's requests")
    ap.add_argument("--revoke-at", type=lambda s: [float(x) for x in s.split(",")], default=[0.5],
                    help="comma-separated fractions of the run at which the token is revoked")
    ap.add_argument("--idp-latency-ms", type=float, default=20)
    ap.add_argument("--api-latency-ms", type=float, default=0)
    ap.add_argument("--request-timeout", type=float, default=10)
    ap.add_argument("--naive", action="store_true", help="shared-DB services refresh on every 401")
    ap.add_argument("--design", choices=("both", "shared-db", "authgate"), default="both")
    ap.add_argument("--store", choices=("file", "memory"), default="file", help="authgate's store")
    ap.add_argument("--authgate-bin", default=os.environ.get(
        "AUTHGATE_BIN", os.path.join(REPO_DIR, "target", "release", "authgate")))
    ap.add_argument("--out-dir", default=os.environ.get("RESULTS_DIR", os.path.join(BENCH_DIR, "results")))
    args = ap.parse_args()

    procs = []
    workdir = tempfile.mkdtemp(prefix="authgate-seed.")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results, note = asyncio.run(main_async(args, procs, workdir))
        os.makedirs(args.out_dir, exist_ok=True)
        suffix = "" if args.design == "both" else "-" + args.design
        md = os.path.join(args.out_dir, f"seed{suffix}.md")
        write_report(results, args, md, os.path.join(args.out_dir, f"seed{suffix}.json"), note)
        print(open(md).read())
    finally:
        for p in procs:  # every process we started ends with us
            if isinstance(p, subprocess.Popen):
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
            elif p.is_alive():
                p.terminate()
                p.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
