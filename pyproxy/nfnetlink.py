"""nfnetlink framing, shared by the executors that talk to netfilter over netlink without a
command: ``pyproxy.nft.netlink`` (set elements) and ``pyproxy.ipt.nfacct`` (accounting objects).

A message is a ``nlmsghdr`` (host byte order), a ``nfgenmsg`` (family, version, resource id,
big-endian), then attributes: each a 16-bit length (header included, padding not) and type in
host byte order, its payload, padded to 4 bytes (``include/uapi/linux/netlink.h``). The
message type is the subsystem in the high byte, the subsystem's command in the low one
(``include/uapi/linux/netfilter/nfnetlink.h``). Only the standard library.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

from pyproxy.netns import call_in

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = 0xFFFF & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

NLH = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
NFGEN = struct.Struct("!BBH")  # nfgenmsg: family, version, resource id
NLA = struct.Struct("=HH")  # nlattr: length, type


def nla(kind: int, payload: bytes) -> bytes:
    size = NLA.size + len(payload)
    return NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def nest(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def string(kind: int, text: str) -> bytes:
    """A NUL-terminated string attribute."""
    return nla(kind, text.encode() + b"\0")


def message(kind: int, flags: int, seq: int, body: bytes, *, family: int = 0, res_id: int = 0) -> bytes:
    """One whole message: header, nfgenmsg (version 0), then ``body`` (attributes)."""
    payload = NFGEN.pack(family, 0, res_id) + body
    return NLH.pack(NLH.size + len(payload), kind, flags, seq, 0) + payload


def split(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The messages of one ``recv``: (type, sequence, payload after the header)."""
    offset = 0
    while offset + NLH.size <= len(data):
        size, kind, _, seq, _ = NLH.unpack_from(data, offset)
        if size < NLH.size or offset + size > len(data):
            return  # truncated: nothing more can be read from it
        yield kind, seq, data[offset + NLH.size:offset + size]
        offset += size + (-size % 4)


def error_code(payload: bytes) -> int:
    """The errno of an ``NLMSG_ERROR`` payload (0: an acknowledgement)."""
    code: int = struct.unpack_from("=i", payload)[0]
    return -code


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Top-level attributes from ``offset`` on: type (flags masked off) → payload. A
    truncated attribute ends the walk; a repeated type keeps its last payload."""
    out: dict[int, bytes] = {}
    while offset + NLA.size <= len(data):
        size, kind = NLA.unpack_from(data, offset)
        if size < NLA.size or offset + size > len(data):
            break
        out[kind & NLA_TYPE_MASK] = data[offset + NLA.size:offset + size]
        offset += size + (-size % 4)
    return out


def socket_in(netns: str | None) -> socket.socket:
    """A netfilter netlink socket of the named network namespace (``ip netns`` name), or of
    ours (a socket belongs to the namespace it was made in for good)."""
    return call_in(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
