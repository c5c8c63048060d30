"""SCTP packets without an SCTP stack: raw sockets that send INIT chunks and receive them.

The lab's kernel has no SCTP sockets (no IP_SCTP), but netfilter tracks, DNATs and
masquerades SCTP all the same, and a raw socket of protocol 132 can send and see the packets.
That is enough to prove the rules with real traffic: the sender sends INITs from many source
ports (each one a new conntrack entry, so a new backend choice); each backend's receiver
reports the destination port it saw (DNAT rewrote it), the source address (masqueraded or
not) and whether the CRC32c checksum is right (NAT must recompute it).

    python -m lab.sctp send --target IP:PORT --count N
    python -m lab.sctp listen --name pod0 --port 8080 --seconds S
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import time

IPPROTO_SCTP = 132


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def init_packet(*, sport: int, dport: int) -> bytes:
    """SCTP common header (verification tag 0, as an INIT must have) and one INIT chunk."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, random.getrandbits(32) or 1, 65535, 1, 1,
                        random.getrandbits(32))
    packet = struct.pack("!HHII", sport, dport, 0, 0) + chunk
    # The checksum goes in little-endian byte order (RFC 4960 appendix B, as Linux writes it).
    return packet[:8] + struct.pack("<I", crc32c(packet)) + packet[12:]


def checksum_ok(packet: bytes) -> bool:
    (stored,) = struct.unpack("<I", packet[8:12])
    return bool(crc32c(packet[:8] + b"\0\0\0\0" + packet[12:]) == stored)


def send(target: tuple[str, int], count: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP) as s:
        for sport in random.sample(range(20000, 60000), count):
            s.sendto(init_packet(sport=sport, dport=target[1]), (target[0], 0))
            time.sleep(0.005)
    print(json.dumps({"sent": count}))


def listen(name: str, port: int, seconds: float) -> None:
    """Print one JSON line per SCTP packet to ``port`` until ``seconds`` pass or stdin closes."""
    end = time.monotonic() + min(seconds, 120)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_SCTP) as s:
        s.settimeout(0.2)
        print("ready", flush=True)
        while time.monotonic() < end:
            try:
                data, _ = s.recvfrom(2048)
            except socket.timeout:
                continue
            ihl = (data[0] & 0x0F) * 4
            src = socket.inet_ntoa(data[12:16])
            sctp = data[ihl:]
            sport, dport = struct.unpack("!HH", sctp[:4])
            if dport != port:
                continue
            print(json.dumps({"pod": name, "src": src, "sport": sport, "dport": dport,
                              "checksum_ok": checksum_ok(sctp)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("--target", required=True, help="IP:PORT")
    s.add_argument("--count", type=int, default=30)
    lst = sub.add_parser("listen")
    lst.add_argument("--name", required=True)
    lst.add_argument("--port", type=int, required=True)
    lst.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    if args.cmd == "send":
        host, _, port = args.target.rpartition(":")
        send((host, int(port)), min(args.count, 1000))
    else:
        listen(args.name, args.port, args.seconds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
