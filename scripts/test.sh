#!/usr/bin/env bash
# The test command (README, and exactly what .ci/run runs): install, then unit tests (no root),
# netns tests (root: real rules in fresh namespaces, real packets) and e2e tests (root: a real
# cluster in namespaces, with real kubelets and containerd; pyproxy's image under a real
# containerd), then check that no test namespace, kubelet or containerd process, mount or cgroup
# survived.
#
# Every tier must run: a netns or e2e test that cannot (no root, a missing tool) fails the run
# instead of being skipped. `bash scripts/test.sh --unit` runs the unit tier alone, on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
# The product's and the lab's types, strictly (pyproject.toml [tool.mypy]); a type error fails the run, after
# the tests have run, so one run shows both.
typecheck() {
  if python3 -m mypy; then return 0; fi
  echo "test.sh: mypy found type errors in pyproxy/ or lab/ (above); fix them" >&2
  return 1
}
if [ "${1:-}" = "--unit" ]; then
  shift
  python3 -m pip install -q --disable-pip-version-check -e '.[test]' >/dev/null
  types=0; typecheck || types=1
  python3 -m pytest -q tests/unit "$@"
  exit "$types"
fi
bash scripts/setup.sh
types=0; typecheck || types=1
export PYPROXY_ALL_TIERS=1
before=$(ip netns list 2>/dev/null | awk '{print $1}' | sort || true)
# Real nodes' containers get cgroups under k8s.io (any containerd's default); compare, not forbid.
cg_before=$(ls -d /sys/fs/cgroup/*/k8s.io/* 2>/dev/null | sort || true)
set +e
python3 -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
after=$(ip netns list 2>/dev/null | awk '{print $1}' | sort || true)
left=$(comm -13 <(echo "$before") <(echo "$after") | grep -E '^px(t|l|ctr-)' || true)
if [ -n "$left" ]; then
  echo "test.sh: test namespaces left behind: $left" >&2
  exit 1
fi
# The image tests run a containerd of their own, and the real-node lab a containerd and a kubelet
# per node: no daemon, shim, container, mount, cgroup or node directory of theirs may survive.
stray=$( (pgrep -af 'containerd.*pxctr-|/var/lib/pyproxy-lab/' || true;
          grep -E ' /tmp/pxctr-| /var/lib/pyproxy-lab/' /proc/self/mounts || true;
          ls -d /sys/fs/cgroup/*/pyproxy-e2e /var/lib/pyproxy-lab/* 2>/dev/null || true;
          comm -13 <(echo "$cg_before") <(ls -d /sys/fs/cgroup/*/k8s.io/* 2>/dev/null | sort || true)) |
        grep -v pgrep | grep . || true)
if [ -n "$stray" ]; then
  echo "test.sh: left behind by the container tests: $stray" >&2
  exit 1
fi
if [ "$rc" -eq 0 ] && [ "$types" -ne 0 ]; then
  exit 1
fi
exit "$rc"
