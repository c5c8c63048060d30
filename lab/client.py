"""A bounded probe client: connects N times and reports who answered, as JSON.

Run inside a namespace: ``python -m lab.client --target 10.96.0.10:80 --count 100``.
Each TCP attempt is a new connection (new source port, so a new random backend choice); each
UDP attempt uses a new socket. Output: ``{"answers": [[pod, seen_ip], ...], "errors": {...}}``.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import struct
import time
from collections import Counter


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def split_target(text: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def probe_once(target: tuple[str, int], *, proto: str, source: str | None, timeout: float,
               http: bool = False, reset_close: bool = False) -> tuple[str, str] | str:
    """One attempt: ``(pod, seen_ip)`` or an error word (refused, timeout, unreachable, ...).

    ``reset_close``: end a TCP connection with a reset once the answer is read, so the backend
    keeps no TIME_WAIT socket. A client opening hundreds of connections a second through
    masquerade needs it: when its source port comes round again, conntrack replaces the old
    flow and may pick a masquerade port the backend still holds in TIME_WAIT, and the new SYN
    gets an ACK instead of a SYN-ACK (a 1 s retransmit, or a timeout). The soak measured that
    with any proxy's rules; it is the kernel's, not the proxy's."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(target[0]), kind) as s:
        s.settimeout(timeout)
        if reset_close and proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source:
            s.bind((source, 0))
        try:
            s.connect(target)
            if proto == "udp":
                s.send(b"hello\n")
                data = s.recv(512)
            elif http:
                s.sendall(b"GET / HTTP/1.0\r\nHost: probe\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                data = data.split(b"\r\n\r\n", 1)[-1]
            else:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
        except ConnectionRefusedError:
            return "refused"
        except socket.timeout:
            return "timeout"
        except OSError as err:
            return errno.errorcode.get(err.errno or 0, str(err)).lower()
    parts = data.decode(errors="replace").split()
    if len(parts) != 2:
        return "garbled"
    return parts[0], parts[1]


def udp_stream(target: tuple[str, int], *, seconds: float, interval: float) -> None:
    """One UDP socket (one source port, so one conntrack entry) sending every ``interval``
    for ``seconds``; prints a JSON line per reply: monotonic time and who answered."""
    end = time.monotonic() + seconds
    with socket.socket(_family(target[0]), socket.SOCK_DGRAM) as s:
        s.connect(target)
        s.settimeout(interval)
        while time.monotonic() < end:
            try:
                s.send(b"ping\n")
                data = s.recv(512)
                print(json.dumps({"t": time.monotonic(), "pod": data.decode().split()[0]}), flush=True)
            except (socket.timeout, ConnectionRefusedError):
                print(json.dumps({"t": time.monotonic(), "pod": None}), flush=True)
            time.sleep(interval)


def hold(target: tuple[str, int], timeout: float) -> None:
    """One long-lived TCP connection: a line out and its answer back, then again for every
    line read on stdin, until EOF. Prints one JSON line per exchange."""
    import sys

    with socket.create_connection(target, timeout=timeout) as s:
        f = s.makefile("rwb")
        while True:
            try:
                f.write(b"ping\n")
                f.flush()
                answer = f.readline().decode().split()
                print(json.dumps({"pod": answer[0] if answer else None}), flush=True)
            except OSError as err:
                print(json.dumps({"pod": None, "error": str(err)}), flush=True)
            if not sys.stdin.readline():
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="IP:PORT or [IPv6]:PORT")
    parser.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--source", action="append", default=[],
                        help="source address to bind (repeatable: attempts rotate over them)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per attempt")
    parser.add_argument("--http", action="store_true", help="speak HTTP/1.0 (the echo's --http-port)")
    parser.add_argument("--reset-close", action="store_true",
                        help="close TCP connections with a reset once answered (no TIME_WAIT on the backend; "
                        "for clients that open hundreds of connections a second)")
    parser.add_argument("--deadline", type=float, default=60.0, help="stop after this many seconds")
    parser.add_argument("--udp-stream", type=float, metavar="SECONDS",
                        help="instead: keep one UDP socket sending for this long (see udp_stream)")
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--hold", action="store_true",
                        help="instead: keep one TCP connection and exchange a line per stdin line")
    args = parser.parse_args()
    host, port = split_target(args.target)
    if args.hold:
        hold((host, port), args.timeout)
        return
    if args.udp_stream:
        udp_stream((host, port), seconds=min(args.udp_stream, 60), interval=args.interval)
        return
    answers = []
    errors: Counter[str] = Counter()
    durations = []
    failures: list[tuple[float, str]] = []  # when each failure happened (seconds from start), to line up with logs
    start = time.monotonic()
    end = start + args.deadline
    sources = args.source or [None]
    # SIGTERM ends the run early but still reports it: a test runs the client in the background
    # for as long as something else takes (a rolling update), then stops it.
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    for i in range(max(0, args.count)):
        if stopped:
            break
        if time.monotonic() > end:
            errors["deadline"] += args.count - i
            break
        t0 = time.monotonic()
        result = probe_once((host, port), proto=args.proto, source=sources[i % len(sources)],
                            timeout=args.timeout, http=args.http, reset_close=args.reset_close)
        durations.append(time.monotonic() - t0)
        if isinstance(result, tuple):
            answers.append([*result, sources[i % len(sources)]])
        else:
            errors[result] += 1
            if len(failures) < 100:
                failures.append((round(t0 - start, 3), result))
    print(json.dumps({"answers": answers, "errors": dict(errors), "durations": durations, "failures": failures,
                      "started": time.time() - (time.monotonic() - start)}))


if __name__ == "__main__":
    main()
