"""nfacct: named packet and byte counters kept by the kernel (``nfnetlink_acct``), which an
iptables rule adds to with ``-m nfacct --nfacct-name NAME``. pyproxy creates one and reads it
for a metric, as kube-proxy does; an object lives in one network namespace.

The protocol (``include/uapi/linux/netfilter/nfnetlink_acct.h``): subsystem
``NFNL_SUBSYS_ACCT`` (7); ``NFNL_MSG_ACCT_NEW`` (0) creates an object, ``NFNL_MSG_ACCT_GET``
(1) reads one, each naming it in ``NFACCT_NAME`` (1, NUL-terminated, 31 characters at most).
The kernel answers a GET with a NEW-type message holding ``NFACCT_PKTS`` (2) and
``NFACCT_BYTES`` (3), 64-bit big-endian, and ``NFACCT_USE`` (4: the object's reference
count, 1 plus one per rule that uses it). ``NFNL_MSG_ACCT_DEL`` (3) deletes one: refused with
EBUSY while a rule uses it, ENOENT when there is none.
A NEW for a name that exists is refused with EBUSY and changes nothing (with
``NLM_F_REPLACE`` it would zero the counters: never sent here); a GET for a missing name with
ENOENT.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

from pyproxy.nfnetlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    attributes,
    error_code,
    message,
    socket_in,
    split,
    string,
)

NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW, NFNL_MSG_ACCT_GET, NFNL_MSG_ACCT_DEL = 0, 1, 3
NFACCT_NAME, NFACCT_PKTS, NFACCT_BYTES, NFACCT_USE = 1, 2, 3, 4
NFACCT_NAME_MAX = 32
"""The kernel's buffer for a name, its NUL included."""
AF_UNSPEC = 0

_U64 = struct.Struct("!Q")
_U32 = struct.Struct("!I")


class NfacctError(OSError):
    """The kernel refused a request, has no nfacct (``nfnetlink_acct``), or did not answer."""


@dataclass(frozen=True)
class Counter:
    name: str
    packets: int
    bytes: int
    use: int = 0
    """The kernel's reference count: 1, plus one per rule using the object (0: not said)."""


def check_name(name: str) -> bytes:
    """``name`` as the kernel takes it; ValueError for one it would refuse or cut."""
    raw = name.encode()
    if not raw or len(raw) >= NFACCT_NAME_MAX or b"\0" in raw:
        raise ValueError(f"nfacct name {name!r}: 1 to {NFACCT_NAME_MAX - 1} bytes, no NUL")
    return raw


def request(command: int, name: str, *, seq: int) -> bytes:
    """The message for ``command`` (NEW, GET or DEL) on the object ``name``, asking for an
    acknowledgement; NEW also carries NLM_F_CREATE (never NLM_F_REPLACE or NLM_F_EXCL)."""
    check_name(name)
    flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if command == NFNL_MSG_ACCT_NEW else 0)
    return message((NFNL_SUBSYS_ACCT << 8) | command, flags, seq, string(NFACCT_NAME, name),
                   family=AF_UNSPEC)


def decode(payload: bytes) -> Counter:
    """A counter from the payload of the kernel's answer (nfgenmsg, then attributes);
    ValueError when the name or either count is missing or malformed."""
    attrs = attributes(payload, 4)
    name, pkts, nbytes = attrs.get(NFACCT_NAME), attrs.get(NFACCT_PKTS), attrs.get(NFACCT_BYTES)
    if name is None or pkts is None or nbytes is None or len(pkts) != 8 or len(nbytes) != 8:
        raise ValueError(f"not an nfacct object: attributes {sorted(attrs)}")
    use = attrs.get(NFACCT_USE)
    return Counter(
        name=name.split(b"\0", 1)[0].decode(errors="replace"),
        packets=_U64.unpack(pkts)[0],
        bytes=_U64.unpack(nbytes)[0],
        use=_U32.unpack(use)[0] if use is not None and len(use) == 4 else 0,
    )


class NfacctClient(Protocol):
    def ensure(self, name: str) -> None:
        """Create the object ``name`` unless it exists (its counts are kept); NfacctError
        when it cannot be had."""

    def get(self, name: str) -> Counter | None:
        """The object ``name``; None when there is none; NfacctError on any other failure."""

    def delete(self, name: str) -> bool:
        """Delete the object ``name``: True if it was deleted, False if there is none;
        NfacctError with EBUSY while a rule (ours or another program's) still uses it."""


