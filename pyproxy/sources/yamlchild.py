"""Read risky YAML in a child process: ``python -m pyproxy.sources.yamlchild MEMORY_BYTES``.

stdin: the file's bytes (UTF-8, checked by the parent). stdout: its documents as one JSON list.
Exit 2 with the reason on stderr's last line when the file is not valid YAML or is too big once
its aliases are expanded; a crash (libyaml's recursion on absurd nesting) or the parent's time
limit are the parent's to report. See :mod:`pyproxy.sources.file` for why this runs apart.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import yaml

MAX_VALUES = 5_000_000
"""Values a file may expand to, or half its size in bytes if more (a plain file expands 1:1)."""


def expanded_size(doc: Any, limit: int) -> int:
    """How many values ``doc`` holds once YAML aliases are expanded, without expanding them:
    a collection shared through aliases is counted once and its size reused (iteratively, so
    deep nesting cannot overflow Python's stack). Stops counting past ``limit``."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(doc, False)]
    while stack:
        node, done = stack.pop()
        kids = [c for pair in node.items() for c in pair] if isinstance(node, dict) else node
        if done:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 1) for c in kids), limit + 1)
        elif id(node) not in sizes:
            stack.append((node, True))
            stack.extend((c, False) for c in kids if isinstance(c, (dict, list)) and id(c) not in sizes)
    return sizes.get(id(doc), 1)


def main() -> int:
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = sys.stdin.buffer.read()
    most = max(MAX_VALUES, len(data) // 2)
    try:
        docs = list(yaml.load_all(data.decode("utf-8"), Loader=loader))
        if expanded_size(docs, most) > most:
            print(f"expands to more than {most:,} values (YAML aliases); write the objects out "
                  "without anchors (&) and aliases (*)", file=sys.stderr)
            return 2
        # Expands the aliases that remain; dates and the like become strings.
        out = json.dumps(docs, default=str, separators=(",", ":"))
    except yaml.YAMLError as err:
        print(f"is not valid YAML ({' '.join(str(err).split())}); fix the file and try again",
              file=sys.stderr)
        return 2
    except MemoryError:
        print(f"expands to more than {limit >> 20} MB once read (YAML aliases?); write the "
              "objects out without anchors (&) and aliases (*)", file=sys.stderr)
        return 2
    except RecursionError:
        print("is nested too deeply; a Kubernetes object nests about 10 levels: fix the file",
              file=sys.stderr)
        return 2
    except (TypeError, ValueError) as err:
        print(f"holds something that is not JSON-like ({err}); fix the file", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
