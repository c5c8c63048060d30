"""The objects one node's proxy has read, parsed, with what changed since the last build.

The store keeps each Service's parsed ports and each EndpointSlice's parsed endpoints, and a
fingerprint of the object instead of the object, so a relist or a rewritten file parses only
the objects that changed. It records which Services need merging again (``take_dirty``). Every
source takes the same road: a watch event is :meth:`ObjectStore.upsert` or
:meth:`ObjectStore.delete_object`, a relist (or one kind of a source file) is
:meth:`ObjectStore.replace`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar

from pyproxy.literals import Family
from pyproxy.model.keys import ObjectKey
from pyproxy.model.objects import NodeInfo, NodeView, ServicePort
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
from pyproxy.model.reports import Reports, Skip, problem_of, why

KINDS = ("Service", "EndpointSlice", "Node")
"""What a node's proxy reads; other kinds (in a source file) are left alone, as API mode never
lists them."""

T = TypeVar("T")


class Stored(NamedTuple, Generic[T]):
    """One stored object: what tells its versions apart, and its parsed form (None when it
    could not be taken: its report says why)."""

    stamp: object
    parsed: T | None


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


def kind_of(obj: Any) -> str | None:
    """The object's kind, or None when it has none we could use (a list, a number...)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


def by_kind(objects: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """The objects of each kind pyproxy reads: what one relist per kind would return."""
    grouped: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for obj in objects:
        kind = kind_of(obj)
        if kind in grouped:
            grouped[kind].append(obj)
    return grouped


def _key(obj: Any) -> ObjectKey:
    return ObjectKey(*object_key(obj))


class ObjectStore:
    """The Services, EndpointSlices and Node one family's proxy has read."""

    def __init__(self, *, node_name: str = "", family: Family = 4) -> None:
        self.family = family
        self.node_name = node_name
        """Only the Node of this name is ours (its addresses take NodePorts)."""
        self.services: dict[ObjectKey, Stored[tuple[ServicePort, ...]]] = {}
        self.slices: dict[ObjectKey, Stored[ParsedSlice]] = {}
        self.slices_of: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        """The slices of each Service (by the Service's key), for merging."""
        self.reports = Reports()
        self._node: NodeInfo | None = None
        self.view = NodeView(name=node_name)
        """What of our Node the merged services depend on."""
        self._dirty: set[ObjectKey] = set()
        self.changes = 0
        """Services and EndpointSlices added, changed or deleted so far (unchanged ones that a
        relist or a file brings again are not counted)."""

    def is_ours(self, obj: Any) -> bool:
        """Whether a Node object is this node's (the one place that decides; without a node
        name, as in a one-node file, any Node is)."""
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        return not self.node_name or (isinstance(meta, dict) and meta.get("name") == self.node_name)

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
        if view != self.view:
            self.view = view
            self._dirty.update(self.services)

    def take_dirty(self) -> set[ObjectKey]:
        """The Services whose Service, slices or node view changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def slices_for(self, key: ObjectKey) -> list[ParsedSlice]:
        """The parsed slices of the Service ``key``, in name order."""
        out = []
        for k in sorted(self.slices_of.get(key, ())):
            parsed = self.slices[k].parsed
            if parsed is not None:
                out.append(parsed)
        return out

    @property
    def skips(self) -> tuple[Skip, ...]:
        return self.reports.skips

    # -- updates ---------------------------------------------------------------------------

    def upsert(self, obj: dict[str, Any]) -> ObjectKey | None:
        """Add or replace one Service, EndpointSlice or Node (others are ignored). The key of
        a Service or slice, None when it has no valid name (reported) or is of another kind."""
        kind = kind_of(obj)
        if kind == "Service":
            return self._upsert_service(obj)
        if kind == "EndpointSlice":
            return self._upsert_slice(obj)
        if kind == "Node":
            self._upsert_node(obj)
        return None

    def delete(self, kind: str, key: tuple[str, str]) -> None:
        """Forget an object, as on a watch DELETED event."""
        key = ObjectKey(*key)
        self.reports.clear(kind, key)
        if kind == "Service" and self.services.pop(key, None) is not None:
            self._dirty.add(key)
            self.changes += 1
        elif kind == "EndpointSlice":
            old = self.slices.pop(key, None)
            self.changes += old is not None
            if old is not None and old.parsed is not None:
                svc_key = ObjectKey(old.parsed.namespace, old.parsed.service)
                self._unlink_slice(svc_key, key)
                self._dirty.add(svc_key)

    def delete_object(self, obj: dict[str, Any]) -> None:
        """A watch DELETED event."""
        kind = kind_of(obj) or ""
        if kind == "Node":
            if self.is_ours(obj):
                self.node = None
            return
        try:
            self.delete(kind, _key(obj))
        except Invalid:
            pass

    def replace(self, kind: str, objects: list[dict[str, Any]]) -> int:
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
                self.reports.node = None
            return 0
        store: dict[ObjectKey, Any] = self.services if kind == "Service" else self.slices
        self.reports.start_relist(kind)
        seen: set[ObjectKey] = set()
        for obj in objects:
            key = self.upsert(obj)  # None: nameless (reported)
            if key is not None:
                seen.add(key)
        for key in set(store) - seen:
            self.delete(kind, key)
        self.reports.keep_only(kind, seen)
        return self.changes - before

    def replace_all(self, objects: Iterable[dict[str, Any]]) -> None:
        """Make the store hold exactly ``objects`` (a whole source file): each kind replaced as
        :meth:`replace` does, so a file and the API take the same road."""
        for kind, of_kind in by_kind(objects).items():
            self.replace(kind, of_kind)

    def _parse(self, kind: str, obj: dict[str, Any], store: dict[ObjectKey, Stored[T]],
               parse: Callable[..., T]) -> tuple[ObjectKey, Stored[T] | None, Stored[T] | None] | None:
        """Shared by Services and slices: the key, the new entry (None when nothing changed)
        and the old one; None when the object has no name (reported)."""
        try:
            key = _key(obj)
        except Invalid as err:
            self.reports.nameless(kind, obj, err)
            return None
        old = store.get(key)
        try:
            stamp = fingerprint(obj)
        except (TypeError, ValueError, RecursionError) as err:
            # Keys that are not strings (YAML allows them), or nesting too deep to serialise.
            self.reports.record(kind, key, Invalid(f"cannot be read as an API object: {why(err)}"), obj)
            return key, Stored(None, None), old
        if old is not None and old.stamp == stamp:
            return key, None, old
        parsed = None
        try:
            parsed = parse(obj, family=self.family, key=key)
            self.reports.clear(kind, key)
        except (Invalid, Skipped) as err:
            self.reports.record(kind, key, err, obj)
        except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as err:
            # Shapes we did not foresee: the object is skipped, never the sync.
            self.reports.record(kind, key, Invalid(f"malformed: {why(err)}"), obj)
        return key, Stored(stamp, parsed), old

    def _upsert_service(self, obj: dict[str, Any]) -> ObjectKey | None:
        got = self._parse("Service", obj, self.services, parse_service)
        if got is None:
            return None
        key, entry, _ = got
        if entry is not None:
            self.services[key] = entry
            self._dirty.add(key)
            self.changes += 1
        return key

    def _upsert_slice(self, obj: dict[str, Any]) -> ObjectKey | None:
        got = self._parse("EndpointSlice", obj, self.slices, parse_slice)
        if got is None:
            return None
        key, entry, old = got
        if entry is None:
            return key
        self.changes += 1
        if old is not None and old.parsed is not None:
            old_svc = ObjectKey(old.parsed.namespace, old.parsed.service)
            self._unlink_slice(old_svc, key)
            self._dirty.add(old_svc)
        if entry.parsed is not None:
            svc_key = ObjectKey(entry.parsed.namespace, entry.parsed.service)
            self.slices_of[svc_key].add(key)
            self._dirty.add(svc_key)
        self.slices[key] = entry
        return key

    def _unlink_slice(self, svc_key: ObjectKey, key: ObjectKey) -> None:
        """Forget that slice ``key`` belongs to ``svc_key``; drop the entry once it is empty, or
        every Service ever seen would keep one (19 MB after 50,000 created and deleted)."""
        keys = self.slices_of.get(svc_key)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.slices_of[svc_key]

    def _upsert_node(self, obj: dict[str, Any]) -> None:
        if not self.is_ours(obj):
            return  # another node's object
        try:
            node = parse_node(obj, family=self.family)
        except (Invalid, TypeError, AttributeError, KeyError) as err:
            self.reports.node = problem_of("Node", obj, err)
            return
        self.reports.node = None
        self.node = node