class Nfacct:
    """nfacct over a netfilter netlink socket of one network namespace (ours, or the named
    one: the object must live where the rules that count in it live). The socket is opened
    on first use and kept; a lock makes each request and its answers one exchange, since a
    sync thread creates the object while the metrics server reads it."""

    def __init__(self, *, netns: str | None = None, timeout: float = 2.0) -> None:
        self.netns = netns
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = int.from_bytes(os.urandom(3), "little")

    def ensure(self, name: str) -> None:
        try:
            self._exchange(NFNL_MSG_ACCT_NEW, name)
        except NfacctError as err:
            if err.errno != errno.EBUSY:  # EBUSY: it exists, counts untouched
                raise

    def delete(self, name: str) -> bool:
        try:
            self._exchange(NFNL_MSG_ACCT_DEL, name)
        except NfacctError as err:
            if err.errno == errno.ENOENT:
                return False
            raise
        return True

    def get(self, name: str) -> Counter | None:
        try:
            answers = self._exchange(NFNL_MSG_ACCT_GET, name)
        except NfacctError as err:
            if err.errno == errno.ENOENT:
                return None
            raise
        for payload in answers:
            try:
                counter = decode(payload)
            except ValueError as err:
                raise NfacctError(errno.EPROTO, f"nfacct {name}: {err}") from None
            if counter.name == name:
                return counter
        raise NfacctError(errno.EPROTO, f"nfacct {name}: the kernel acknowledged but sent no object")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def _exchange(self, command: int, name: str) -> list[bytes]:
        """Send one request; the payloads of the answers before its acknowledgement."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFF_FFFF
            seq = self._seq
            data = request(command, name, seq=seq)
            try:
                if self._sock is None:
                    self._sock = socket_in(self.netns)
                    self._sock.bind((0, 0))
                    self._sock.settimeout(self.timeout)
                sock = self._sock
                sock.send(data)
                answers: list[bytes] = []
                while True:
                    for kind, got_seq, payload in split(sock.recv(1 << 16)):
                        if got_seq != seq:
                            continue  # a late answer to an earlier request that timed out
                        if kind == NLMSG_ERROR:
                            code = error_code(payload)
                            if code:
                                raise NfacctError(code, f"nfacct {name}: {os.strerror(code)}")
                            return answers
                        if kind == NLMSG_DONE:
                            return answers
                        answers.append(payload)
            except NfacctError:
                raise
            except OSError as err:  # no such namespace, a timeout, a closed socket...
                self._drop()  # the next request starts on a new socket
                code = err.errno or errno.EIO
                raise NfacctError(code, f"nfacct {name}: {err}") from err


@dataclass
class FakeNfacct:
    """In-memory nfacct for tests: objects by name and their packet counts."""

    packets: dict[str, int] = field(default_factory=dict)
    fail: int | None = None
    """errno every request fails with (e.g. EPROTONOSUPPORT: a kernel without nfacct)."""
    requests: list[tuple[str, str]] = field(default_factory=list)
    in_use: set[str] = field(default_factory=set)
    """Objects a rule of another program uses: a delete is refused with EBUSY."""

    def ensure(self, name: str) -> None:
        self.requests.append(("ensure", name))
        check_name(name)
        if self.fail is not None:
            raise NfacctError(self.fail, f"nfacct {name}: {os.strerror(self.fail)}")
        self.packets.setdefault(name, 0)

    def delete(self, name: str) -> bool:
        self.requests.append(("delete", name))
        if self.fail is not None:
            raise NfacctError(self.fail, f"nfacct {name}: {os.strerror(self.fail)}")
        if name in self.in_use:
            raise NfacctError(errno.EBUSY, f"nfacct {name}: {os.strerror(errno.EBUSY)}")
        return self.packets.pop(name, None) is not None

    def get(self, name: str) -> Counter | None:
        self.requests.append(("get", name))
        if self.fail is not None:
            raise NfacctError(self.fail, f"nfacct {name}: {os.strerror(self.fail)}")
        if name not in self.packets:
            return None
        return Counter(name=name, packets=self.packets[name], bytes=0)
