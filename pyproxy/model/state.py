"""Assemble the desired state from Services, EndpointSlices and our Node.

:class:`StateBuilder` is incremental: it keeps each parsed object, and :meth:`StateBuilder.build`
re-merges only the Services whose Service or slices changed. Unchanged service ports keep the
very same :class:`ServicePortState` object, so the proxier can skip them with an ``is`` check.
That is what makes a one-endpoint change at 10k services cheap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyproxy.model.ipaddr import ip_in_cidrs
from pyproxy.model.objects import (
    DesiredState,
    Endpoint,
    NodeInfo,
    Problem,
    ServicePort,
    ServicePortName,
    ServicePortState,
)
from pyproxy.model.parse import (
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


def _malformed(kind: str, obj: Any, err: Exception) -> Problem:
    try:
        namespace, name = object_key(obj)
    except Invalid:
        namespace, name = "", "<no name>"
    if kind == "Node":
        namespace = ""
    return Problem(kind, namespace, name, str(err))


class StateBuilder:
    """Holds the objects a node sees and builds :class:`DesiredState` from them."""

    def __init__(self, *, node_name: str = "", family: int = 4) -> None:
        self.family = family
        self.node_name = node_name
        """Only the Node of this name is ours (its addresses take NodePorts)."""
        self._services: dict[Key, tuple[dict[str, Any], tuple[ServicePort, ...] | None]] = {}
        self._slices: dict[Key, tuple[dict[str, Any], ParsedSlice | None]] = {}
        self._slices_of: dict[Key, set[Key]] = defaultdict(set)
        self._problems: dict[tuple[str, Key], Problem] = {}
        self._skips: dict[tuple[str, Key], Skip] = {}
        self._merged: dict[Key, tuple[ServicePortState, ...]] = {}
        self._dirty: set[Key] = set()
        self._claims: dict[tuple[str, str, int], Key] = {}
        self._claims_of: dict[Key, list[tuple[str, str, int]]] = {}
        self._conflicts: dict[Key, Problem] = {}
        self.node: NodeInfo | None = None

    # -- updates ---------------------------------------------------------------------------

    def upsert(self, obj: dict[str, Any]) -> None:
        """Add or replace one Service, EndpointSlice or Node (others are ignored)."""
        kind = obj.get("kind") if isinstance(obj, dict) else None
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
        elif kind == "EndpointSlice":
            old = self._slices.pop(key, None)
            if old is not None and old[1] is not None:
                svc_key = (old[1].namespace, old[1].service)
                self._slices_of[svc_key].discard(key)
                self._dirty.add(svc_key)

    def replace_all(self, objects: Iterable[dict[str, Any]]) -> None:
        """Make the store hold exactly ``objects``: unchanged ones are not re-parsed."""
        seen: dict[str, set[Key]] = {"Service": set(), "EndpointSlice": set()}
        for obj in objects:
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if kind in seen:
                try:
                    seen[kind].add(object_key(obj))
                except Invalid:
                    pass  # recorded as a problem by upsert below
            self.upsert(obj)
        for key in set(self._services) - seen["Service"]:
            self.delete("Service", key)
        for key in set(self._slices) - seen["EndpointSlice"]:
            self.delete("EndpointSlice", key)
        # Problems of objects that are gone (or now nameless) must not linger.
        for pkey in [p for p in self._problems if p[0] in seen and p[1] not in seen[p[0]]]:
            del self._problems[pkey]

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

    def _upsert_service(self, obj: dict[str, Any]) -> None:
        try:
            key = object_key(obj)
        except Invalid as err:
            self._problems[("Service", ("", "<no name>"))] = _malformed("Service", obj, err)
            return
        old = self._services.get(key)
        if old is not None and old[0] == obj:
            return
        ports: tuple[ServicePort, ...] | None
        try:
            ports = parse_service(obj, family=self.family)
            self._clear("Service", key)
        except (Invalid, Skipped) as err:
            ports = None
            self._record("Service", key, err, obj)
        except (TypeError, AttributeError, KeyError) as err:  # shapes we did not foresee
            ports = None
            self._record("Service", key, Invalid(f"malformed: {err}"), obj)
        self._services[key] = (obj, ports)
        self._dirty.add(key)

    def _upsert_slice(self, obj: dict[str, Any]) -> None:
        try:
            key = object_key(obj)
        except Invalid as err:
            self._problems[("EndpointSlice", ("", "<no name>"))] = _malformed("EndpointSlice", obj, err)
            return
        old = self._slices.get(key)
        if old is not None and old[0] == obj:
            return
        parsed: ParsedSlice | None
        try:
            parsed = parse_slice(obj, family=self.family)
            self._clear("EndpointSlice", key)
        except (Invalid, Skipped) as err:
            parsed = None
            self._record("EndpointSlice", key, err, obj)
        except (TypeError, AttributeError, KeyError) as err:
            parsed = None
            self._record("EndpointSlice", key, Invalid(f"malformed: {err}"), obj)
        if old is not None and old[1] is not None:
            old_svc = (old[1].namespace, old[1].service)
            self._slices_of[old_svc].discard(key)
            self._dirty.add(old_svc)
        if parsed is not None:
            svc_key = (parsed.namespace, parsed.service)
            self._slices_of[svc_key].add(key)
            self._dirty.add(svc_key)
        self._slices[key] = (obj, parsed)

    def _upsert_node(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        if self.node_name and meta.get("name") != self.node_name:
            return  # another node's object: not ours
        try:
            node = parse_node(obj, family=self.family)
        except (Invalid, TypeError, AttributeError, KeyError) as err:
            self._problems[("Node", ("", "node"))] = _malformed("Node", obj, err)
            return
        self._problems.pop(("Node", ("", "node")), None)
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
                            )
            states.append(ServicePortState(sp, tuple(sorted(found.values()))))
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

    def _claim(self, dirty: set[Key]) -> None:
        """Give each ClusterIP:port and NodePort to one Service only.

        The API server forbids two Services sharing them, but a hand-written file or a race can
        still hold such a pair, and the kernel would refuse the whole ruleset ("File exists").
        The Service that claimed first keeps it (on a fresh start, the first in name order); the
        other is skipped as invalid until the conflict goes away.
        """
        recheck = sorted(dirty | set(self._conflicts))
        for key in recheck:
            for claim in self._claims_of.pop(key, ()):
                if self._claims.get(claim) == key:
                    del self._claims[claim]
            self._conflicts.pop(key, None)
        for key in recheck:
            wanted = []
            for st in self._merged.get(key, ()):
                sp = st.service
                wanted.append((sp.cluster_ip, sp.name.protocol, sp.port))
                if sp.node_port:
                    wanted.append(("nodePort", sp.name.protocol, sp.node_port))
            clash = next(((c, self._claims[c]) for c in wanted if self._claims.get(c, key) != key), None)
            if clash is not None:
                (what, proto, number), owner = clash
                where = (f"NodePort {number}/{proto.upper()}" if what == "nodePort"
                         else f"{what} port {number}/{proto.upper()}")
                self._conflicts[key] = Problem(
                    "Service", key[0], key[1], f"{where} is already used by Service {owner[0]}/{owner[1]}")
                continue
            for claim in wanted:
                self._claims[claim] = key
            self._claims_of[key] = wanted


def nodeport_ips(
    *,
    node: NodeInfo | None,
    interface_ips: tuple[str, ...],
    cidrs: tuple[str, ...],
) -> tuple[str, ...]:
    """Which addresses accept NodePorts.

    With no ``--nodeport-addresses`` CIDRs: the Node object's addresses when we have it, else
    every interface address. With CIDRs: every node or interface address inside them. Loopback
    is always left out (localhost NodePorts need route_localnet; see the README).
    """
    if cidrs:
        candidates = list((node.addresses if node else ())) + list(interface_ips)
        chosen = [ip for ip in candidates if ip_in_cidrs(ip, cidrs)]
    else:
        chosen = list(node.addresses) if node and node.addresses else list(interface_ips)
    out: list[str] = []
    for ip in chosen:
        if ip.startswith("127.") or ip == "::1" or ip in out:
            continue
        out.append(ip)
    return tuple(out)
