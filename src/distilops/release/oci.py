"""Asking an image registry (the OCI distribution API) which digest a tag names: what `distilops deploy`
pins, so pods pull exactly the image that was pushed, and a tag that was never pushed is refused before
a cluster tries to pull it.

    HEAD /v2/<repository>/manifests/<tag>  ->  200 with Docker-Content-Digest, or 404

Registries that want a token (Docker Hub, GHCR, most cloud registries) answer 401 with a Bearer
challenge; the token is fetched from the realm it names, anonymously or with
DISTILOPS_REGISTRY_USERNAME / DISTILOPS_REGISTRY_PASSWORD (basic auth to the token service).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request

from distilops import settings
from distilops.errors import DeployError

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])
TIMEOUT_S = 15


def split_reference(ref: str) -> tuple[str, str, str]:
    """`host[:port]/path/name:tag` -> (host, repository path, tag)."""
    name, _, tag = ref.rpartition(":")
    host, _, repository = name.partition("/")
    if not (name and tag and repository and "/" not in tag):
        raise DeployError(f"'{ref}' is not an image reference of the form HOST[:PORT]/PATH/NAME:TAG")
    return host, repository, tag


def _basic_auth() -> dict[str, str]:
    user, password = settings.REGISTRY_USERNAME.read(), settings.REGISTRY_PASSWORD.read()
    if not (user and password):
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _token(challenge: str, repository: str) -> str:
    """A bearer token from the realm a 401's WWW-Authenticate names (the Docker token protocol)."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not challenge.lower().startswith("bearer") or "realm" not in fields:
        raise DeployError(f"the registry wants authentication this client does not speak: {challenge!r}")
    query = {"service": fields.get("service", ""), "scope": fields.get("scope", f"repository:{repository}:pull")}
    request = urllib.request.Request(f"{fields['realm']}?{urllib.parse.urlencode(query)}", headers=_basic_auth())
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
        body = json.loads(reply.read())
    return body.get("token") or body["access_token"]


def manifest_digest(ref: str, *, tls_verify: bool = True) -> str | None:
    """The digest the registry holds for `ref`'s tag, or None when it holds no such tag. `tls_verify` False
    speaks plain HTTP (a registry on 127.0.0.1, as `podman push --tls-verify=false` does)."""
    host, repository, tag = split_reference(ref)
    url = f"{'https' if tls_verify else 'http'}://{host}/v2/{repository}/manifests/{tag}"
    headers = {"Accept": MANIFEST_TYPES}
    for _ in range(2):  # once anonymously, once more with a token if the registry asks for one
        request = urllib.request.Request(url, method="HEAD", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
                digest = reply.headers.get("Docker-Content-Digest")
                if not digest:
                    raise DeployError(f"{host} answered for {ref} without a Docker-Content-Digest header")
                return digest
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code == 401 and "Authorization" not in headers:
                headers["Authorization"] = f"Bearer {_token(exc.headers.get('WWW-Authenticate', ''), repository)}"
                continue
            raise DeployError(f"{host} refused the manifest of {ref}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DeployError(f"cannot reach the image registry {host} ({url}): {getattr(exc, 'reason', exc)}. "
                              "A registry on plain HTTP needs --no-tls-verify") from None
    raise DeployError(f"{host} refused the manifest of {ref} even with a token: check the credentials")
