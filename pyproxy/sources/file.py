"""Read Services, EndpointSlices and Nodes from a YAML or JSON file.

Accepts what people have at hand: several documents separated by ``---``, a ``kind: List`` as
``kubectl get -o yaml`` writes it (``items:``), or a mix; or the same as JSON (``kubectl get -o
json``), read by the json module, several times faster than any YAML loader. Unknown kinds are
ignored.

The file may come from anyone, so reading it must never crash, hang or exhaust the process:

* JSON: the json module is linear and raises RecursionError on deep nesting.
* YAML is read by libyaml's C loader when PyYAML has it (the pure-Python one is ~5 times
  slower). But libyaml composes nested collections by C recursion with no depth limit (a file
  nested ~50,000 deep overflows the C stack: a segfault), its scanner and PyYAML's constructor
  take time quadratic in the depth (40,000 levels: 8 s, 100,000: 45 s just to scan), and YAML
  aliases let a 600-byte file expand to 10**9 values once anything walks it (the "billion
  laughs"). None of that can be caught in-process. So a YAML file that could be deep or could
  hold aliases is read by a child process under a memory limit and a time limit, which hands
  back the objects as JSON (expanding aliases there, under its limit). Whether a file could be
  deep is decided soundly in one pass of C string methods: nesting cannot exceed the number of
  ``[`` and ``{`` plus twice the deepest block indentation. Aliases need a ``*``. Small, plain
  files (every test's, every hand-written one) are read in-process, without the ~0.1 s a child
  costs.
* Bytes that are not UTF-8 are an error that says where, not a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from pyproxy import gcpolicy
from pyproxy.model.store import by_kind

log = logging.getLogger("pyproxy.file")

try:  # libyaml's C loader: PyYAML's wheels ship it; fall back where it was built without.
    from yaml import CSafeLoader as Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as Loader  # type: ignore[assignment]

MAX_DEPTH = 1000
"""Nesting read in-process without a second thought. Kubernetes objects nest about 10 deep."""
CHILD_MEMORY = 2 << 30
"""Address space of the child that reads a risky YAML file, beyond 50 times the file's size."""
CHILD_SECONDS = 20.0
"""Time the child may take, plus 3 s per MB (libyaml reads ~2 MB/s)."""
_PREFIX = re.compile(r"^[ \t?:-]*", re.M)


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


def _depth_bound(text: str) -> int:
    """An upper bound of the YAML nesting depth: every flow level opens with a bracket, and every
    block level needs one more column of indentation or a ``- `` (a sequence inside a mapping
    may share its column, hence the factor 2)."""
    prefix = max((len(m) for m in _PREFIX.findall(text)), default=0)
    return text.count("[") + text.count("{") + 2 * prefix + 2


def _risky(text: str) -> bool:
    return "*" in text or _depth_bound(text) > MAX_DEPTH


def _load_yaml_in_child(data: bytes, path: str) -> list[Any]:
    timeout = CHILD_SECONDS + 3.0 * len(data) / 1e6
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pyproxy.sources.yamlchild", str(CHILD_MEMORY + 50 * len(data))],
            input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SourceError(f"{path}: reading it as YAML took more than {timeout:.0f}s (nested "
                          "very deeply?); a Kubernetes object nests about 10 levels: fix the "
                          "file, or give it as JSON") from None
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    if proc.returncode == 2:  # the child's own verdict: invalid YAML, too big, too deep
        raise SourceError(f"{path} {err[-1] if err else 'cannot be read'}")
    if proc.returncode != 0:
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise SourceError(f"{path}: the YAML reader died ({why}; nested too deeply or too big "
                          "once its aliases are expanded?); fix the file")
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _parse(data: bytes, text: str, path: str) -> list[Any]:
    if text.lstrip()[:1] in ("{", "["):
        try:
            with gcpolicy.paused(settle=True):  # the whole cluster's objects at once
                return [json.loads(text)]
        except RecursionError:
            raise SourceError(f"{path}: JSON nested too deeply; a Kubernetes object nests about "
                              "10 levels: fix the file") from None
        except ValueError:
            pass  # YAML's flow style looks like JSON too: let the YAML loader judge it
    if _risky(text):
        return _load_yaml_in_child(data, path)
    try:
        return list(yaml.load_all(text, Loader=Loader))
    except yaml.YAMLError as err:
        raise SourceError(f"{path} is not valid YAML ({err}); fix the file and try again") from None


def load_objects(path: str) -> list[dict[str, Any]]:
    """Every object in the file, Lists flattened. Raises SourceError with a fix in the message."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise SourceError(f"cannot read --source-file {path}: {err.strerror}; check the path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SourceError(f"{path} is not UTF-8 text (byte {err.start}, line {line}: "
                          f"{data[err.start:err.start + 1]!r}); save it as UTF-8") from None
    docs = _parse(data, text, path)
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


async def follow_file(path: str, *, period: float,
                      on_replace: Callable[[str, list[dict[str, Any]]], None],
                      loaded: asyncio.Event) -> None:
    """Forever: whenever the file changes (checked every ``period`` seconds), hand each kind's
    objects to ``on_replace`` as a relist would, then set ``loaded``. The file is the source's
    whole truth, so what left it is deleted. A file that cannot be read later (a half-written
    save) is logged and the last good version keeps serving; one that cannot be read at start
    ends the task with its SourceError (nothing to serve yet: the command says why)."""
    stamp: tuple[int, int, int] | None = None
    first = True
    while True:
        current = file_stamp(path)
        if first or current != stamp:
            stamp = current
            try:
                objects = await asyncio.to_thread(load_objects, path)
            except SourceError as err:
                if first:
                    raise
                log.error("%s (keeping the rules of the last good version)", err)
            else:
                for kind, of_kind in by_kind(objects).items():
                    on_replace(kind, of_kind)
                loaded.set()
            first = False
        await asyncio.sleep(period)
