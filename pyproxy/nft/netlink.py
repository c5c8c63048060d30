"""Element changes straight to the kernel: one nfnetlink batch, no ``nft`` command.

``nft -f`` (1.0.x) lists the table's chains, sets and interval elements before every script
that deletes or adds elements: at 10k services that listing, not the kernel's work, is most of
a small sync (0.4-0.6 s with 110k chains; the commit itself takes ~8 ms). A sync whose
transaction only adds and deletes set or map elements (an endpoint came or went: endpoints
are map data, see ``pyproxy.render.nftables``) is sent here instead, as the same messages nft
would send, in one batch: the kernel applies all of it or none, as with ``nft -f``.

Encoding (``include/uapi/linux/netfilter/nf_tables.h``): each element is a nested
``NFTA_LIST_ELEM`` with its key (and data) as ``NFTA_DATA_VALUE`` bytes. A concatenation pads
every field to a 32-bit register. Addresses and ports are in network byte order, a protocol is
one byte; an interval map's integer keys are big-endian, and a range ``lo-hi`` is two elements:
``lo`` with the data, and ``hi + 1`` flagged as the interval's end. Verdicts are nested
``NFTA_DATA_VERDICT`` (code, chain).

Only the set types pyproxy declares are understood (:func:`codec`); anything else raises
:class:`Unsupported` and the caller uses ``nft -f``. Errors come back per message (every
message asks for an acknowledgement) with the kernel's errno.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from operator import itemgetter

from pyproxy.nfnetlink import (
    NLA_F_NESTED,
    NLH,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    message,
    nest,
    nla,
    socket_in,
    string,
)
from pyproxy.nft.transaction import Op, Transaction

SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS = 1, 2, 3
NFT_SET_ELEM_INTERVAL_END = 1
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
VERDICTS = {"drop": 0, "accept": 1, "jump": -3, "goto": -4, "return": -5}
FAMILIES = {"ip": 2, "ip6": 10}  # NFPROTO_IPV4, NFPROTO_IPV6
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
MAX_ELEMENTS_BYTES = 60_000
"""One message's elements are one attribute, whose length is 16 bits: stay well below."""


class Unsupported(ValueError):
    """The transaction holds something this path does not encode: use ``nft -f``."""


class NetlinkError(OSError):
    """The kernel refused the batch (nothing of it was applied), or its answer was lost."""


# -- values ------------------------------------------------------------------------------

def _address(family: int) -> Callable[[str], bytes]:
    return lambda text: socket.inet_pton(family, text)


def _protocol(text: str) -> bytes:
    number = PROTOCOLS.get(text)
    if number is None:
        number = int(text)
    return bytes([number])


def _port(text: str) -> bytes:
    return struct.pack("!H", int(text))


FIELD_TYPES: dict[str, Callable[[str], bytes]] = {
    "ipv4_addr": _address(socket.AF_INET),
    "ipv6_addr": _address(socket.AF_INET6),
    "inet_proto": _protocol,
    "inet_service": _port,
}
TYPEOF_FIELDS = {"ip daddr": "ipv4_addr", "ip6 daddr": "ipv6_addr", "th dport": "inet_service",
                 "tcp dport": "inet_service", "udp dport": "inet_service", "sctp dport": "inet_service"}


_ADDR_PORT4 = ("ipv4_addr", "inet_service")
NUMBER = "number"
"""Codec.key of a hash map keyed by a numgen value: a 32-bit number in host byte order (as the
numgen expression writes its register; an interval map's keys are big-endian because nft
converts the register before an interval lookup, a hash lookup gets it as it is)."""


