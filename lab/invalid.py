"""Send TCP segments conntrack holds INVALID, and see which reach the other side.

Lab use only, inside a lab topology's namespaces. A segment with SYN and FIN set is refused by
conntrack's flag check (``tcp_error``: no valid TCP state has both), so the node that forwards it
sees ``ctstate INVALID``; a plain SYN from another source port is the control. Both go through
a raw socket (the kernel writes the IP header; the TCP checksum is ours and right, so the
control is valid).

    python -m lab.invalid listen --source IP --port P --seconds S   # prints ["syn", "synfin"]
    python -m lab.invalid send --source IP --to IP --port P
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from lab.martian import _checksum

SYN, FIN = 0x02, 0x01
KINDS = {41001: ("synfin", SYN | FIN), 41002: ("syn", SYN)}
"""Source port → (name, TCP flags): the listener names what arrived by its source port."""


def segment(*, src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """A TCP header (no options, no payload) with its checksum."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000 + sport, 0, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    return tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]


def send(*, source: str, to: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.bind((source, 0))
        for sport, (_, flags) in KINDS.items():
            s.sendto(segment(src=source, dst=to, sport=sport, dport=port, flags=flags), (to, 0))


def listen(*, source: str, port: int, seconds: float) -> list[str]:
    """Names of the segments from ``source`` to ``port`` seen within ``seconds``; prints
    "ready" on stderr once the socket is open."""
    seen: set[str] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
        s.settimeout(0.2)
        print("ready", file=sys.stderr, flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data, (addr, _) = s.recvfrom(65535)
            except socket.timeout:
                continue
            if addr != source:
                continue
            ihl = (data[0] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", data, ihl)
            if dport == port and sport in KINDS:
                seen.add(KINDS[sport][0])
    return sorted(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("listen", "send"))
    p.add_argument("--source", required=True)
    p.add_argument("--to")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    if a.action == "send":
        send(source=a.source, to=a.to, port=a.port)
    else:
        print(json.dumps(listen(source=a.source, port=a.port, seconds=a.seconds)))


if __name__ == "__main__":
    main()
