"""What a manifest may make the system fetch: which URIs subject images and LoRA files may come from.

Manifests are untrusted input: a row naming ``http://169.254.169.254/latest/meta-data/`` as a subject image would
make the workers fetch the cloud metadata service (and a report could show what came back). The default policy
allows local paths and object stores only; ``http(s)`` needs ``--allow-http``, and even then never a loopback,
link-local, private or otherwise reserved address unless ``--allow-private-urls`` (the host is resolved and every
address it resolves to is checked; a resolver that answers differently later, DNS rebinding, is not defended
against). Relation LoRA files must lie inside their registry unless ``--allow-external-loras``.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
LOCAL = ("", "file", "local")
WEB = ("http", "https")


@dataclass(frozen=True)
class AccessPolicy:
    """Where subject images and LoRA files may come from (plain data: it travels to Ray workers)."""

    allow_http: bool = False
    allow_private_urls: bool = False
    allow_external_loras: bool = False

    def reason(self, uri: str, what: str = "subject image") -> Optional[str]:
        """Why ``uri`` may not be fetched (one line naming it and the option that would allow it), or None."""
        scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
        if scheme in LOCAL or scheme in OBJECT_STORES:
            return None
        if scheme not in WEB:
            return (f"{what} {uri!r}: scheme {scheme + '://'!r} is not allowed (local paths, "
                    f"{', '.join(s + '://' for s in OBJECT_STORES)} and, with --allow-http, http(s)://)")
        if not self.allow_http:
            return f"{what} {uri!r}: http(s) URLs are fetched only with --allow-http"
        if self.allow_private_urls:
            return None
        host = urlsplit(uri).hostname or ""
        bad = private_address(host)
        if bad:
            return (f"{what} {uri!r}: host {host!r} is {bad}; such addresses are fetched only with "
                    f"--allow-private-urls")
        return None


def private_address(host: str) -> Optional[str]:
    """How ``host`` (a name or an IP literal) is not a public internet address ("a loopback address 127.0.0.1"),
    or None when every address it resolves to is public. A name that does not resolve counts as not public."""
    try:
        addresses = {ipaddress.ip_address(host.strip("[]"))}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(host, None)}
        except (OSError, UnicodeError, ValueError):
            return "a host name that does not resolve"
    for address in sorted(addresses, key=str):
        for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
            if getattr(address, f"is_{kind}"):
                return f"a {kind.replace('_', '-')} address ({address})"
    return None


def inside(uri: str, root: str) -> bool:
    """True when ``uri`` lies under the folder ``root`` (both normalized: no escape with ``..``)."""

    def norm(u: str) -> str:
        scheme, _, rest = u.rpartition("://")
        path = posixpath.normpath(rest) if scheme else os.path.abspath(rest)
        return f"{scheme}://{path}" if scheme else path

    root_n = norm(str(root)).rstrip("/")
    return norm(str(uri)).startswith(root_n + "/")
