"""The router's configuration: flags and ``LLMMESH_*`` environment variables, read here only."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from llmmesh import consul, settings
from llmmesh.breaker import BreakerSettings
from llmmesh.consul import ConsulSettings
from llmmesh.discovery import parse_address
from llmmesh.server import ServerSettings
from llmmesh.validation import Limits
from router._balancer import PolicyName

_LIMIT_DEFAULTS = Limits()


@dataclass(frozen=True, kw_only=True)
class RouterConfig(ServerSettings, ConsulSettings):
    """How the router listens, finds workers and the cache, and bounds requests."""

    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=9401,
        metadata={"help": "Prometheus metrics HTTP port (0 picks a free one, -1 disables)"},
    )
    discovery: Literal["static", "consul"] = field(
        default="static",
        metadata={
            "help": "how workers are found: static (the --workers list) or consul (the passing "
            "instances of --consul-service)"
        },
    )
    workers: tuple[str, ...] = field(
        default=("127.0.0.1:50061",),
        metadata={
            "help": "worker addresses for static discovery, host:port,host:port (unused with "
            "consul)"
        },
    )
    consul_watch_wait: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "longest a Consul blocking query waits for a change before it is renewed "
            "(at most 10m)"
        },
    )
    consul_retry_max: timedelta = field(
        default=timedelta(seconds=5),
        metadata={"help": "longest pause between queries while Consul is unreachable"},
    )
    cache_address: str = field(
        default="127.0.0.1:50071",
        metadata={"help": "host:port of the cache service; empty disables caching"},
    )
    cache_timeout: timedelta = field(
        default=timedelta(milliseconds=100),
        metadata={"help": "longest a cache lookup may take before it counts as a miss"},
    )
    cache_breaker_failures: int = field(
        default=5,
        metadata={
            "help": "cache calls failing in a row (unreachable, timed out, UNAVAILABLE) that open "
            "the cache's circuit: lookups are then misses and stores dropped at once, without "
            "calling the cache"
        },
    )
    cache_breaker_cooldown: timedelta = field(
        default=timedelta(seconds=1),
        metadata={
            "help": "how long the cache's circuit stays open before one trial call may test the "
            "cache; doubled after each failed trial"
        },
    )
    cache_breaker_cooldown_max: timedelta = field(
        default=timedelta(seconds=10),
        metadata={"help": "longest the cache's circuit stays open between two trials"},
    )
    fill_lock_ttl: timedelta = field(
        default=timedelta(seconds=5),
        metadata={
            "help": "expiry of the cache fill lock taken for a request this router dispatches "
            "(single-flight across routers), renewed every third of it while generating: other "
            "routers take over this long after this one dies"
        },
    )
    fill_max_wait: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "longest a request waits for another router's identical request to fill the "
            "cache before dispatching itself (the caller's deadline, when sooner, bounds it); 0 "
            "never waits"
        },
    )
    max_request_time: timedelta = field(
        default=timedelta(minutes=10),
        metadata={"help": "deadline given to a worker when the caller sets none"},
    )
    max_attempts: int = field(
        default=3,
        metadata={
            "help": "workers a request may be tried on when one fails before its first token"
        },
    )
    policy: PolicyName = field(
        default="least-loaded",
        metadata={
            "help": "load-balancing policy: least-loaded (lowest load score from the workers' "
            "reports), power-of-two (the lower of two random workers), round-robin, random"
        },
    )
    load_stale_after: timedelta = field(
        default=timedelta(seconds=1),
        metadata={
            "help": "a worker whose last load report is older than this gets no new requests "
            "until reports resume (reports are asked for 4 times as often)"
        },
    )
    discovery_grace: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "a worker that discovery drops while its own load stream is live and says it "
            "serves stays routable this long (logged, counted), so that a Consul answer that "
            "contradicts the workers (e.g. every TTL check critical after an outage) does not "
            "empty the routing table; it leaves at once when its stream ends or says it drains; "
            "0 drops it at once"
        },
    )
    eject_after_failures: int = field(
        default=3,
        metadata={
            "help": "consecutive failed calls (UNAVAILABLE, UNKNOWN, DATA_LOSS) that "
            "eject a worker for a cool-down; 0 never ejects"
        },
    )
    eject_cooldown: timedelta = field(
        default=timedelta(seconds=5),
        metadata={
            "help": "how long an ejected worker gets no requests before one probe request "
            "decides whether it returns; doubled on each ejection in a row"
        },
    )
    eject_cooldown_max: timedelta = field(
        default=timedelta(minutes=1),
        metadata={"help": "longest ejection cool-down, however many ejections in a row"},
    )
    admission_queue_size: int = field(
        default=1024,
        metadata={
            "help": "requests per model that may wait in the router while every worker is full "
            "(beyond: RESOURCE_EXHAUSTED); 0 turns them away at once"
        },
    )
    admission_max_wait: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "longest a request waits for a free worker before RESOURCE_EXHAUSTED (the "
            "caller's deadline, when sooner, ends the wait with DEADLINE_EXCEEDED)"
        },
    )
    stream_idle_timeout: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "a streaming caller that reads nothing for this long (the router has waited "
            "this long to hand it one message) is cancelled and counted; the worker's slot is "
            "freed when the worker's stream ends either way; 0 never cancels"
        },
    )
    max_streams_per_connection: int = field(
        default=256,
        metadata={
            "help": "GenerateStream calls one HTTP/2 connection may hold open at once (beyond: "
            "RESOURCE_EXHAUSTED); 0 is no limit"
        },
    )
    max_streams_per_tenant: int = field(
        default=1024,
        metadata={
            "help": "GenerateStream calls one tenant may hold open at once, over all its "
            "connections (beyond: RESOURCE_EXHAUSTED); 0 is no limit"
        },
    )
    default_max_tokens: int = field(
        default=_LIMIT_DEFAULTS.default_max_tokens,
        metadata={"help": "max_tokens when a request leaves it unset"},
    )
    max_tokens_limit: int = field(
        default=_LIMIT_DEFAULTS.max_tokens_limit,
        metadata={"help": "largest max_tokens a request may ask for"},
    )
    max_prompt_chars: int = field(
        default=_LIMIT_DEFAULTS.max_prompt_chars,
        metadata={"help": "longest prompt (all chat messages together), in characters"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.discovery == "static" and not self.workers:
            raise ValueError("workers: static discovery needs at least one worker address")
        if not timedelta(0) < self.consul_watch_wait <= timedelta(minutes=10):
            raise ValueError("consul_watch_wait: must be > 0 and at most 10m")
        if self.consul_retry_max <= timedelta(0):
            raise ValueError("consul_retry_max: must be > 0")
        for address in self.workers:
            try:
                parse_address(address)
            except ValueError as exc:
                raise ValueError(f"workers: {exc}") from None
        if self.cache_address:
            try:
                parse_address(self.cache_address)
            except ValueError as exc:
                raise ValueError(f"cache_address: {exc}") from None
        if self.cache_timeout <= timedelta(0):
            raise ValueError("cache_timeout: must be > 0")
        if self.cache_breaker_failures < 1:
            raise ValueError(
                f"cache_breaker_failures: must be >= 1 (got {self.cache_breaker_failures})"
            )
        if self.cache_breaker_cooldown <= timedelta(0):
            raise ValueError("cache_breaker_cooldown: must be > 0")
        if self.cache_breaker_cooldown_max < self.cache_breaker_cooldown:
            raise ValueError("cache_breaker_cooldown_max: must be >= cache_breaker_cooldown")
        if not timedelta(milliseconds=30) <= self.fill_lock_ttl <= timedelta(hours=1):
            raise ValueError(f"fill_lock_ttl: must be in [30ms, 1h] (got {self.fill_lock_ttl})")
        if not timedelta(0) <= self.fill_max_wait <= timedelta(hours=1):
            raise ValueError(f"fill_max_wait: must be in [0, 1h] (got {self.fill_max_wait})")
        if self.max_request_time <= timedelta(0):
            raise ValueError("max_request_time: must be > 0")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be >= 1 (got {self.max_attempts})")
        if self.load_stale_after <= timedelta(0):
            raise ValueError("load_stale_after: must be > 0")
        if self.discovery_grace < timedelta(0):
            raise ValueError("discovery_grace: must be >= 0")
        if self.eject_after_failures < 0:
            raise ValueError(
                f"eject_after_failures: must be >= 0 (got {self.eject_after_failures})"
            )
        if self.eject_cooldown <= timedelta(0):
            raise ValueError("eject_cooldown: must be > 0")
        if self.eject_cooldown_max < self.eject_cooldown:
            raise ValueError("eject_cooldown_max: must be >= eject_cooldown")
        if self.admission_queue_size < 0:
            raise ValueError(
                f"admission_queue_size: must be >= 0 (got {self.admission_queue_size})"
            )
        if self.admission_max_wait <= timedelta(0):
            raise ValueError("admission_max_wait: must be > 0")
        if self.stream_idle_timeout < timedelta(0):
            raise ValueError("stream_idle_timeout: must be >= 0")
        if self.max_streams_per_connection < 0:
            raise ValueError(
                f"max_streams_per_connection: must be >= 0 (got {self.max_streams_per_connection})"
            )
        if self.max_streams_per_tenant < 0:
            raise ValueError(
                f"max_streams_per_tenant: must be >= 0 (got {self.max_streams_per_tenant})"
            )
        if self.max_tokens_limit <= 0:
            raise ValueError(f"max_tokens_limit: must be > 0 (got {self.max_tokens_limit})")
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens: must be in 1..max_tokens_limit ({self.max_tokens_limit})"
                f" (got {self.default_max_tokens})"
            )
        if self.max_prompt_chars <= 0:
            raise ValueError(f"max_prompt_chars: must be > 0 (got {self.max_prompt_chars})")

    @property
    def cache_breaker(self) -> BreakerSettings:
        """The settings of the cache's circuit breaker."""
        return BreakerSettings(
            failure_threshold=self.cache_breaker_failures,
            cooldown=self.cache_breaker_cooldown,
            cooldown_max=self.cache_breaker_cooldown_max,
        )

    @property
    def limits(self) -> Limits:
        """The bounds on one request."""
        return Limits(
            default_max_tokens=self.default_max_tokens,
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_chars=self.max_prompt_chars,
        )


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """The configuration from ``argv`` flags, then ``LLMMESH_*`` variables, then defaults.

    With consul discovery the Consul settings are also resolved against Consul's own variables
    (``CONSUL_HTTP_ADDR``...; see :mod:`llmmesh.consul`), so that a bad one stops the router here.
    """
    prog = "python -m router"
    config = settings.load(
        RouterConfig,
        prog=prog,
        description="llm-mesh router: the public entry point; routes requests to workers.",
        argv=argv,
        environ=environ,
    )
    if config.discovery == "consul":
        try:
            consul.resolve(config, environ)
        except ValueError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return config
