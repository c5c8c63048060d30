#!/usr/bin/env bash
# The test command (README, and exactly what .ci/run runs): install, then unit tests (no root)
# and netns tests (root: real rules in fresh namespaces, real packets), then check that no
# test namespace survived.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
set +e
python3 -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
if command -v ip >/dev/null && ip netns list 2>/dev/null | grep -q '^pxt'; then
  echo "test.sh: test namespaces left behind:" >&2
  ip netns list | grep '^pxt' >&2
  exit 1
fi
exit "$rc"