@dataclass(frozen=True)
class Codec:
    """How one set's elements become bytes."""

    key: tuple[str, ...]
    """Field types of the key; ``("interval",)`` for an interval map keyed by a 32-bit number."""
    data: tuple[str, ...] | None
    """Field types of a map's data, ``("verdict",)`` for a verdict map, None for a set."""

    @property
    def interval(self) -> bool:
        return self.key == ("interval",)

    def value(self, fields: tuple[str, ...], text: str) -> bytes:
        """``text`` as the fields' bytes, or Unsupported saying why (the general path: the set
        types declared in bulk go through :func:`encoder`'s closures)."""
        parts = [p.strip() for p in text.split(" . ")]
        if len(parts) != len(fields):
            raise Unsupported(f"{text!r} does not have the fields {' . '.join(fields)}")
        try:
            raw = [FIELD_TYPES[f](p) for f, p in zip(fields, parts)]
        except (KeyError, ValueError, OSError, struct.error) as err:
            raise Unsupported(f"cannot encode {text!r} as {' . '.join(fields)}: {err}") from None
        if len(raw) == 1:
            return raw[0]
        return b"".join(r + b"\0" * (-len(r) % 4) for r in raw)  # a register per field


def codec(spec: str) -> Codec:
    """The codec of a set declared with ``spec`` (what the renderer writes), or Unsupported."""
    head = spec.split(";")[0].strip()
    flags = spec.split("flags", 1)[1].split(";")[0] if "flags" in spec else ""
    key_text, _, data_text = (p.strip() for p in head.partition(" : "))
    if key_text.startswith("typeof numgen ") and "interval" in flags:
        fields = tuple(TYPEOF_FIELDS.get(f.strip(), "?") for f in data_text.split(" . "))
        if "?" in fields:
            raise Unsupported(f"set type {spec!r}")
        return Codec(("interval",), fields)
    if key_text.startswith("typeof numgen ") and data_text:
        fields = tuple(TYPEOF_FIELDS.get(f.strip(), "?") for f in data_text.split(" . "))
        if "?" in fields:
            raise Unsupported(f"set type {spec!r}")
        return Codec((NUMBER,), fields)
    if not key_text.startswith("type ") or "interval" in flags:
        raise Unsupported(f"set type {spec!r}")
    key = tuple(f.strip() for f in key_text[len("type "):].split(" . "))
    data: tuple[str, ...] | None = None
    if data_text:
        data = ("verdict",) if data_text == "verdict" else tuple(f.strip() for f in data_text.split(" . "))
    if any(f not in FIELD_TYPES for f in key) or (data and data != ("verdict",)
                                                  and any(f not in FIELD_TYPES for f in data)):
        raise Unsupported(f"set type {spec!r}")
    return Codec(key, data)


def _verdict(text: str) -> bytes:
    word, _, chain = text.strip().partition(" ")
    code = VERDICTS.get(word)
    if code is None or bool(chain) != (word in ("jump", "goto")):
        raise Unsupported(f"verdict {text!r}")
    inner = nla(NFTA_VERDICT_CODE, struct.pack("!i", code))
    if chain:
        inner += string(NFTA_VERDICT_CHAIN, chain.strip())
    return nest(NFTA_DATA_VERDICT, inner)


_ELEMENT_LAYOUTS: dict[tuple[int, int, bool], struct.Struct] = {}


def _layout(klen: int, dlen: int, flagged: bool) -> struct.Struct:
    """One element's bytes as a single struct: LIST_ELEM { [FLAGS], KEY { VALUE }, [DATA] }
    (``dlen`` counts the data attribute's own nested bytes, 0 for none; lengths are multiples of
    4, so nothing pads). One pack a element: a full sync at 10k services sends 200k of them."""
    layout = _ELEMENT_LAYOUTS.get((klen, dlen, flagged))
    if layout is None:
        fmt = "=HH" + ("HHI" if flagged else "") + f"HHHH{klen}s" + (f"HH{dlen}s" if dlen else "")
        layout = _ELEMENT_LAYOUTS[(klen, dlen, flagged)] = struct.Struct(fmt)
    return layout


