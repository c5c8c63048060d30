"""The chart installs into the real API server and grants pyproxy exactly what it needs."""

from __future__ import annotations

import pytest

from lab.cluster import REPO, ClusterLab

AS = "--as=system:serviceaccount:kube-system:pyproxy"

ALLOWED = [
    ("list", "services"), ("watch", "services"),
    ("list", "endpointslices.discovery.k8s.io"), ("watch", "endpointslices.discovery.k8s.io"),
    ("list", "nodes"), ("watch", "nodes"),
]
DENIED = [
    ("get", "services"), ("update", "services"), ("patch", "services"), ("delete", "services"),
    ("create", "endpointslices.discovery.k8s.io"), ("patch", "nodes"), ("update", "nodes/status"),
    ("get", "secrets"), ("list", "secrets"), ("list", "pods"), ("delete", "events"), ("list", "configmaps"),
    # pyproxy writes no Events: it used to be granted create/patch on them.
    ("create", "events"), ("patch", "events"), ("create", "events.events.k8s.io"),
]


def test_chart_lints(lab: ClusterLab):
    proc = lab.helm("lint", str(REPO / "charts" / "pyproxy"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("verb", "resource"), ALLOWED)
def test_service_account_can(lab: ClusterLab, verb: str, resource: str):
    out = lab.kubectl("auth", "can-i", verb, resource, AS, "-A", check=False).stdout.strip()
    assert out == "yes", (verb, resource, out)


@pytest.mark.parametrize(("verb", "resource"), DENIED)
def test_service_account_cannot(lab: ClusterLab, verb: str, resource: str):
    out = lab.kubectl("auth", "can-i", verb, resource, AS, "-A", check=False).stdout.strip()
    assert out == "no", (verb, resource, out)


def test_chart_objects_are_in_the_api(lab: ClusterLab):
    ds = lab.kubectl("get", "daemonset", "pyproxy", "-n", "kube-system", "-o", "json").stdout
    assert '"hostNetwork": true' in ds
    assert '"NET_ADMIN"' in ds and '"privileged": false' in ds
    assert '"allowPrivilegeEscalation": false' in ds and '"readOnlyRootFilesystem": true' in ds
    assert '"RuntimeDefault"' in ds and '"ALL"' in ds
    assert '"NET_RAW"' not in ds  # the default nftables mode does not need it
    assert "lib-modules" not in ds
    assert '"system-node-critical"' in ds
    assert lab.kubectl("get", "configmap", "pyproxy-config", "-n", "kube-system").returncode == 0


def test_manifests_are_rendered_from_the_chart(lab: ClusterLab, tmp_path):
    import subprocess

    committed = (REPO / "manifests" / "pyproxy.yaml").read_text()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "render-manifests.sh"), lab.bin("helm")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (REPO / "manifests" / "pyproxy.yaml").read_text() == committed, \
            "manifests/pyproxy.yaml is stale: run scripts/render-manifests.sh and commit it"
    finally:
        (REPO / "manifests" / "pyproxy.yaml").write_text(committed)
    # The API server accepts every object (server-side dry run runs validation and admission).
    text = committed.replace("API_SERVER_HOST", "192.0.2.10")
    out = lab.kubectl("apply", "--dry-run=server", "-f", "-", stdin=text, check=False)
    assert out.returncode == 0, out.stderr
