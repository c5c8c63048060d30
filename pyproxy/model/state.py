"""Assemble the desired state from the store: merge, claims, NodePort addresses.

:class:`StateBuilder` is incremental: it is the :class:`~pyproxy.model.store.ObjectStore` of
one family, and :meth:`StateBuilder.build` re-merges only the Services whose Service or slices
changed. Unchanged service ports keep the very same :class:`ServicePortState` object, so the
proxier can skip them with an ``is`` check. That is what makes a one-endpoint change at 10k
services cheap.
"""

from __future__ import annotations

from collections.abc import Callable

from pyproxy.literals import Family
from pyproxy.model.claims import Claims, claims_of
from pyproxy.model.keys import ObjectKey
from pyproxy.model.merge import merge_ports
from pyproxy.model.nodeports import needs_interfaces, nodeport_ips
from pyproxy.model.objects import (
    DesiredState,
    Problem,
    ServicePortName,
    ServicePortState,
)
from pyproxy.model.store import ObjectStore


class StateBuilder(ObjectStore):
    """The objects a node sees, and the :class:`DesiredState` built from them."""

    def __init__(self, *, node_name: str = "", family: Family = 4) -> None:
        super().__init__(node_name=node_name, family=family)
        self._merged: dict[ObjectKey, tuple[ServicePortState, ...]] = {}
        self._claims = Claims()

    @property
    def problems(self) -> tuple[Problem, ...]:
        return tuple(sorted([*self.reports.problems, *self._claims.conflicts.values()], key=str))

    def _merge(self, key: ObjectKey) -> tuple[ServicePortState, ...]:
        entry = self.services.get(key)
        if entry is None or entry.parsed is None:
            return ()
        return merge_ports(entry.parsed, self.slices_for(key), self.view)

    def build(self, *, nodeport_ips: tuple[str, ...] = ()) -> DesiredState:
        """The desired state now. Re-merges only services touched since the last build."""
        dirty = self.take_dirty()
        for key in dirty:
            merged = self._merge(key)
            old = self._merged.get(key)
            if old is not None and old == merged:
                continue  # keep the old objects: identity tells the proxier nothing changed
            if merged:
                self._merged[key] = merged
            else:
                self._merged.pop(key, None)
        self._claims.settle(dirty, lambda key: claims_of(self._merged.get(key, ())))
        services: dict[ServicePortName, ServicePortState] = {}
        conflicts = self._claims.conflicts
        for key, states in self._merged.items():
            if key in conflicts:
                continue
            for st in states:
                services[st.service.name] = st
        return DesiredState(services=services, nodeport_ips=nodeport_ips, problems=self.problems)

    def needs_interfaces(self, cidrs: tuple[str, ...]) -> bool:
        """Whether this build's NodePort addresses depend on the interfaces' addresses."""
        return needs_interfaces(node=self.node, cidrs=cidrs)

    def build_for_node(self, *, cidrs: tuple[str, ...],
                       interfaces: Callable[[], tuple[str, ...]]) -> DesiredState:
        """:meth:`build` with the NodePort addresses worked out (``interfaces`` is only called
        when they depend on it: it reads the namespace)."""
        ifaces = interfaces() if self.needs_interfaces(cidrs) else ()
        return self.build(nodeport_ips=nodeport_ips(node=self.node, interface_ips=ifaces, cidrs=cidrs))