def _element(key: bytes, *, data: bytes | None = None, flags: int = 0) -> bytes:
    klen, dlen = len(key), len(data) if data is not None else 0
    if klen % 4 or dlen % 4:  # not a layout of ours (keys and data are whole registers)
        parts = [nla(NFTA_SET_ELEM_FLAGS, struct.pack("!I", flags))] if flags else []
        parts.append(nest(NFTA_SET_ELEM_KEY, nla(NFTA_DATA_VALUE, key)))
        if data is not None:
            parts.append(nest(NFTA_SET_ELEM_DATA, data))
        return nest(NFTA_LIST_ELEM, *parts)
    layout = _layout(klen, dlen, bool(flags))
    head: tuple[int | bytes, ...] = (layout.size, NFTA_LIST_ELEM | NLA_F_NESTED)
    if flags:
        # The flags are big-endian on the wire; the header fields are host order.
        head += (8, NFTA_SET_ELEM_FLAGS, int.from_bytes(struct.pack("!I", flags), sys.byteorder))
    body: tuple[int | bytes, ...] = (8 + klen, NFTA_SET_ELEM_KEY | NLA_F_NESTED, 4 + klen, NFTA_DATA_VALUE, key)
    if data is not None:
        body += (4 + dlen, NFTA_SET_ELEM_DATA | NLA_F_NESTED, data)
    return layout.pack(*head, *body)


_PORTS = [struct.pack("!H", p) + b"\0\0" for p in range(65536)]
"""A port as a register (big-endian, padded): concatenations end in a port."""


def elements(op: Op, c: Codec) -> list[bytes]:
    """The kernel's elements for one element operation (two for an interval)."""
    add = op.verb == "add"
    data: bytes | None = None
    if add and c.data is not None:
        data = _verdict(op.value) if c.data == ("verdict",) else nla(NFTA_DATA_VALUE, c.value(c.data, op.value))
    if c.interval:
        lo_text, sep, hi_text = op.body.partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text if sep else lo_text)
        except ValueError:
            raise Unsupported(f"interval {op.body!r}") from None
        if not 0 <= lo <= hi <= 0xFFFF_FFFF:
            raise Unsupported(f"interval {op.body!r}")
        out = [_element(lo.to_bytes(4, "big"), data=data)]
        if hi < 0xFFFF_FFFF:
            out.append(_element((hi + 1).to_bytes(4, "big"), flags=NFT_SET_ELEM_INTERVAL_END))
        return out
    if c.key == (NUMBER,):
        try:
            number = int(op.body)
        except ValueError:
            raise Unsupported(f"not a number: {op.body!r}") from None
        if not 0 <= number <= 0xFFFF_FFFF:
            raise Unsupported(f"not a 32-bit number: {op.body!r}")
        return [_element(number.to_bytes(4, sys.byteorder), data=data)]
    return [_element(c.value(c.key, op.body), data=data)]


# -- fast encoders ------------------------------------------------------------------------
# A cold start at 10k services encodes 230k element operations; through the general path
# (elements(), Codec.value(), _element()) that took ~2 s, longer than nft -f of the chains it
# overlaps with. The set types the renderer declares by the hundred thousand get one closure
# each, made once a set: the key (and data) parsed in place and the element packed with one
# struct. Anything a closure does not take (an odd value) goes the general way, which encodes
# it or says exactly why not, so both paths give the same bytes or the same error.

Encoder = Callable[[Op], bytes]

_PTON = socket.inet_pton
_INET = socket.AF_INET
_LIST_KEY = NFTA_LIST_ELEM | NLA_F_NESTED
_KEY = NFTA_SET_ELEM_KEY | NLA_F_NESTED
_DATA = NFTA_SET_ELEM_DATA | NLA_F_NESTED
_VALUE_HEAD = struct.pack("=HH", 12, NFTA_DATA_VALUE)
"""The data attribute's header for an 8-byte value (ip . port)."""
_END_FLAGS = int.from_bytes(struct.pack("!I", NFT_SET_ELEM_INTERVAL_END), sys.byteorder)


