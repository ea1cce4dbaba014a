"""Outbound HTTP to URLs that clients give (LoRA sources, training images, webhooks).

A client's URL must not reach what the server can reach and the client cannot: the cloud's
metadata service (169.254.169.254), the cluster's own services on loopback or private
addresses, ports other than the web's. So every hop of a fetch, redirects included (followed
here by hand, at most MAX_REDIRECTS), is checked: scheme, host allowlist, port, and every
address the host name resolves to. The connection then goes to the address that was checked,
with the name in the Host header and TLS's SNI (and certificate check), so a second DNS answer
(DNS rebinding) cannot move it elsewhere. Proxy settings from the environment are not used:
a proxy would connect to the name itself.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

import certifi
import httpx
from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator

from deployments.errors import InvalidRequest, TooLarge

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HTTP_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
CHUNK_BYTES = 1024 * 1024
# NAT64's well-known prefix: its last 32 bits are the IPv4 address the packet reaches.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
# (host, port) -> the addresses the host resolves to; tests pass their own.
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system's resolver, in its order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressRules(BaseModel):
    """Which addresses and ports an outbound connection may reach."""

    model_config = ConfigDict(extra="forbid")

    allowed_ports: list[Annotated[int, Field(ge=1, le=65535)]] | Literal["any"] = Field(
        default_factory=lambda: [80, 443],
        max_length=64,
        description='Ports an http(s) URL may name ("any": every port); a URL without one '
        "uses its scheme's (80, 443).",
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Also connect to loopback, private, link-local (169.254.169.254, the cloud "
        "metadata service), shared and reserved addresses. For a test or a closed network: "
        "allowed_networks is the narrow way.",
    )
    allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        max_length=256,
        description='Networks allowed although not public, e.g. ["10.1.2.0/24"] for an '
        "internal file server.",
    )


class UrlRules(AddressRules):
    """AddressRules plus which schemes and host names a URL may name."""

    allowed_hosts: list[str] | None = Field(
        default=None, max_length=256, description="Exact host names; None: any name."
    )
    allowed_schemes: list[str] = Field(
        default_factory=lambda: ["https", "http"], min_length=1, max_length=16
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_hosts(cls, hosts: list[str] | None) -> list[str] | None:
        return None if hosts is None else [host.lower() for host in hosts]


def refused_address(address: IpAddress, rules: AddressRules) -> str | None:
    """Why `address` may not be reached under `rules` (e.g. 'a loopback address'), or None.
    An IPv6 address that carries an IPv4 one (IPv4-mapped, 6to4, NAT64) is judged by that."""
    address = _effective(address)
    if any(address in network for network in rules.allowed_networks):
        return None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if rules.allow_private_addresses or address.is_global:
        return None
    for kind in ("loopback", "link_local", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return "not a public address"


def _effective(address: IpAddress) -> IpAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def check_url(url: str, rules: UrlRules, field: str) -> SplitResult:
    """The URL's parts; InvalidRequest naming `field` and the reason unless `rules` allow its
    scheme, host, port and (for an IP literal) address. Names are resolved only to connect."""
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidRequest(f"{field}: not a valid URL (spaces or non-ASCII characters)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidRequest(f"{field}: not a valid URL ({e})") from e
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in rules.allowed_schemes:
        raise InvalidRequest(
            f"{field}: scheme {scheme or '(none)'!r} is not allowed "
            f"(allowed: {', '.join(rules.allowed_schemes)})"
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest(f"{field}: credentials in the URL are not accepted")
    if rules.allowed_hosts is not None and host not in rules.allowed_hosts:
        raise InvalidRequest(f"{field}: host {host or '(none)'!r} is not allowed")
    if scheme not in HTTP_SCHEMES:
        return parts  # fsspec protocols: their own clients connect, named by host only
    if not host:
        raise InvalidRequest(f"{field}: the URL names no host")
    if port is not None and rules.allowed_ports != "any" and port not in rules.allowed_ports:
        allowed = ", ".join(str(p) for p in rules.allowed_ports)
        raise InvalidRequest(f"{field}: port {port} is not allowed (allowed_ports: {allowed})")
    literal = _ip_literal(host)
    if literal is not None:
        _check_address(host, literal, rules, field, resolved=False)
    return parts


def _ip_literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_address(
    host: str, address: IpAddress, rules: AddressRules, field: str, resolved: bool
) -> None:
    reason = refused_address(address, rules)
    if reason is None:
        return
    named = f"host {host!r} resolves to {address}, " if resolved else f"{host} is "
    raise InvalidRequest(
        f"{field}: {named}{reason}, which is not allowed (allow_private_addresses, "
        "allowed_networks)"
    )


def vetted_address(parts: SplitResult, rules: UrlRules, field: str, resolver: Resolver) -> str:
    """The address to connect to for a checked http(s) URL: its IP literal, or the first
    address its host resolves to once every one of them is allowed."""
    host = parts.hostname or ""
    literal = _ip_literal(host)
    if literal is not None:
        return str(literal)
    port = parts.port or DEFAULT_PORTS[parts.scheme.lower()]
    try:
        found = resolver(host, port)
    except (OSError, UnicodeError) as e:
        raise httpx.ConnectError(f"cannot resolve host {host!r} ({e})") from e
    if not found:
        raise httpx.ConnectError(f"cannot resolve host {host!r} (no address)")
    addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
    for address in addresses:
        _check_address(host, address, rules, field, resolved=True)
    return str(addresses[0])


@contextmanager
def open_http(
    url: str,
    rules: UrlRules,
    field: str,
    timeout_s: float,
    resolver: Resolver = system_resolver,
    *,
    method: str = "GET",
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> Iterator[httpx.Response]:
    """Send the request and yield the first response that is not a redirect, its body unread.
    Each hop is checked as the module says and gets the same method, body and headers (a
    webhook would pass method="POST" and max_redirects=0). Refusals are InvalidRequest naming
    `field`; network failures and more than `max_redirects` redirects are httpx.HTTPError."""
    with httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        verify=_tls_context(),
    ) as client:
        current, hop_field = url, field
        for _hop in range(max_redirects + 1):
            try:
                parts = check_url(current, rules, hop_field)
                if parts.scheme.lower() not in HTTP_SCHEMES:
                    raise InvalidRequest(f"{hop_field}: to a {parts.scheme} URL is not followed")
                address = vetted_address(parts, rules, hop_field, resolver)
            except InvalidRequest as e:
                if hop_field == field:
                    raise
                raise InvalidRequest(f"{field}: refused {e.message}") from e
            request = _request(client, httpx.URL(current), address, method, content, headers)
            with _send(client, request) as response:
                if not response.is_redirect:
                    yield response
                    return
                location = response.headers["location"]
            current, hop_field = str(httpx.URL(current).join(location)), "redirect"
    raise httpx.TooManyRedirects(f"{field}: more than {max_redirects} redirects")


def _tls_context() -> ssl.SSLContext:
    """Certificates checked against certifi's bundle, or SSL_CERT_FILE when set (as httpx does
    with trust_env, which is off here so that no proxy setting applies)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


