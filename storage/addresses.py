"""Which hosts an image fetch may connect to: public addresses only, unless allowed by exact HOST:PORT.

The urls of CC3M and SBU name millions of hosts nobody vets, and any of them may redirect. A fetch
must not become a request to this machine or its network (server-side request forgery): loopback,
private, link-local, shared (carrier-grade NAT), multicast, reserved and unspecified addresses are
refused. The check is on the address the host name *resolves to*, so every spelling of one address
is caught (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``, a DNS name pointing
home), and the connection is made to the checked address itself (no second lookup to rebind). The
download's connections run through :func:`connect`, so every redirect's target is checked too.

Metadata downloads (:mod:`storage.metadata`) fetch the urls a user names (configs/sources.yaml,
``--metadata``), whatever their address; where such a host redirects is checked with
:func:`refused_target` (the url's own host and port, the allow-list and public addresses pass).

The allow-list is exact ``HOST:PORT`` pairs (IPv6 as ``[::1]:PORT``), never a range: from
``ccrk acquire --allow-address`` (repeatable, the ``allow_addresses`` setting) and the environment
variable :data:`ALLOW_ENV` (comma-separated). A pair allows a connection when its host is the url's
host as written or the address it resolved to, and its port is the connection's. The demo and the
tests allow their loopback server's one pair this way.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Iterable
from urllib.parse import urlsplit

from storage.errors import CCRKError

ALLOW_ENV = "CCRK_ALLOW_ADDRESSES"
# The error message of a refused connection or redirect (storage.download classifies it blocked_address).
BLOCKED_ADDRESS = "blocked address"

Allowed = frozenset  # of (host, port): host lower-case, an IP literal in its canonical form


class BlockedAddress(OSError):
    """A connection this module refused; its message starts with :data:`BLOCKED_ADDRESS`."""


def _canonical_host(host: str) -> str:
    host = host.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.rstrip(".")


def parse_pair(text: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) -> (host, port); a malformed pair is one line naming ``where``."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or (":" in host and not
                                                                                  host.startswith("[")):
        raise CCRKError(f"{where}: {text!r} is not HOST:PORT (an exact pair, IPv6 as [::1]:PORT; no ranges)")
    return _canonical_host(host), int(port)


def allowed(pairs: Iterable[str] | None = None) -> Allowed:
    """The allow-list: ``pairs`` (the setting) and those of :data:`ALLOW_ENV`."""
    out = {parse_pair(p, "allow_addresses") for p in pairs or ()}
    out |= {parse_pair(p, ALLOW_ENV) for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()}
    return frozenset(out)


def refusal(ip: str) -> str | None:
    """Why ``ip`` may not be fetched from (``loopback``, ``private``, ...), or None: a public address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d
        addr = addr.ipv4_mapped
    # Most specific first: Python counts loopback, link-local, unspecified and reserved as private too.
    for name in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(addr, f"is_{name}"):
            return name.replace("_", "-")
    if not addr.is_global:  # e.g. 100.64.0.0/10 (shared), 192.0.0.0/24, documentation ranges
        return "not global"
    return None


def connect(address: tuple[str, int], timeout, source_address, allow: Allowed) -> socket.socket:
    """``socket.create_connection`` to ``address`` (host, port), only to an address it may reach:
    each address the host resolves to is tried in turn, refused ones skipped; none left is
    :class:`BlockedAddress` naming the host, the address and why."""
    host, port = address
    name = _canonical_host(host)
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    last_error: OSError | None = None
    refused = []
    for family, kind, proto, _, sockaddr in infos:
        ip = _canonical_host(sockaddr[0])
        why = refusal(ip)
        if why is not None and (name, port) not in allow and (ip, port) not in allow:
            refused.append(f"{ip} ({why})")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last_error = err
    if last_error is not None:
        raise last_error
    shown = f"[{host}]" if ":" in host else host
    raise BlockedAddress(f"{BLOCKED_ADDRESS}: {shown}:{port} is {', '.join(refused)}; allow this exact pair "
                         f"with --allow-address HOST:PORT or {ALLOW_ENV}")


def refused_scheme(url: str) -> str | None:
    """Why ``url`` is not fetched for its scheme (only http(s) is), or None."""
    scheme = urlsplit(url).scheme.lower()
    return None if scheme in ("http", "https") else f"a {scheme or 'schemeless'} url (http(s) only)"


def url_pair(url: str) -> tuple[str, int]:
    """The (host, port) an http(s) ``url`` connects to, as the allow-list holds pairs (ValueError: a
    malformed port)."""
    parts = urlsplit(url)
    return _canonical_host(parts.hostname or ""), parts.port or (443 if parts.scheme.lower() == "https" else 80)


def refused_target(url: str, allow: Allowed) -> str | None:
    """Why a request to ``url`` would be refused (a scheme other than http(s), or an address as
    :func:`connect` refuses it), or None. A host that does not resolve is not refused here: the
    request fails on its own."""
    why = refused_scheme(url)
    if why is not None:
        return why
    try:
        host, port = url_pair(url)
    except ValueError:
        return "a malformed url"
    if (host, port) in allow:
        return None
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError:
        return None
    for *_, sockaddr in infos:
        ip = _canonical_host(sockaddr[0])
        why = refusal(ip)
        if why is not None and (ip, port) not in allow:
            return f"{ip} ({why})"
    return None
