"""Read Services, EndpointSlices and Nodes from a YAML file.

Accepts what people have at hand: several documents separated by ``---``, a ``kind: List`` as
``kubectl get -o yaml`` writes it (``items:``), or a mix. Unknown kinds are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import yaml


class SourceError(RuntimeError):
    """The file cannot be read or is not YAML; the message says what to fix."""


def _flatten(doc: Any, where: str) -> Iterator[dict[str, Any]]:
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise SourceError(f"{where}: expected a Kubernetes object (a mapping), got {type(doc).__name__}")
    kind = doc.get("kind")
    kind = kind if isinstance(kind, str) else ""  # a bad kind is ignored like an unknown one
    if kind == "List" or (kind.endswith("List") and "items" in doc):
        items = doc.get("items") or []
        if not isinstance(items, list):
            raise SourceError(f"{where}: 'items' of a List must be a list")
        for i, item in enumerate(items):
            if isinstance(item, dict) and "kind" not in item and kind.endswith("List") and kind != "List":
                # "ServiceList" items carry no kind of their own.
                item = {**item, "kind": kind[: -len("List")]}
            yield from _flatten(item, f"{where} items[{i}]")
        return
    yield doc


def load_objects(path: str) -> list[dict[str, Any]]:
    """Every object in the file, Lists flattened. Raises SourceError with a fix in the message."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise SourceError(f"cannot read --source-file {path}: {err.strerror}; check the path") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise SourceError(f"{path} is not valid YAML ({err}); fix the file and try again") from None
    objects: list[dict[str, Any]] = []
    for n, doc in enumerate(docs):
        objects.extend(_flatten(doc, f"{path} document {n + 1}"))
    return objects


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is rewritten (mtime, size, inode); None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
