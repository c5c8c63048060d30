"""How stored objects are named."""

from __future__ import annotations

from typing import NamedTuple


class ObjectKey(NamedTuple):
    """A namespaced object's identity in the store (a Service or an EndpointSlice)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"
