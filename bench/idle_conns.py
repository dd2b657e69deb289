#!/usr/bin/env python3
"""Open N keep-alive connections to a gateway on loopback, send one request on
each (so every connection is fully set up, request path included), then hold them
all idle. Prints "READY ok=N failed=M" once every connection has its response,
then holds them until --hold seconds pass or it gets SIGTERM/SIGINT."""
import argparse
import asyncio
import signal

from httpmini import Client, check_loopback


async def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/api/idle")
    ap.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=256, help="connections being opened at once")
    ap.add_argument("--hold", type=float, default=600, help="seconds to hold the connections at most")
    args = ap.parse_args()
    check_loopback(args.host)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}

    gate = asyncio.Semaphore(args.parallel)
    clients, statuses = [], {}

    async def one():
        async with gate:
            c = Client(args.host, args.port)
            try:
                r = await asyncio.wait_for(c.request("GET", args.path, headers), 30)
                statuses[r.status] = statuses.get(r.status, 0) + 1
                if c.writer is not None:
                    clients.append(c)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                statuses[type(e).__name__] = statuses.get(type(e).__name__, 0) + 1
                c.close()

    await asyncio.gather(*(one() for _ in range(args.connections)))
    ok = len(clients)
    print(f"READY ok={ok} failed={args.connections - ok} statuses={statuses}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.hold)
    except asyncio.TimeoutError:
        pass
    # How many are still open (the server may have closed idle ones).
    alive = sum(1 for c in clients if c.reader is not None and not c.reader.at_eof())
    print(f"DONE still_open={alive}", flush=True)
    for c in clients:
        c.close()


if __name__ == "__main__":
    asyncio.run(main())
