"""Postfix endpoint syntax: ``inet:HOST:PORT``, ``inet:[IPV6]:PORT``, ``unix:PATH``.

The same syntax names bridge listeners, memcache servers (memcache_table(5)
``memcache =``) and chained lookup servers. ``local:PATH`` is Postfix's
synonym for ``unix:PATH``. A bare ``HOST:PORT`` (as in ``tcp:HOST:PORT``)
is accepted by :func:`parse_host_port`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


class EndpointError(ValueError):
    """The text is not a valid endpoint; the message says why."""


@dataclass(frozen=True, slots=True)
class InetEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixEndpoint:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Endpoint = InetEndpoint | UnixEndpoint


def parse_host_port(text: str) -> InetEndpoint:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``.

    Args:
      text: the address, without any ``inet:`` prefix.

    Returns:
      The endpoint. The port may be a number or a service name from
      /etc/services (as Postfix allows).

    Raises:
      EndpointError: if the host or port is missing or invalid.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise EndpointError(f"bad IPv6 address syntax in {text!r}: expected [ADDR]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise EndpointError(f"missing ':PORT' in {text!r}")
        if ":" in host:
            raise EndpointError(f"IPv6 address must be written as [ADDR]:PORT in {text!r}")
    if not host:
        raise EndpointError(f"missing host in {text!r}")
    return InetEndpoint(host, _parse_port(port_text, text))


def _parse_port(port_text: str, whole: str) -> int:
    if port_text.isdigit():
        port = int(port_text)
    elif port_text:
        try:
            port = socket.getservbyname(port_text, "tcp")
        except OSError:
            raise EndpointError(f"unknown service name {port_text!r} in {whole!r}") from None
    else:
        raise EndpointError(f"missing port in {whole!r}")
    if not 0 < port < 65536:
        raise EndpointError(f"port out of range in {whole!r}")
    return port


def parse_endpoint(text: str, *, base_dir: str | None = None) -> Endpoint:
    """Parse a Postfix-style endpoint.

    Args:
      text: ``inet:HOST:PORT``, ``inet:[ADDR]:PORT``, ``unix:PATH`` or ``local:PATH``.
      base_dir: if given, a relative unix socket path is taken relative to it.

    Returns:
      An :class:`InetEndpoint` or :class:`UnixEndpoint`.

    Raises:
      EndpointError: for an unknown transport or bad address.
    """
    transport, sep, rest = text.strip().partition(":")
    if not sep:
        raise EndpointError(f"missing transport in {text!r}: use inet:HOST:PORT or unix:PATH")
    if transport == "inet":
        return parse_host_port(rest)
    if transport in ("unix", "local"):
        if not rest:
            raise EndpointError(f"missing socket path in {text!r}")
        if base_dir is not None and not os.path.isabs(rest):
            rest = os.path.join(base_dir, rest)
        return UnixEndpoint(rest)
    raise EndpointError(f"invalid transport {transport!r} in {text!r}: use inet: or unix:")
