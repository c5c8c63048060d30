"""A bounded load generator: short HTTP requests over new connections, or one bulk stream.

    python -m lab.load --target 10.96.0.10:80 --requests 2000 --concurrency 16
    python -m lab.load --target 10.96.0.10:81 --bulk

Each request opens a new TCP connection, sends ``GET /``, reads the whole answer and closes:
what a proxy costs is paid per connection. Bounded by the request count and a deadline.
Prints JSON: requests, errors, seconds, rps, latency percentiles (ms); or bytes and MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time


async def _one(host: str, port: int, timeout: float) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: load\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
        if not data.startswith(b"HTTP/1.0 200"):
            raise ConnectionError("bad answer")
    finally:
        writer.close()
    return time.perf_counter() - t0


async def requests(host: str, port: int, total: int, concurrency: int, deadline: float,
                   timeout: float) -> dict[str, object]:
    latencies: list[float] = []
    errors = 0
    next_id = 0
    end = time.monotonic() + deadline

    async def worker() -> None:
        nonlocal next_id, errors
        while next_id < total and time.monotonic() < end:
            next_id += 1
            try:
                latencies.append(await _one(host, port, timeout))
            except (OSError, asyncio.TimeoutError, ConnectionError):
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 if lat else float("nan")

    return {"requests": len(lat), "errors": errors, "seconds": elapsed,
            "rps": len(lat) / elapsed if elapsed else 0.0, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


async def bulk(host: str, port: int, deadline: float) -> dict[str, object]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    total = 0
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
    finally:
        writer.close()
    elapsed = time.perf_counter() - t0
    return {"bytes": total, "seconds": elapsed, "mb_per_s": total / elapsed / 1e6 if elapsed else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="IP:PORT")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=60.0, help="stop after this many seconds")
    parser.add_argument("--bulk", action="store_true", help="read one stream to its end instead")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    if args.bulk:
        out = asyncio.run(bulk(host, int(port), min(args.deadline, 120)))
    else:
        out = asyncio.run(requests(host, int(port), args.requests, args.concurrency,
                                   min(args.deadline, 120), args.timeout))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