def _ipv4(text: str) -> bytes:
    """A dotted quad, strictly (inet_pton: inet_aton would take "10.1" or octal parts)."""
    return _PTON(_INET, text)


def _endpoint4(text: str) -> bytes:
    """``ip . port`` as two registers."""
    ip, sep, port = text.partition(" . ")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(text)
    return _ipv4(ip) + _PORTS[int(port)]


def _pair4(text: str) -> bytes:
    """``ip . ip`` as two registers."""
    a, sep, b = text.partition(" . ")
    if not sep:
        raise ValueError(text)
    return _ipv4(a) + _ipv4(b)


_PROTOCOL_REGISTERS = {name: bytes([number]) + b"\0\0\0" for name, number in PROTOCOLS.items()}


def _service4(text: str) -> bytes:
    """``ip . protocol . port`` (the dispatch maps' key) as three registers; only the protocol's
    name (the renderer's form: a number goes the general way)."""
    ip, sep, rest = text.partition(" . ")
    proto, sep2, port = rest.partition(" . ")
    if not (sep and sep2 and port.isascii() and port.isdigit()):
        raise ValueError(text)
    return _ipv4(ip) + _PROTOCOL_REGISTERS[proto] + _PORTS[int(port)]


_FAST_VALUES: dict[tuple[str, ...], Callable[[str], bytes]] = {
    ("ipv4_addr",): _ipv4,
    _ADDR_PORT4: _endpoint4,
    ("ipv4_addr", "ipv4_addr"): _pair4,
    ("ipv4_addr", "inet_proto", "inet_service"): _service4,
}

_CHAIN_VERDICTS = {word: nla(NFTA_VERDICT_CODE, struct.pack("!i", VERDICTS[word])) for word in ("goto", "jump")}
_NLA = struct.Struct("=HH")


def _chain_verdict(text: str) -> bytes:
    """``goto CHAIN`` or ``jump CHAIN`` as map data (what :func:`_verdict` gives), for the
    renderer's form only: one space, no other whitespace around the chain's name."""
    word, _, chain = text.partition(" ")
    code = _CHAIN_VERDICTS[word]
    if not chain or " " in chain or chain != chain.strip():
        raise ValueError(text)
    name = chain.encode() + b"\0"
    size = 4 + len(name)
    inner = code + _NLA.pack(size, NFTA_VERDICT_CHAIN) + name + b"\0" * (-size % 4)
    return _NLA.pack(4 + len(inner), NFTA_DATA_VERDICT | NLA_F_NESTED) + inner


