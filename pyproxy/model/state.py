"""Assemble the desired state from Services, EndpointSlices and our Node.

:class:`StateBuilder` is incremental: it keeps each parsed object, and :meth:`StateBuilder.build`
re-merges only the Services whose Service or slices changed. Unchanged service ports keep the
very same :class:`ServicePortState` object, so the proxier can skip them with an ``is`` check.
That is what makes a one-endpoint change at 10k services cheap.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pyproxy.model.ipaddr import ip_in_cidrs
from pyproxy.model.objects import (
    DesiredState,
    Endpoint,
    NodeInfo,
    NodeView,
    Problem,
    ServicePort,
    ServicePortName,
    ServicePortState,
)
from pyproxy.model.parse import (
    ZONE_LABEL,
    Invalid,
    ParsedSlice,
    Skipped,
    object_key,
    parse_node,
    parse_service,
    parse_slice,
)

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Skip:
    """A valid object that is not ours to program, with why (logged at debug level)."""

    kind: str
    key: Key
    reason: str


def _kind(obj: Any) -> str | None:
    """The object's kind, or None when it has none we could use (a list, a number...)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def fingerprint(obj: Any) -> object:
    """What tells two versions of an object apart, without keeping the object.

    From the API, uid + resourceVersion change on every write. From a file there is no
    resourceVersion, so hash the canonical JSON. Keeping this instead of the dict saves the
    size of the whole cluster's objects (~70 MB at 10k services × 10 endpoints).
    """
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and meta.get("resourceVersion"):
        return ("rv", meta.get("uid"), meta["resourceVersion"])
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _why(err: BaseException) -> str:
    """An exception as one short line for a problem report."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


KINDS = ("Service", "EndpointSlice", "Node")
"""What a node's proxy reads; other kinds (in a source file) are left alone, as API mode never
lists them."""
NAMELESS: Key = ("", "<no name>")
"""The key a problem of an object without a usable name is kept under."""
NODE_KEY: Key = ("", "node")
"""The key of our Node's problem (there is one Node of ours)."""


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The objects of each kind pyproxy reads: what one relist per kind would return."""
    grouped: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for obj in objects:
        kind = obj.get("kind") if isinstance(obj, dict) else None
        if isinstance(kind, str) and kind in grouped:
            grouped[kind].append(obj)
    return grouped


def _malformed(kind: str, obj: Any, err: Exception) -> Problem:
    try:
        namespace, name = object_key(obj)
    except Invalid:
        namespace, name = NAMELESS
    if kind == "Node":
        namespace = ""
    return Problem(kind, namespace, name, str(err))


class StateBuilder:
    """Holds the objects a node sees and builds :class:`DesiredState` from them."""

    def __init__(self, *, node_name: str = "", family: int = 4) -> None:
        self.family = family
        self.node_name = node_name
        """Only the Node of this name is ours (its addresses take NodePorts)."""
        self._services: dict[Key, tuple[object, tuple[ServicePort, ...] | None]] = {}
        self._slices: dict[Key, tuple[object, ParsedSlice | None]] = {}
        self._slices_of: dict[Key, set[Key]] = defaultdict(set)
        self._problems: dict[tuple[str, Key], Problem] = {}
        self._skips: dict[tuple[str, Key], Skip] = {}
        self._merged: dict[Key, tuple[ServicePortState, ...]] = {}
        self._dirty: set[Key] = set()
        self._claims: dict[tuple[str, str, int], Key] = {}
        self._claims_of: dict[Key, list[tuple[str, str, int]]] = {}
        self._conflicts: dict[Key, Problem] = {}
        self._node: NodeInfo | None = None
        self._view = NodeView(name=node_name)
        self.changes = 0
        """Services and EndpointSlices added, changed or deleted so far (unchanged ones that a
        relist or a file brings again are not counted)."""

    def is_ours(self, obj: Any) -> bool:
        """Whether a Node object is this node's (the one place that decides; without a node
        name, as in a one-node file, any Node is)."""
        meta = obj.get("metadata") if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) else {}
        return not self.node_name or meta.get("name") == self.node_name

    @property
    def node(self) -> NodeInfo | None:
        return self._node

    @node.setter
    def node(self, node: NodeInfo | None) -> None:
        """Our Node. When what services depend on (zone, addresses) changes, every service is
        merged again; services whose result did not change keep their identity."""
        self._node = node
        view = NodeView(name=self.node_name, zone=dict(node.labels).get(ZONE_LABEL, "") if node else "",
                        addresses=node.addresses if node else ())
        if view != self._view:
            self._view = view
            self._dirty.update(self._services)

    # -- updates ---------------------------------------------------------------------------

    def upsert(self, obj: dict[str, Any]) -> None:
        """Add or replace one Service, EndpointSlice or Node (others are ignored)."""
        kind = _kind(obj)
        if kind == "Service":
            self._upsert_service(obj)
        elif kind == "EndpointSlice":
            self._upsert_slice(obj)
        elif kind == "Node":
            self._upsert_node(obj)

    def delete(self, kind: str, key: Key) -> None:
        """Forget an object, as on a watch DELETED event."""
        self._problems.pop((kind, key), None)
        self._skips.pop((kind, key), None)
        if kind == "Service" and self._services.pop(key, None) is not None:
            self._dirty.add(key)
            self.changes += 1
        elif kind == "EndpointSlice":
            old = self._slices.pop(key, None)
            self.changes += old is not None
            if old is not None and old[1] is not None:
                svc_key = (old[1].namespace, old[1].service)
                self._unlink_slice(svc_key, key)
                self._dirty.add(svc_key)

    def replace_kind(self, kind: str, objects: list[dict[str, Any]]) -> int:
        """Make the store hold exactly ``objects`` of one kind (a reflector's relist, or one
        kind of a source file that changed); unchanged objects are not parsed again.

        Objects missing from the list are deleted: this is how a delete missed while the watch
        was down reaches the dataplane, and how an object taken out of a file does. Returns
        how many Services or EndpointSlices this added, changed or deleted.
        """
        before = self.changes
        if kind == "Node":
            ours = [o for o in objects if self.is_ours(o)]
            if ours:
                self.upsert(ours[0])
            else:  # our Node is gone: NodePorts fall back to interface addresses
                self.node = None
                self._problems.pop(("Node", NODE_KEY), None)
            return 0
        store = self._services if kind == "Service" else self._slices
        # Problems of nameless objects cannot be matched to a key: start them afresh.
        for pkey in [p for p in self._problems if p[0] == kind and p[1] == NAMELESS]:
            del self._problems[pkey]
        seen: set[Key] = set()
        for obj in objects:
            try:
                seen.add(object_key(obj))
            except Invalid:
                pass  # recorded as a problem by upsert below
            self.upsert(obj)
        for key in set(store) - seen:
            self.delete(kind, key)
        # Problems of objects that are gone must not linger.
        for pkey in [p for p in self._problems if p[0] == kind and p[1] not in seen and p[1] != NAMELESS]:
            del self._problems[pkey]
        return self.changes - before

    def delete_object(self, obj: dict[str, Any]) -> None:
        """A watch DELETED event."""
        kind = _kind(obj) or ""
        if kind == "Node":
            if self.is_ours(obj):
                self.node = None
            return
        try:
            self.delete(kind, object_key(obj))
        except Invalid:
            pass

    def replace_all(self, objects: Iterable[dict[str, Any]]) -> None:
        """Make the store hold exactly ``objects`` (a whole source file): each kind replaced as
        :meth:`replace_kind` does, so a file and the API take the same road."""
        for kind, of_kind in by_kind(list(objects)).items():
            self.replace_kind(kind, of_kind)

    def _record(self, kind: str, key: Key, err: Exception, obj: Any) -> None:
        if isinstance(err, Skipped):
            self._skips[(kind, key)] = Skip(kind, key, str(err))
            self._problems.pop((kind, key), None)
        else:
            self._problems[(kind, key)] = _malformed(kind, obj, err)
            self._skips.pop((kind, key), None)

    def _clear(self, kind: str, key: Key) -> None:
        self._problems.pop((kind, key), None)
        self._skips.pop((kind, key), None)

    def _parse(self, kind: str, obj: dict[str, Any], store: dict[Key, Any],
               parse: Any) -> tuple[Key, object, Any, Any] | None:
        """Shared by Services and slices: key, fingerprint, old entry and parsed value, or
        None when nothing changed (or the object has no name, which is recorded)."""
        try:
            key = object_key(obj)
        except Invalid as err:
            self._problems[(kind, NAMELESS)] = _malformed(kind, obj, err)
            return None
        old = store.get(key)
        try:
            stamp = fingerprint(obj)
        except (TypeError, ValueError, RecursionError) as err:
            # Keys that are not strings (YAML allows them), or nesting too deep to serialise.
            self._record(kind, key, Invalid(f"cannot be read as an API object: {_why(err)}"), obj)
            return key, None, old, None
        if old is not None and old[0] == stamp:
            return None
        parsed = None
        try:
            parsed = parse(obj, family=self.family)
            self._clear(kind, key)
        except (Invalid, Skipped) as err:
            self._record(kind, key, err, obj)
        except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as err:
            # Shapes we did not foresee: the object is skipped, never the sync.
            self._record(kind, key, Invalid(f"malformed: {_why(err)}"), obj)
        return key, stamp, old, parsed

    def _upsert_service(self, obj: dict[str, Any]) -> None:
        got = self._parse("Service", obj, self._services, parse_service)
        if got is not None:
            key, stamp, _, ports = got
            self._services[key] = (stamp, ports)
            self._dirty.add(key)
            self.changes += 1

    def _upsert_slice(self, obj: dict[str, Any]) -> None:
        got = self._parse("EndpointSlice", obj, self._slices, parse_slice)
        if got is None:
            return
        key, stamp, old, parsed = got
        self.changes += 1
        if old is not None and old[1] is not None:
            old_svc = (old[1].namespace, old[1].service)
            self._unlink_slice(old_svc, key)
            self._dirty.add(old_svc)
        if parsed is not None:
            svc_key = (parsed.namespace, parsed.service)
            self._slices_of[svc_key].add(key)
            self._dirty.add(svc_key)
        self._slices[key] = (stamp, parsed)

    def _unlink_slice(self, svc_key: Key, key: Key) -> None:
        """Forget that slice ``key`` belongs to ``svc_key``; drop the entry once it is empty, or
        every Service ever seen would keep one (19 MB after 50,000 created and deleted)."""
        keys = self._slices_of.get(svc_key)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._slices_of[svc_key]

    def _upsert_node(self, obj: dict[str, Any]) -> None:
        if not self.is_ours(obj):
            return  # another node's object
        try:
            node = parse_node(obj, family=self.family)
        except (Invalid, TypeError, AttributeError, KeyError) as err:
            self._problems[("Node", NODE_KEY)] = _malformed("Node", obj, err)
            return
        self._problems.pop(("Node", NODE_KEY), None)
        self.node = node

    # -- output ----------------------------------------------------------------------------

    @property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(sorted([*self._problems.values(), *self._conflicts.values()], key=str))

    @property
    def skips(self) -> tuple[Skip, ...]:
        return tuple(self._skips.values())

    def _merge(self, key: Key) -> tuple[ServicePortState, ...]:
        entry = self._services.get(key)
        if entry is None or entry[1] is None:
            return ()
        slices = [self._slices[k][1] for k in sorted(self._slices_of.get(key, ()))]
        states = []
        for sp in entry[1]:
            found: dict[tuple[str, int], Endpoint] = {}
            for sl in slices:
                assert sl is not None
                for port_name, proto, port in sl.ports:
                    if port_name != sp.name.port or proto != sp.name.protocol:
                        continue
                    for ep in sl.endpoints:
                        prev = found.get((ep.ip, port))
                        # The same endpoint can sit in two slices while the controller moves
                        # it; prefer the ready copy, else keep the first.
                        if prev is None or (ep.ready and not prev.ready):
                            found[(ep.ip, port)] = Endpoint(
                                ip=ep.ip,
                                port=port,
                                ready=ep.ready,
                                serving=ep.serving,
                                terminating=ep.terminating,
                                node_name=ep.node_name,
                                zone=ep.zone,
                                zone_hints=ep.zone_hints,
                                node_hints=ep.node_hints,
                            )
            states.append(ServicePortState(sp, tuple(sorted(found.values())), self._view))
        return tuple(states)

    def build(self, *, nodeport_ips: tuple[str, ...] = ()) -> DesiredState:
        """The desired state now. Re-merges only services touched since the last build."""
        dirty = self._dirty
        self._dirty = set()
        for key in dirty:
            merged = self._merge(key)
            old = self._merged.get(key)
            if old is not None and old == merged:
                continue  # keep the old objects: identity tells the proxier nothing changed
            if merged:
                self._merged[key] = merged
            else:
                self._merged.pop(key, None)
        self._claim(dirty)
        services: dict[ServicePortName, ServicePortState] = {}
        for key, states in self._merged.items():
            if key in self._conflicts:
                continue
            for st in states:
                services[st.service.name] = st
        return DesiredState(services=services, nodeport_ips=nodeport_ips, problems=self.problems)

    def build_for_node(self, *, cidrs: tuple[str, ...],
                       interfaces: Callable[[], tuple[str, ...]]) -> DesiredState:
        """:meth:`build` with the NodePort addresses worked out: our Node object's addresses,
        or, when it is missing or has none, the interfaces'; with ``--nodeport-addresses``
        CIDRs, both (``interfaces`` is only called when needed: it reads the namespace)."""
        node = self.node
        ifaces = interfaces() if self.needs_interfaces(cidrs) else ()
        return self.build(nodeport_ips=nodeport_ips(node=node, interface_ips=ifaces, cidrs=cidrs))

    def needs_interfaces(self, cidrs: tuple[str, ...]) -> bool:
        """Whether the NodePort addresses depend on the interfaces' addresses: no Node object
        (or one without addresses), or ``--nodeport-addresses`` CIDRs - with CIDRs any local
        address inside them takes NodePorts, as upstream, not only the Node object's."""
        node = self.node
        return node is None or not node.addresses or any(c != "primary" for c in cidrs)

    def _claim(self, dirty: set[Key]) -> None:
        """Give each ClusterIP:port and NodePort to one Service only.

        The API server forbids two Services sharing them, but a hand-written file or a race can
        still hold such a pair, and the kernel would refuse the whole ruleset ("File exists").
        The Service that claimed first keeps it (on a fresh start, the first in name order); the
        other is skipped as invalid until the conflict goes away.
        """
        def wanted(key: Key) -> list[tuple[str, str, int]]:
            out = []
            for st in self._merged.get(key, ()):
                sp = st.service
                out.append((sp.cluster_ip, sp.name.protocol, sp.port))
                # External and LB IPs share the map keyed on address . protocol . port.
                out.extend((ip, sp.name.protocol, sp.port) for ip in sp.external_vips
                           if ip != sp.cluster_ip)
                if sp.node_port:
                    out.append(("nodePort", sp.name.protocol, sp.node_port))
            return out

        def release(key: Key, keep: list[tuple[str, str, int]]) -> None:
            held = self._claims_of.pop(key, [])
            for claim in held:
                if claim not in keep and self._claims.get(claim) == key:
                    del self._claims[claim]
            kept = [c for c in held if c in keep]
            if kept:
                self._claims_of[key] = kept

        # Owners first (a changed owner keeps what it still wants), then the rest in name
        # order; Services that were in conflict go last, so they never take over a claim.
        for key in dirty:
            release(key, wanted(key))
        for key in sorted(dirty - set(self._conflicts)) + sorted(self._conflicts):
            self._conflicts.pop(key, None)
            want = wanted(key)
            clash = next(((c, self._claims[c]) for c in want if self._claims.get(c, key) != key), None)
            if clash is not None:
                (what, proto, number), owner = clash
                where = (f"NodePort {number}/{proto.upper()}" if what == "nodePort"
                         else f"{what} port {number}/{proto.upper()}")
                self._conflicts[key] = Problem(
                    "Service", key[0], key[1], f"{where} is already used by Service {owner[0]}/{owner[1]}")
                release(key, [])  # excluded entirely: it holds nothing
                continue
            for claim in want:
                self._claims[claim] = key
            if want:
                self._claims_of[key] = want


