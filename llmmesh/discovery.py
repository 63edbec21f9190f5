"""How a router finds its workers: a :class:`Discovery` yields the current set of endpoints.

A router consumes :meth:`Discovery.watch` for as long as it runs, and reconciles its routing table
with every set it receives: new addresses are dialled, vanished ones are dropped. Implementations:

- :class:`StaticDiscovery`: a fixed list of ``host:port`` addresses (``llm-mesh up``, tests);
- Consul (a later addition behind the same protocol): the healthy instances of a service, watched
  with blocking queries, the last known set kept while Consul is unreachable.

An :class:`Endpoint` is an address plus whatever the discovery source knows about it (Consul's
service metadata: model, engine, capacity); the router still learns the authoritative description
from the worker itself (``Worker.GetInfo``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# A DNS name (labels of letters, digits, hyphens; underscores allowed, as container names use
# them) or a dotted IPv4 address.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port; ValueError if malformed."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    port = int(port_text)
    if not 0 < port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not a TCP port")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    return host, port


@dataclass(frozen=True)
class Endpoint:
    """A worker as a discovery source knows it: where to dial it, and optional metadata."""

    #: ``host:port`` to dial.
    address: str
    #: Metadata from the discovery source (e.g. Consul service meta), as sorted key/value pairs so
    #: that endpoints stay hashable; read it with :attr:`meta`.
    meta_items: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def of(cls, address: str, meta: Mapping[str, str] | None = None) -> Endpoint:
        """An endpoint for ``address`` with metadata ``meta``."""
        return cls(address=address, meta_items=tuple(sorted((meta or {}).items())))

    @property
    def meta(self) -> dict[str, str]:
        """The metadata as a dict."""
        return dict(self.meta_items)


class Discovery(Protocol):
    """A source of worker endpoints."""

    def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        """Yield the current set of endpoints, then a new set every time it changes.

        The iterator may end when the set will never change again (static discovery). Errors of
        the underlying source are handled inside (the last known set stays in force); an
        exception escaping the iterator is a bug, and the caller restarts the watch.
        """
        ...

    async def close(self) -> None:
        """Release the source's resources (connections, sessions)."""
        ...


class StaticDiscovery:
    """A fixed set of worker addresses."""

    def __init__(self, addresses: Iterable[str]) -> None:
        endpoints = []
        for address in addresses:
            parse_address(address)
            endpoints.append(Endpoint.of(address.strip()))
        self.endpoints = frozenset(endpoints)

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        """Yield the fixed set once."""
        yield self.endpoints

    async def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"StaticDiscovery({sorted(e.address for e in self.endpoints)!r})"


__all__ = ["Discovery", "Endpoint", "StaticDiscovery", "parse_address"]