def encoder(c: Codec, verb: str) -> Encoder:
    """The fastest way to encode ``verb`` operations on a set of codec ``c``: a closure for the
    types the renderer declares in bulk, :func:`elements` for the rest."""

    def general(op: Op) -> bytes:
        return b"".join(elements(op, c))

    add = verb == "add"
    key_fn = _FAST_VALUES.get(c.key)
    # Map data the closures pack as one 12-byte attribute: an endpoint, ip . port.
    data_fn = _endpoint4 if add and c.data == _ADDR_PORT4 else None
    if c.interval and add and data_fn is not None:
        start = _layout(4, 12, False)
        end = _layout(4, 0, True)

        def interval(op: Op) -> bytes:
            try:
                lo_text, sep, hi_text = op.body.partition("-")
                lo, hi = int(lo_text), int(hi_text if sep else lo_text)
                if not 0 <= lo <= hi < 0xFFFF_FFFF:
                    return general(op)
                data = data_fn(op.value)
            except (ValueError, OSError, IndexError):
                return general(op)
            return (start.pack(start.size, _LIST_KEY, 12, _KEY, 8, NFTA_DATA_VALUE, lo.to_bytes(4, "big"),
                               16, _DATA, _VALUE_HEAD + data)
                    + end.pack(end.size, _LIST_KEY, 8, NFTA_SET_ELEM_FLAGS, _END_FLAGS,
                               12, _KEY, 8, NFTA_DATA_VALUE, (hi + 1).to_bytes(4, "big")))
        return interval
    if c.key == (NUMBER,) and add and data_fn is not None:
        one = _layout(4, 12, False)
        order = sys.byteorder

        def numbered(op: Op) -> bytes:
            try:
                number = int(op.body)
                if not 0 <= number <= 0xFFFF_FFFF:
                    return general(op)
                data = data_fn(op.value)
            except (ValueError, OSError, IndexError):
                return general(op)
            return one.pack(one.size, _LIST_KEY, 12, _KEY, 8, NFTA_DATA_VALUE, number.to_bytes(4, order),
                            16, _DATA, _VALUE_HEAD + data)
        return numbered
    if key_fn is not None and add and c.data == ("verdict",):
        def verdict(op: Op) -> bytes:
            try:
                key = key_fn(op.body)
                data = _chain_verdict(op.value)
            except (ValueError, OSError, IndexError, KeyError):
                return general(op)
            return _element(key, data=data)
        return verdict
    if key_fn is not None and (c.data is None or not add):
        layouts: dict[int, struct.Struct] = {}

        def plain(op: Op) -> bytes:
            try:
                key = key_fn(op.body)
            except (ValueError, OSError, IndexError, KeyError):
                return general(op)
            klen = len(key)
            layout = layouts.get(klen)
            if layout is None:
                layout = layouts[klen] = _layout(klen, 0, False)
            return layout.pack(layout.size, _LIST_KEY, 4 + 4 + klen, _KEY, 4 + klen, NFTA_DATA_VALUE, key)
        return plain
    return general


@dataclass(frozen=True)
class Message:
    """One NEWSETELEM or DELSETELEM message: elements of one set, one verb."""

    verb: str
    set_name: str
    payload: bytes
    """The elements, each a nested attribute, back to back (one bytes object a message: a cold
    start at 10k services sends 220k elements, and as many small objects cost ~20 MB)."""

    @property
    def elements(self) -> tuple[bytes, ...]:
        """The elements one by one (for inspection)."""
        out, offset = [], 0
        while offset < len(self.payload):
            (size,) = struct.unpack_from("=H", self.payload, offset)
            out.append(self.payload[offset:offset + size])
            offset += size + (-size % 4)
        return tuple(out)


_RUN = itemgetter(0, 1, 2)
"""An operation's verb, kind and set name: consecutive ones alike share messages."""


