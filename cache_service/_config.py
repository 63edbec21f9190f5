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
        if self.default_ttl < timedelta(seconds=1):
            raise ValueError(f"default_ttl: {self.default_ttl} is below 1s")
        if not self.default_ttl <= self.max_ttl <= timedelta(seconds=_MAX_TTL_S):
            raise ValueError(
                f"max_ttl: {self.max_ttl} must be between default_ttl ({self.default_ttl}) "
                f"and {_MAX_TTL_S}s"
            )
        if self.max_value_bytes < 1:
            raise ValueError(f"max_value_bytes: {self.max_value_bytes} is below 1")
        if self.memory_max_entries < 1:
            raise ValueError(f"memory_max_entries: {self.memory_max_entries} is below 1")
        if self.store == "memory" and self.memory_max_bytes < self.max_value_bytes + _MAX_KEY_BYTES:
            raise ValueError(
                f"memory_max_bytes: {self.memory_max_bytes} cannot hold one entry of "
                f"max_value_bytes ({self.max_value_bytes})"
            )

    @property
    def redis_url_masked(self) -> str:
        """The Redis URL with its password replaced by ***, for logs and messages."""
        return mask_url(self.redis_url)

    @property
    def default_ttl_s(self) -> int:
        """default_ttl in whole seconds (at least 1)."""
        return max(1, int(self.default_ttl.total_seconds()))

    @property
    def max_ttl_s(self) -> int:
        """max_ttl in whole seconds (at least 1)."""
        return max(1, int(self.max_ttl.total_seconds()))


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
