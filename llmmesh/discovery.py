"""How a router finds its workers: a :class:`Discovery` yields the current set of endpoints.

A router consumes :meth:`Discovery.watch` for as long as it runs, and reconciles its routing table
with every set it receives: new addresses are dialled, vanished ones are dropped. Implementations:

- :class:`StaticDiscovery`: a fixed list of ``host:port`` addresses (``llm-mesh up``, tests);
- :class:`ConsulDiscovery`: the passing instances of a Consul service, watched with blocking
  queries; the last known set stays in force while Consul is unreachable.

A source that can fail also reports how it is doing (:class:`DiscoveryStatus`, through
:class:`ReportsStatus`), for the router's health details and metrics.

An :class:`Endpoint` is an address plus whatever the discovery source knows about it (Consul's
service metadata: model, engine, capacity); the router still learns the authoritative description
from the worker itself (``Worker.GetInfo``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from llmmesh.consul import ConsulError, ConsulTarget, consul_errors, open_client

if TYPE_CHECKING:
    import consul.aio

log = structlog.get_logger(__name__)

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


@dataclass(frozen=True, kw_only=True)
class DiscoveryStatus:
    """How a discovery source is doing, for health details and metrics."""

    #: The kind of source: ``static`` or ``consul``.
    source: str
    #: What it watches, without credentials (Consul: ``<url> service <name>``).
    target: str
    #: Whether its last query succeeded and its answer can be trusted (a static source always
    #: has). Consul answering an empty set under a default-deny ACL policy to a router that sends
    #: no token is not healthy: ``last_error`` names that likely cause.
    healthy: bool
    #: Why its last query failed ("" if it never failed or has recovered since).
    last_error: str = ""
    #: The kind of that failure (``unreachable``, ``timeout``, ``permission_denied``...;
    #: ``acl_default_deny`` for the empty answer above).
    last_error_kind: str = ""
    #: ``time.time()`` of the last successful query (None: none yet).
    last_success: float | None = None
    #: ``time.time()`` when the set last changed (None: no set yet).
    last_change: float | None = None
    #: Failed queries since the last success.
    consecutive_failures: int = 0
    #: Failed queries since the source started.
    errors_total: int = 0
    #: Endpoints in the last known set.
    endpoints: int = 0


@runtime_checkable
class ReportsStatus(Protocol):
    """A discovery source that says how it is doing."""

    def status(self) -> DiscoveryStatus:
        """The current status."""
        ...

    def subscribe(self, listener: Callable[[DiscoveryStatus], None]) -> None:
        """Call ``listener`` with the status after every change of it (every query, for Consul)."""
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

    def status(self) -> DiscoveryStatus:
        """Always healthy: a fixed list cannot fail."""
        return DiscoveryStatus(
            source="static",
            target=",".join(sorted(e.address for e in self.endpoints)),
            healthy=True,
            endpoints=len(self.endpoints),
        )

    def subscribe(self, listener: Callable[[DiscoveryStatus], None]) -> None:
        """Call ``listener`` once with the (never changing) status."""
        listener(self.status())

    def __repr__(self) -> str:
        return f"StaticDiscovery({sorted(e.address for e in self.endpoints)!r})"


# -- Consul -------------------------------------------------------------------------------------


def next_index(previous: int, returned: int) -> int:
    """The index to send with the next blocking query, by Consul's rules: never below 1 (an
    index of 0 would make every query return at once), and an index that went backwards
    restarts the loop (0: the next query does not block, and its answer gives the index)."""
    if returned < 1:
        return 1
    if returned < previous:
        return 0
    return returned


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; :meth:`take` waits for one."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket: rate {rate} and burst {burst} must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    async def take(self) -> None:
        """Take a token, waiting until there is one."""
        while True:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)


def _duration(seconds: float) -> str:
    """A duration as Consul's ``wait`` parameter spells it (``30s``, ``250ms``)."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulDiscovery:
    """The passing instances of a Consul service, watched with blocking queries.

    Each query is ``GET /v1/health/service/<service>?passing=true&index=<last>&wait=<wait>``; it
    returns when the set may have changed or after ``wait``. A set that differs from the last one
    is yielded at once. Indexes follow Consul's rules (:func:`next_index`; after a failure the
    next query starts from 0), and a token bucket (``rate`` a second, ``burst``) keeps the loop
    from spinning whatever Consul answers.

    When Consul is unreachable or fails, nothing new is yielded (the last known set stays in
    force), the failure is logged once and the recovery once, and queries are retried with
    jittered exponential backoff (``backoff_base`` doubling up to ``backoff_max``).
    :meth:`status` says how it is doing; listeners (:meth:`subscribe`) hear after every query.

    Consul's ACLs filter what a token may not read out of an answer instead of refusing it: under
    ``acl.default_policy = deny`` an anonymous read of the health endpoint answers ``200 []``
    (with ``X-Consul-Default-ACL-Policy: deny``). An empty answer with that header to a watch
    without a token makes the status unhealthy with ``last_error`` naming the likely cause, and
    is logged as a warning once (until workers appear).
    """

    def __init__(
        self,
        target: ConsulTarget,
        *,
        service: str | None = None,
        wait: timedelta = timedelta(seconds=30),
        rate: float = 5.0,
        burst: int = 5,
        backoff_base: timedelta = timedelta(milliseconds=100),
        backoff_max: timedelta = timedelta(seconds=5),
        rng: random.Random | None = None,
    ) -> None:
        if wait <= timedelta(0):
            raise ValueError("consul watch wait: must be > 0")
        self.target = target
        self.service = service or target.service
        self._wait = wait.total_seconds()
        self._bucket = TokenBucket(rate, burst)
        self._backoff_base = backoff_base.total_seconds()
        self._backoff_max = backoff_max.total_seconds()
        self._rng = rng or random.Random()
        self._client: consul.aio.Consul | None = None
        self._listeners: list[Callable[[DiscoveryStatus], None]] = []
        self._rejected: set[tuple[str, str]] = set()
        self._status = DiscoveryStatus(
            source="consul", target=f"{target.url} service {self.service}", healthy=False
        )
        self._acl_suspected = False
        self._closed = False

    # -- the Discovery protocol -------------------------------------------------------------

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        """Yield the passing set once Consul first answers, then every changed set."""
        index = 0
        last: frozenset[Endpoint] | None = None
        while True:
            await self._bucket.take()
            try:
                returned, nodes, acl_policy = await self._query(index)
            except ConsulError as exc:
                self._failed(exc, last)
                # Start over with a query that does not block: the agent may have restarted
                # with a lower index, which a blocking query would wait for in vain.
                index = 0
                await asyncio.sleep(self._backoff())
                continue
            index = next_index(index, returned)
            endpoints = self._endpoints(nodes)
            changed = endpoints != last
            self._succeeded(endpoints, changed, self._acl_problem(endpoints, acl_policy))
            if changed:
                last = endpoints
                yield endpoints

    async def close(self) -> None:
        """Close the HTTP session. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- ReportsStatus ----------------------------------------------------------------------

    def status(self) -> DiscoveryStatus:
        """How the watch is doing."""
        return self._status

    def subscribe(self, listener: Callable[[DiscoveryStatus], None]) -> None:
        """Call ``listener`` with the status after every query, successful or not."""
        self._listeners.append(listener)

    # -- one query --------------------------------------------------------------------------

    async def _query(self, index: int) -> tuple[int, list[dict[str, Any]], str]:
        """One (blocking, if ``index``) health query: (X-Consul-Index, entries, the agent's
        X-Consul-Default-ACL-Policy or "")."""
        if self._closed:
            raise RuntimeError("ConsulDiscovery is closed")
        # Consul answers within wait plus up to wait/16 of jitter; past that, something is wrong.
        blocking_limit = self._wait * 17 / 16 + 5.0
        if self._client is None:
            # The session belongs to the running loop: opened on first use, not in __init__.
            # Its own bound (else aiohttp's 5 minutes) must not cut a blocking query short.
            self._client = open_client(self.target, timeout_s=blocking_limit + 5.0)
        limit = blocking_limit if index else 10.0
        import consul.callback

        client = self._client
        headers: dict[str, str] = {}

        def read(response: Any) -> Any:
            # py-consul's health.service() drops the headers; this is its callback plus them.
            headers.update(response.headers)
            return consul.callback.CB.json(index=True)(response)

        params: list[tuple[str, str]] = []
        if index:
            params += [("index", str(index)), ("wait", _duration(self._wait))]
        params.append(("passing", "1"))
        if client.dc:
            params.append(("dc", client.dc))
        with consul_errors(self.target):
            async with asyncio.timeout(limit):
                returned, nodes = await client.http.get(
                    read,
                    f"/v1/health/service/{self.service}",
                    params=params,
                    headers=client.prepare_headers(None),
                )
            entries = [entry for entry in nodes or [] if isinstance(entry, dict)]
            return int(returned), entries, headers.get("X-Consul-Default-ACL-Policy", "")

    def _acl_problem(self, endpoints: frozenset[Endpoint], acl_policy: str) -> str:
        """Why an answer is likely wrong ("" when it is not suspect): an empty set from an agent
        whose ACL default policy is deny, asked without a token."""
        if endpoints or acl_policy.lower() != "deny" or self.target.token:
            return ""
        return (
            f"Consul at {self.target.url} lists no passing instance of {self.service!r}, its ACL "
            "default policy is deny and this router sends no ACL token: the anonymous token "
            "likely may not read the service, and Consul filters it out. Give the router a token "
            f"with service:read on {self.service!r} and node:read (--consul-token, "
            "LLMMESH_CONSUL_TOKEN, CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE)"
        )

    def _endpoints(self, nodes: list[dict[str, Any]]) -> frozenset[Endpoint]:
        """The endpoints of Consul's health entries (Service.Address, else Node.Address)."""
        endpoints = set()
        for entry in nodes:
            service = entry.get("Service") or {}
            node = entry.get("Node") or {}
            host = str(service.get("Address") or node.get("Address") or "")
            port = service.get("Port")
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                parse_address(address)
            except ValueError as exc:
                key = (str(service.get("ID", "")), address)
                if key not in self._rejected:  # once per registration, not every query
                    self._rejected.add(key)
                    log.warning(
                        "consul service instance ignored: no usable address",
                        service_id=key[0],
                        error=str(exc),
                    )
                continue
            meta = service.get("Meta") or {}
            endpoints.add(Endpoint.of(address, {str(k): str(v) for k, v in meta.items()}))
        return frozenset(endpoints)

    # -- health of the watch ----------------------------------------------------------------

    def _failed(self, exc: ConsulError, last: frozenset[Endpoint] | None) -> None:
        previous = self._status
        if previous.consecutive_failures == 0:
            log.warning(
                "consul unavailable; keeping the last known workers and retrying"
                if last is not None
                else "consul unavailable; no workers known yet, retrying",
                consul=self.target.url,
                service=self.service,
                error=exc.message,
                kind=exc.kind,
                workers=len(last) if last is not None else 0,
            )
        self._set(
            replace(
                previous,
                healthy=False,
                last_error=exc.message,
                last_error_kind=exc.kind,
                consecutive_failures=previous.consecutive_failures + 1,
                errors_total=previous.errors_total + 1,
            )
        )

    def _succeeded(self, endpoints: frozenset[Endpoint], changed: bool, problem: str) -> None:
        previous = self._status
        now = time.time()
        if problem and not self._acl_suspected:
            log.warning(
                "consul answers no workers, probably for want of an ACL token",
                consul=self.target.url,
                service=self.service,
                acl_default_policy="deny",
                token=False,
                problem=problem,
            )
        elif not problem and self._acl_suspected:
            log.info(
                "consul lists workers again", consul=self.target.url, service=self.service,
                workers=len(endpoints),
            )  # fmt: skip
        self._acl_suspected = bool(problem)
        if previous.consecutive_failures:
            log.info(
                "consul available again",
                consul=self.target.url,
                service=self.service,
                failures=previous.consecutive_failures,
                down_s=round(now - (previous.last_success or now), 3)
                if previous.last_success is not None
                else None,
                workers=len(endpoints),
            )
        elif previous.last_success is None:
            log.info(
                "watching consul", consul=self.target.url, service=self.service,
                workers=len(endpoints),
            )  # fmt: skip
        self._set(
            replace(
                previous,
                healthy=not problem,
                last_error=problem,
                last_error_kind="acl_default_deny" if problem else "",
                last_success=now,
                last_change=now if changed else previous.last_change,
                consecutive_failures=0,
                endpoints=len(endpoints),
            )
        )

    def _set(self, status: DiscoveryStatus) -> None:
        self._status = status
        for listener in self._listeners:
            listener(status)

    def _backoff(self) -> float:
        failures = self._status.consecutive_failures
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** min(failures - 1, 30))
        return delay * self._rng.uniform(0.5, 1.0)

    def __repr__(self) -> str:
        return f"ConsulDiscovery({self.target.url!r}, service={self.service!r})"


__all__ = [
    "ConsulDiscovery",
    "ConsulError",
    "Discovery",
    "DiscoveryStatus",
    "Endpoint",
    "ReportsStatus",
    "StaticDiscovery",
    "TokenBucket",
    "consul_errors",
    "next_index",
    "parse_address",
]
