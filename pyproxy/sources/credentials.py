"""Where the API server is and how to log in: a kubeconfig file, or the in-cluster account.

Handles what a DaemonSet and a lab use — bearer tokens (inline or from a file, re-read when it
rotates), client certificates, CA bundles, basic auth — without importing kubernetes_asyncio,
whose import alone costs ~0.4 s and ~25 MB (a third of pyproxy's start-up at 1k services).
Users with an ``exec`` or ``auth-provider`` plugin are handed to kubernetes_asyncio's loader.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SERVICE_TOKEN_FILENAME = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SERVICE_CERT_FILENAME = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

AuthFn = Callable[[], Awaitable[dict[str, str]]]


class CredentialsError(ValueError):
    """The kubeconfig or the in-cluster files are missing or malformed."""


@dataclass
class Credentials:
    host: str
    ssl: ssl.SSLContext | bool
    headers: dict[str, str]
    auth: AuthFn | None = None


def _token_file(path: str) -> AuthFn:
    """Bearer token from a file, re-read whenever it changes (kubelet rotates projected tokens)."""
    cache: dict[str, Any] = {"stamp": None, "token": ""}

    async def auth() -> dict[str, str]:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != cache["stamp"]:
            cache["token"] = Path(path).read_text().strip()
            cache["stamp"] = stamp
        return {"Authorization": f"Bearer {cache['token']}"}

    return auth


def in_cluster() -> Credentials:
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise CredentialsError("KUBERNETES_SERVICE_HOST is not set")
    if not os.path.exists(SERVICE_TOKEN_FILENAME):
        raise CredentialsError(f"{SERVICE_TOKEN_FILENAME} is missing")
    if ":" in host:
        host = f"[{host}]"
    ctx = ssl.create_default_context(cafile=SERVICE_CERT_FILENAME)
    return Credentials(host=f"https://{host}:{port}", ssl=ctx, headers={}, auth=_token_file(SERVICE_TOKEN_FILENAME))


def _named(items: Any, name: str, what: str) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            return item.get(what) or {}
    raise CredentialsError(f"no {what} named {name!r}")


def _data_file(data: str, tmpdir: str, name: str) -> str:
    path = os.path.join(tmpdir, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
        fh.write(base64.b64decode(data))
    return path


def from_kubeconfig(path: str) -> Credentials | None:
    """Credentials from a kubeconfig, or None when its user needs a plugin (exec, auth-provider)."""
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CredentialsError(str(err)) from None
    if not isinstance(cfg, dict):
        raise CredentialsError("not a kubeconfig (expected a mapping)")
    context_name = cfg.get("current-context")
    if not context_name:
        raise CredentialsError("no current-context")
    context = _named(cfg.get("contexts"), context_name, "context")
    cluster = _named(cfg.get("clusters"), context.get("cluster", ""), "cluster")
    user = _named(cfg.get("users"), context.get("user", ""), "user") if context.get("user") else {}
    if "exec" in user or "auth-provider" in user:
        return None
    base = os.path.dirname(os.path.abspath(path))
    server = cluster.get("server")
    if not server:
        raise CredentialsError(f"cluster {context.get('cluster')!r} has no server")
    ctx: ssl.SSLContext | bool = False
    if server.startswith("https"):
        if cluster.get("certificate-authority-data"):
            ctx = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            ctx = ssl.create_default_context(cafile=os.path.join(base, cluster["certificate-authority"]))
        else:
            ctx = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cluster.get("tls-server-name"):
            ctx.check_hostname = False  # verified against the CA; the name differs from the address
        cert = user.get("client-certificate")
        key = user.get("client-key")
        # ssl reads a client certificate only from files. Inline data goes to a private
        # directory that lives only as long as load_cert_chain reads it: one left per load
        # piled up in /tmp (thousands on a test machine), with the private key in each.
        with tempfile.TemporaryDirectory(prefix="pyproxy-kubeconfig-") as tmpdir:
            if user.get("client-certificate-data"):
                cert = _data_file(user["client-certificate-data"], tmpdir, "client.crt")
            if user.get("client-key-data"):
                key = _data_file(user["client-key-data"], tmpdir, "client.key")
            if cert:
                ctx.load_cert_chain(os.path.join(base, cert), os.path.join(base, key) if key else None)
    headers: dict[str, str] = {}
    auth = None
    if user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    elif user.get("tokenFile"):
        auth = _token_file(os.path.join(base, user["tokenFile"]))
    elif user.get("username"):
        pair = f"{user['username']}:{user.get('password', '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    return Credentials(host=server, ssl=ctx, headers=headers, auth=auth)
