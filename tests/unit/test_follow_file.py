"""File mode's source: the file is followed like the API's reflectors, kind by kind, into the
same sync loop (one road from any source to the kernel)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pyproxy.sources.file import SourceError, follow_file
from tests import scenario as sc


def _write(path: Path, objects: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    tmp.rename(path)  # a new inode: the change is seen even within one mtime tick


def test_each_change_replaces_every_kind_and_a_broken_save_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    web = sc.service("web", "10.96.0.10", [])
    _write(path, [web, sc.node("n1", ["192.168.1.1"]), {"kind": "ConfigMap", "metadata": {"name": "x"}}])
    calls: list[tuple[str, list[str]]] = []

    async def main() -> None:
        loaded = asyncio.Event()
        task = asyncio.create_task(follow_file(
            str(path), period=0.01, loaded=loaded,
            on_replace=lambda kind, objs: calls.append((kind, [o["metadata"]["name"] for o in objs]))))
        await asyncio.wait_for(loaded.wait(), 5)
        assert calls == [("Service", ["web"]), ("EndpointSlice", []), ("Node", ["n1"])]  # ConfigMap: not ours
        calls.clear()
        _write(path, [sc.service("api", "10.96.0.11", [])])
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        assert calls == [("Service", ["api"]), ("EndpointSlice", []), ("Node", [])]  # what left the file goes
        calls.clear()
        path.write_text("items: [")  # a half-written save
        await asyncio.sleep(0.1)
        assert calls == [] and not task.done()  # logged; the last good version keeps serving
        task.cancel()

    asyncio.run(main())


def test_a_file_unreadable_at_start_ends_the_source_with_its_error(tmp_path: Path) -> None:
    async def main() -> None:
        await follow_file(str(tmp_path / "missing.yaml"), period=0.01, loaded=asyncio.Event(),
                          on_replace=lambda kind, objs: None)

    with pytest.raises(SourceError, match="check the path"):
        asyncio.run(main())
