"""Kubeconfig and in-cluster credential loading without kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl

import pytest

from pyproxy.sources import credentials
from pyproxy.sources.credentials import CredentialsError, from_kubeconfig, in_cluster


def _write(tmp_path, user, cluster=None):
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
           "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
           "clusters": [{"name": "k", "cluster": cluster or {"server": "http://127.0.0.1:1"}}],
           "users": [{"name": "u", "user": user}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_inline_token(tmp_path):
    creds = from_kubeconfig(_write(tmp_path, {"token": "abc"}))
    assert creds.host == "http://127.0.0.1:1" and creds.ssl is False
    assert creds.headers == {"Authorization": "Bearer abc"}


def test_token_file_is_reread_when_it_rotates(tmp_path):
    token = tmp_path / "tok"
    token.write_text("one\n")
    creds = from_kubeconfig(_write(tmp_path, {"tokenFile": "tok"}))  # relative to the kubeconfig
    assert asyncio.run(creds.auth()) == {"Authorization": "Bearer one"}
    token.write_text("two-rotated\n")
    assert asyncio.run(creds.auth()) == {"Authorization": "Bearer two-rotated"}


def test_basic_auth(tmp_path):
    creds = from_kubeconfig(_write(tmp_path, {"username": "a", "password": "b"}))
    assert creds.headers["Authorization"] == "Basic " + base64.b64encode(b"a:b").decode()


def test_https_with_insecure_skip_verify(tmp_path):
    creds = from_kubeconfig(_write(tmp_path, {"token": "t"},
                                   {"server": "https://127.0.0.1:6443", "insecure-skip-tls-verify": True}))
    assert isinstance(creds.ssl, ssl.SSLContext) and creds.ssl.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize("plugin", [{"exec": {"command": "x"}}, {"auth-provider": {"name": "gcp"}}])
def test_plugins_are_left_to_kubernetes_asyncio(tmp_path, plugin):
    assert from_kubeconfig(_write(tmp_path, plugin)) is None


def test_bad_kubeconfigs_say_what_is_wrong(tmp_path):
    with pytest.raises(CredentialsError, match="current-context"):
        p = tmp_path / "k"
        p.write_text("apiVersion: v1\nkind: Config\n")
        from_kubeconfig(str(p))
    with pytest.raises(CredentialsError):
        from_kubeconfig(str(tmp_path / "missing"))
    with pytest.raises(CredentialsError, match="no server"):
        from_kubeconfig(_write(tmp_path, {"token": "t"}, {"insecure-skip-tls-verify": True}))


def test_in_cluster_needs_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(CredentialsError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setattr(credentials, "SERVICE_TOKEN_FILENAME", str(tmp_path / "nope"))
    with pytest.raises(CredentialsError, match="nope"):
        in_cluster()


def test_client_key_data_is_written_privately(tmp_path):
    path = credentials._data_file(base64.b64encode(b"secret").decode(), str(tmp_path), "k")
    assert open(path, "rb").read() == b"secret"
    assert os.stat(path).st_mode & 0o077 == 0


def test_inline_client_certificate_leaves_no_file_behind(tmp_path, monkeypatch):
    """The certificate and key data are written for ssl to read, then removed at once: one
    directory per load (with the private key in it) used to pile up in /tmp."""
    import subprocess
    import tempfile

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(tmp_path / "c.pem"), "-days", "1", "-subj", "/CN=u"], check=True, capture_output=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    b64 = lambda name: base64.b64encode((tmp_path / name).read_bytes()).decode()  # noqa: E731
    creds = from_kubeconfig(_write(tmp_path, {"client-certificate-data": b64("c.pem"), "client-key-data": b64("k.pem")},
                                   cluster={"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}))
    assert isinstance(creds.ssl, ssl.SSLContext)
    assert list(scratch.iterdir()) == []