def _request(
    client: httpx.Client,
    url: httpx.URL,
    address: str,
    method: str,
    content: bytes | None,
    headers: dict[str, str] | None,
) -> httpx.Request:
    """A request for `url` sent to `address`: the TCP connection goes there, the Host header
    and (https) the TLS server name and certificate check use the URL's host."""
    extensions = {}
    if url.scheme == "https" and _ip_literal(url.host) is None:
        extensions["sni_hostname"] = url.host
    return client.build_request(
        method,
        url.copy_with(host=address),
        content=content,
        headers={**(headers or {}), "Host": url.netloc.decode("ascii")},
        extensions=extensions,
    )


@contextmanager
def _send(client: httpx.Client, request: httpx.Request) -> Iterator[httpx.Response]:
    response = client.send(request, stream=True)
    try:
        yield response
    finally:
        response.close()


def fetch_bytes(
    url: str,
    rules: UrlRules,
    field: str,
    max_bytes: int,
    timeout_s: float,
    resolver: Resolver = system_resolver,
) -> bytes:
    """The whole body of a successful GET, refused as TooLarge once over `max_bytes`;
    httpx.HTTPStatusError for a status that is not 2xx."""
    with open_http(url, rules, field, timeout_s, resolver) as response:
        response.raise_for_status()
        body = bytearray()
        for chunk in response.iter_bytes(CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise TooLarge(f"{field}: more than {max_bytes} bytes")
        return bytes(body)
