"""The cache service's configuration: flags and ``LLMMESH_*`` environment variables.

``python -m cache_service --help`` lists every setting. The Redis URL may carry a password
(``redis://:PASSWORD@host:6379/0``): pass it through ``LLMMESH_REDIS_URL`` rather than a flag,
which other users can see in the process list. The URL is left out of the config's ``repr`` and is
only ever logged through :attr:`CacheConfig.redis_url_masked`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

from cache_service.stores import mask_url
from llmmesh import settings
from llmmesh.breaker import BreakerSettings
from llmmesh.server import ServerSettings

MiB = 1024 * 1024
#: Keys take at most this much of a memory store's byte budget.
_MAX_KEY_BYTES = 256
#: ttl_seconds is a uint32 on the wire.
_MAX_TTL_S = 2**32 - 1


@dataclass(frozen=True, kw_only=True)
class CacheConfig(ServerSettings):
    """Settings of ``python -m cache_service``."""

    port: int = field(default=50071, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=9403,
        metadata={"help": "Prometheus metrics HTTP port (0 picks a free one, -1 disables)"},
    )
    store: Literal["redis", "memory"] = field(
        default="redis",
        metadata={"help": "where entries live: redis, or memory (in-process LRU, lost on exit)"},
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        repr=False,
        metadata={
            "help": "Redis to use with --store redis (redis://[:password@]host:port/db, "
            "rediss://, unix://); prefer the environment variable when it holds a password",
            "metavar": "URL",
        },
    )
    redis_timeout: timedelta = field(
        default=timedelta(milliseconds=100),
        metadata={
            "help": "bound on each Redis operation, connect and read; a slower Redis answers "
            "UNAVAILABLE"
        },
    )
    redis_max_connections: int = field(
        default=64, metadata={"help": "size of the Redis connection pool"}
    )
    store_breaker_failures: int = field(
        default=5,
        metadata={
            "help": "store operations failing in a row that open the store's circuit: every RPC "
            "that needs the store then answers UNAVAILABLE at once, without trying"
        },
    )
    store_breaker_cooldown: timedelta = field(
        default=timedelta(seconds=1),
        metadata={
            "help": "how long the store's circuit stays open before one trial operation (or the "
            "background ping) may test the store; doubled after each failed trial"
        },
    )
    store_breaker_cooldown_max: timedelta = field(
        default=timedelta(seconds=10),
        metadata={"help": "longest the store's circuit stays open between two trials"},
    )
    default_ttl: timedelta = field(
        default=timedelta(hours=1),
        metadata={"help": "time to live of an entry stored with ttl_seconds 0"},
    )
    max_ttl: timedelta = field(
        default=timedelta(hours=24),
        metadata={"help": "longest time to live an entry may get (longer requests are capped)"},
    )
    max_value_bytes: int = field(
        default=MiB,
        metadata={"help": "largest serialized entry accepted; larger ones are not stored"},
    )
    memory_max_entries: int = field(
        default=100_000,
        metadata={"help": "with --store memory: entries kept before the least recently used go"},
    )
    memory_max_bytes: int = field(
        default=256 * MiB,
        metadata={"help": "with --store memory: bytes kept before the least recently used go"},
    )
    fill_lock_ttl: timedelta = field(
        default=timedelta(seconds=5),
        metadata={
            "help": "how long a fill lock (single-flight across routers) lasts without renewal "
            "when the lookup that takes it asks for no expiry"
        },
    )
    fill_lock_max_ttl: timedelta = field(
        default=timedelta(seconds=30),
        metadata={
            "help": "longest expiry a fill lock may get: how long waiters wait at most for an "
            "owner that died"
        },
    )
    fill_max_wait: timedelta = field(
        default=timedelta(seconds=60),
        metadata={
            "help": "longest a lookup may wait for another caller's fill (wait_ms is capped to "
            "it, and to the call's deadline)"
        },
    )
    fill_poll_interval: timedelta = field(
        default=timedelta(milliseconds=5),
        metadata={
            "help": "how often a lookup waiting for another caller's fill asks the store whether "
            "it is done"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.store not in ("redis", "memory"):
            raise ValueError(f"store: {self.store!r} is not one of redis, memory")
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"redis_url: {self.redis_url_masked!r} must start with redis://, rediss:// "
                "or unix://"
            )
        if not timedelta(0) < self.redis_timeout <= timedelta(minutes=1):
            raise ValueError(f"redis_timeout: {self.redis_timeout} is not in (0, 60s]")
        if self.redis_max_connections < 1:
            raise ValueError(f"redis_max_connections: {self.redis_max_connections} is below 1")
        if self.store_breaker_failures < 1:
            raise ValueError(f"store_breaker_failures: {self.store_breaker_failures} is below 1")
        if self.store_breaker_cooldown <= timedelta(0):
            raise ValueError(f"store_breaker_cooldown: {self.store_breaker_cooldown} is not > 0")
        if self.store_breaker_cooldown_max < self.store_breaker_cooldown:
            raise ValueError(
                f"store_breaker_cooldown_max: {self.store_breaker_cooldown_max} is below "
                f"store_breaker_cooldown ({self.store_breaker_cooldown})"
            )
        if self.default_ttl < timedelta(seconds=1):
            raise ValueError(f"default_ttl: {self.default_ttl} is below 1s")
        if not self.default_ttl <= self.max_ttl <= timedelta(seconds=_MAX_TTL_S):
            raise ValueError(
                f"max_ttl: {self.max_ttl} must be between default_ttl ({self.default_ttl}) "
                f"and {_MAX_TTL_S}s"
            )
        if self.max_value_bytes < 1:
            raise ValueError(f"max_value_bytes: {self.max_value_bytes} is below 1")
        if self.fill_lock_ttl < timedelta(milliseconds=1):
            raise ValueError(f"fill_lock_ttl: {self.fill_lock_ttl} is below 1ms")
        if not self.fill_lock_ttl <= self.fill_lock_max_ttl <= timedelta(hours=1):
            raise ValueError(
                f"fill_lock_max_ttl: {self.fill_lock_max_ttl} must be between fill_lock_ttl "
                f"({self.fill_lock_ttl}) and 1h"
            )
        if not timedelta(0) <= self.fill_max_wait <= timedelta(hours=1):
            raise ValueError(f"fill_max_wait: {self.fill_max_wait} is not in [0, 1h]")
        if not timedelta(milliseconds=1) <= self.fill_poll_interval <= timedelta(seconds=1):
            raise ValueError(f"fill_poll_interval: {self.fill_poll_interval} is not in [1ms, 1s]")
        if self.memory_max_entries < 1:
            raise ValueError(f"memory_max_entries: {self.memory_max_entries} is below 1")
        if self.store == "memory" and self.memory_max_bytes < self.max_value_bytes + _MAX_KEY_BYTES:
            raise ValueError(
                f"memory_max_bytes: {self.memory_max_bytes} cannot hold one entry of "
                f"max_value_bytes ({self.max_value_bytes})"
            )

    @property
    def store_breaker(self) -> BreakerSettings:
        """The settings of the store's circuit breaker."""
        return BreakerSettings(
            failure_threshold=self.store_breaker_failures,
            cooldown=self.store_breaker_cooldown,
            cooldown_max=self.store_breaker_cooldown_max,
        )

    @property
    def redis_url_masked(self) -> str:
        """The Redis URL with its password replaced by ***, for logs and messages."""
        return mask_url(self.redis_url)

    @property
    def default_ttl_s(self) -> int:
        """default_ttl in whole seconds (at least 1)."""
        return max(1, int(self.default_ttl.total_seconds()))

    def fill_lock_ttl_ms(self, requested_ms: int) -> int:
        """The fill lock expiry for a request's ``lock_ttl_ms`` (0: the default), capped."""
        ms = requested_ms or _whole_ms(self.fill_lock_ttl)
        return max(1, min(ms, _whole_ms(self.fill_lock_max_ttl)))

    @property
    def max_ttl_s(self) -> int:
        """max_ttl in whole seconds (at least 1)."""
        return max(1, int(self.max_ttl.total_seconds()))


def _whole_ms(duration: timedelta) -> int:
    return int(duration.total_seconds() * 1000)


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> CacheConfig:
    """Read the configuration from flags (``argv``, default sys.argv) and the environment."""
    return settings.load(
        CacheConfig,
        prog="python -m cache_service",
        description="llm-mesh cache service: llmmesh.v1.Cache over Redis or an in-process LRU.",
        argv=argv,
        environ=environ,
    )