def messages(tx: Transaction) -> list[Message]:
    """``tx`` as element messages, in its order (consecutive operations of one verb on one set
    share a message); Unsupported if it holds anything but element changes of known sets.

    A run of operations is encoded with one ``map`` and, when its elements are all of one size
    (the closures' fixed layouts), cut into messages by count: a cold start's 230k elements
    made the per-element bookkeeping a third of the encoding."""
    out: list[Message] = []
    encoders: dict[tuple[str, str], Encoder] = {}
    for (verb, kind, name), run in groupby(tx.ops, key=_RUN):
        if kind != "element" or verb not in ("add", "delete"):
            raise Unsupported(f"{verb} {kind}")
        enc = encoders.get((name, verb))
        if enc is None:
            spec = tx.set_specs.get(name)
            if spec is None:
                raise Unsupported(f"set {name} has no known declaration")
            enc = encoders[(name, verb)] = encoder(codec(spec), verb)
        encoded = list(map(enc, run))
        sizes = set(map(len, encoded))
        if len(sizes) == 1:
            per = max(1, MAX_ELEMENTS_BYTES // sizes.pop())
            out.extend(Message(verb, name, b"".join(encoded[i:i + per])) for i in range(0, len(encoded), per))
            continue
        current: list[bytes] = []
        size = 0
        for new in encoded:
            if current and size + len(new) > MAX_ELEMENTS_BYTES:
                out.append(Message(verb, name, b"".join(current)))
                current, size = [], 0
            current.append(new)
            size += len(new)
        out.append(Message(verb, name, b"".join(current)))
    return out


class NetlinkSocket:
    """A netfilter netlink socket, kept open: in this process's network namespace, or in the
    named one."""

    def __init__(self, *, netns: str | None = None, timeout: float = 10.0, buffer: int = 8 << 20) -> None:
        self.sock = socket_in(netns)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # acks without the request echoed
        # The batch must fit one send, and every acknowledgement arrives at once: a bigger
        # buffer than the default (the FORCE options pass net.core.*mem_max with NET_ADMIN).
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            self._buffer(force, plain, buffer)
        self.send_buffer = buffer
        self.sock.bind((0, 0))
        self.sock.settimeout(timeout)
        self.seq = int.from_bytes(os.urandom(3), "little")

    def _buffer(self, force: int, plain: int, size: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, plain, size)

    def close(self) -> None:
        self.sock.close()

    def _header(self, kind: int, flags: int, family: int, body: bytes, res_id: int = 0) -> tuple[int, bytes]:
        self.seq = (self.seq + 1) & 0xFFFF_FFFF
        return self.seq, message(kind, flags, self.seq, body, family=family, res_id=res_id)

    def apply(self, *, family: str, table: str, batch: list[Message]) -> None:
        """Send ``batch`` as one transaction; NetlinkError (nothing applied) if the kernel
        refuses any message, or if its answer cannot be read (then the state is unknown: the
        caller must rebuild the table)."""
        if not batch:
            return
        nfproto = FAMILIES[family]
        begin_seq, begin = self._header(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, b"", NFNL_SUBSYS_NFTABLES)
        parts = [begin]
        waiting: dict[int, Message] = {}
        for msg in batch:
            kind = NFT_MSG_NEWSETELEM if msg.verb == "add" else NFT_MSG_DELSETELEM
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if msg.verb == "add" else 0)
            body = (string(NFTA_SET_ELEM_LIST_TABLE, table) + string(NFTA_SET_ELEM_LIST_SET, msg.set_name)
                    + nest(NFTA_SET_ELEM_LIST_ELEMENTS, msg.payload))
            seq, data = self._header((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, nfproto, body)
            waiting[seq] = msg
            parts.append(data)
        parts.append(self._header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, b"", NFNL_SUBSYS_NFTABLES)[1])
        data = b"".join(parts)
        if len(data) + (1 << 16) > self.send_buffer:
            # A batch is one message: the kernel refuses one bigger than the send buffer
            # (EMSGSIZE). A cold start at 5,006 Services x 50 sends ~25 MB.
            self.send_buffer = len(data) + (1 << 20)
            self._buffer(SO_SNDBUFFORCE, socket.SO_SNDBUF, self.send_buffer)
        try:
            self.sock.send(data)
            refused = list(self._acks(waiting, begin_seq))
        except OSError as err:  # EMSGSIZE (nothing sent), ENOBUFS or a timeout (answer lost)
            raise NetlinkError(err.errno or errno.EIO, f"netlink batch: {err}") from err
        if refused:
            code, culprit = refused[0]
            where = f"{culprit.verb} element in {culprit.set_name}" if culprit else "the batch"
            raise NetlinkError(code, f"{os.strerror(code)}: {where} (nothing applied)")

    def _acks(self, waiting: dict[int, Message], begin_seq: int) -> Iterator[tuple[int, Message | None]]:
        """Read one acknowledgement per message; yield (errno, message) for each refusal."""
        while waiting:
            data = self.sock.recv(1 << 20)
            offset = 0
            while offset + NLH.size <= len(data):
                size, kind, _, seq, _ = NLH.unpack_from(data, offset)
                if size < NLH.size:
                    break
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + NLH.size)
                    if seq == begin_seq:  # the batch as a whole was refused
                        waiting.clear()
                        yield -code, None
                    else:
                        sent = waiting.pop(seq, None)
                        if code and sent is not None:
                            yield -code, sent
                offset += size + (-size % 4)
