"""pyproxy.sources.file and the store behind it: hostile files never crash the reader, and one
bad object never costs the others (hardening issue, defect 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxy.model.state import StateBuilder
from pyproxy.sources.file import MAX_DEPTH, SourceError, load_objects
from tests import scenario as sc

CANARY = [sc.service("canary", "10.96.0.99", [sc.port(80, name="http")]),
          sc.endpoint_slice("canary", ["10.244.0.9"], [sc.port(8080, name="http")])]


def _write(tmp_path: Path, text: str | bytes, name: str = "f.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def _canary_alive(objects: list) -> StateBuilder:
    b = StateBuilder(node_name="node-1")
    b.replace_all(objects)
    state = b.build()
    assert any(n.name == "canary" for n in state.services), "the valid Service was lost"
    return b


def test_non_string_keys_make_only_that_object_invalid(tmp_path: Path):
    text = sc.dump(CANARY) + "---\n" + (
        "kind: Service\nmetadata: {name: odd, namespace: test, labels: {1: a, b: 2}}\n"
        "spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n")
    b = _canary_alive(load_objects(_write(tmp_path, text)))
    assert [p.name for p in b.problems] == ["odd"]
    assert "cannot be read as an API object" in b.problems[0].reason


def test_a_list_valued_kind_is_ignored_like_an_unknown_kind(tmp_path: Path):
    text = sc.dump(CANARY) + "---\nkind: [Service]\nmetadata: {name: x}\n"
    b = _canary_alive(load_objects(_write(tmp_path, text)))
    assert b.problems == ()


def test_bytes_that_are_not_utf8_are_an_error_that_says_where(tmp_path: Path):
    path = _write(tmp_path, sc.dump(CANARY).encode() + b"# caf\xe9\n")
    with pytest.raises(SourceError, match=r"is not UTF-8 text \(byte \d+, line \d+"):
        load_objects(path)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200_000])
def test_deep_flow_nesting_is_refused_without_crashing(tmp_path: Path, depth: int):
    """200,000 levels overflow libyaml's C recursion on an 8 MB stack (a segfault), and fewer
    cost time quadratic in the depth: run in a child process, so that a crash or a hang fails
    the test instead of killing pytest."""
    path = _write(tmp_path, "kind: Service\nmetadata: {name: a}\nspec: " + "[" * depth + "]" * depth + "\n")
    code = ("import sys\nfrom pyproxy.sources.file import load_objects, SourceError\n"
            f"try:\n    load_objects({path!r})\nexcept SourceError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Refused by our checks, or by libyaml itself where it was built with its nesting limit
    # (the libyaml in PyYAML's own wheels refuses 1,000 levels; a system libyaml may not).
    assert "refused:" in proc.stdout and any(
        why in proc.stdout for why in ("nested", "took more than", "nesting depth")), proc.stdout


def test_deep_but_legal_nesting_loads(tmp_path: Path):
    """Above the cheap bound: read by the child, all the same."""
    inner = "[" * 900 + "]" * 900
    objs = load_objects(_write(tmp_path, sc.dump(CANARY) + f"---\nkind: ConfigMap\ndata: {inner}\n"))
    assert [o["kind"] for o in objs] == ["Service", "EndpointSlice", "ConfigMap"]


def test_deep_json_is_refused(tmp_path: Path):
    path = _write(tmp_path, "[" * 100_000 + "]" * 100_000, name="f.json")
    with pytest.raises(SourceError, match="nested too deeply"):
        load_objects(path)


def test_alias_bomb_is_refused_quickly(tmp_path: Path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    text = "kind: ConfigMap\nmetadata: {name: bomb}\ndata:\n" + "\n".join("  " + ln for ln in lines) + "\n"
    assert len(text) < 1000
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="expands to more than"):
        load_objects(_write(tmp_path, text))
    assert time.monotonic() - t0 < 5


def test_small_aliases_are_fine(tmp_path: Path):
    text = ("kind: Service\nmetadata: {name: web, namespace: test}\nspec:\n  clusterIP: 10.96.0.1\n"
            "  ports:\n  - &p {name: http, port: 80}\n")
    (obj,) = load_objects(_write(tmp_path, text))
    assert obj["spec"]["ports"][0]["port"] == 80


def test_json_files_are_read_as_json(tmp_path: Path):
    path = _write(tmp_path, json.dumps({"kind": "List", "items": CANARY}), name="f.json")
    _canary_alive(load_objects(path))


def test_deeply_nested_field_of_one_object_skips_only_it(tmp_path: Path):
    deep: object = "x"
    for _ in range(990):
        deep = [deep]
    odd = sc.service("deep", "10.96.0.6", [sc.port(80)])
    odd["metadata"]["annotations"] = {"a": deep}
    b = _canary_alive([*CANARY, odd])
    assert [p.name for p in b.problems] == ["deep"]
