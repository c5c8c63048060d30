#!/usr/bin/env bash
# Mutation testing of the core (pyproxy/model, pyproxy/render, pyproxy/sources) against the unit
# tests, with mutmut. Runs in a copy of the tree and a venv of its own: the editable install of
# pyproxy would otherwise shadow mutmut's mutated copy. Takes about 45 minutes on 2 cores.
#   bash scripts/mutation.sh            # prints mutmut's summary; results in $WORK/mutants
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${MUTATION_WORK:-/tmp/pyproxy-mutation}
VENV=${MUTATION_VENV:-/tmp/pyproxy-mutation-venv}
rm -rf "$WORK" && mkdir -p "$WORK"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$WORK"
[ -x "$VENV/bin/mutmut" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q \
  "PyYAML>=6.0" "pyroute2==0.9.7" "prometheus-client>=0.20" "aiohttp>=3.12" "kubernetes_asyncio>=30" \
  pytest import-linter "cryptography>=41" "mutmut==3.8.1"; }
cat >> "$WORK/pyproject.toml" <<'TOML'

[tool.mutmut]
source_paths = ["pyproxy/"]
only_mutate = ["pyproxy/model/*", "pyproxy/render/*", "pyproxy/sources/*"]
pytest_add_cli_args_test_selection = ["tests/unit/"]
also_copy = ["examples/", "README.md", "e2e/"]
TOML
cd "$WORK"
"$VENV/bin/mutmut" run --max-children 2 | tr '\r' '\n' | tail -3
"$VENV/bin/mutmut" results | awk '{print $NF}' | sort | uniq -c