def nodeport_ips(
    *,
    node: NodeInfo | None,
    interface_ips: tuple[str, ...],
    cidrs: tuple[str, ...],
) -> tuple[str, ...]:
    """Which addresses accept NodePorts.

    With no ``--nodeport-addresses`` CIDRs: the Node object's addresses when we have it, else
    every interface address. With CIDRs: every node or interface address inside them. The
    keyword ``primary`` adds the node's primary address (the Node's first InternalIP or
    ExternalIP; without a Node object, the first non-loopback interface address). Loopback is
    always left out (localhost NodePorts need route_localnet; see the README).
    """
    primary: list[str] = []
    if "primary" in cidrs:
        cidrs = tuple(c for c in cidrs if c != "primary")
        pool = (node.addresses if node and node.addresses else ()) or tuple(
            ip for ip in interface_ips if not ip.startswith("127."))
        primary = list(pool[:1])
        if not cidrs:
            return tuple(primary)
    if cidrs:
        candidates = list((node.addresses if node else ())) + list(interface_ips)
        chosen = [ip for ip in candidates if ip_in_cidrs(ip, cidrs)]
    else:
        chosen = list(node.addresses) if node and node.addresses else list(interface_ips)
    out: list[str] = []
    for ip in [*primary, *chosen]:
        if ip.startswith("127.") or ip == "::1" or ip in out:
            continue
        out.append(ip)
    return tuple(out)
