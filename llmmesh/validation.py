"""Validation of a GenerateRequest, shared by the router (before anything else) and the worker.

Every problem raises :class:`llmmesh.errors.InvalidArgument` naming the field, so a caller can act
on it. Unset optional sampling fields take the defaults in :func:`effective_sampling`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmmesh.errors import InvalidArgument
from llmmesh.v1 import generate_pb2

ROLES = frozenset({"system", "user", "assistant"})
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
MAX_REQUEST_ID_CHARS = 128


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what one request may ask for."""

    default_max_tokens: int = field(
        default=256, metadata={"help": "max_tokens when a request leaves it unset"}
    )
    max_tokens_limit: int = field(
        default=4096, metadata={"help": "largest max_tokens a request may ask for"}
    )
    max_prompt_chars: int = field(
        default=131_072, metadata={"help": "longest prompt (all chat messages together), in chars"}
    )
    max_stop_sequences: int = field(default=16, metadata={"help": "most stop strings per request"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest stop string, in chars"})


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """Sampling parameters with every default filled in."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]


def effective_sampling(request: generate_pb2.GenerateRequest, limits: Limits) -> Sampling:
    """The request's sampling parameters with defaults for unset fields."""
    s = request.sampling
    return Sampling(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else limits.default_max_tokens,
        temperature=s.temperature if s.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_p=s.top_p if s.HasField("top_p") else DEFAULT_TOP_P,
        top_k=s.top_k if s.HasField("top_k") else DEFAULT_TOP_K,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )


def is_deterministic(request: generate_pb2.GenerateRequest) -> bool:
    """True when the same request always yields the same answer (greedy, or seeded)."""
    s = request.sampling
    return (s.HasField("temperature") and s.temperature == 0.0) or s.HasField("seed")


def prompt_chars(request: generate_pb2.GenerateRequest) -> int:
    """Length of the prompt, or of all chat messages together, in characters."""
    if request.messages:
        return sum(len(m.content) for m in request.messages)
    return len(request.prompt)


def validate_request(request: generate_pb2.GenerateRequest, limits: Limits) -> None:
    """Raise InvalidArgument naming the first field that cannot be served."""
    if not request.model.strip():
        raise InvalidArgument("model", "must name a model")
    _validate_input(request, limits)
    _validate_sampling(request.sampling, limits)
    rid = request.request_id
    if len(rid) > MAX_REQUEST_ID_CHARS or not all(32 < ord(c) < 127 for c in rid):
        raise InvalidArgument(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters"
        )
    if request.cache_policy not in generate_pb2.CachePolicy.values():
        raise InvalidArgument("cache_policy", f"unknown value {request.cache_policy}")
    if request.priority not in generate_pb2.Priority.values():
        raise InvalidArgument("priority", f"unknown value {request.priority}")
    _validate_continuation(request, limits)


def _validate_continuation(request: generate_pb2.GenerateRequest, limits: Limits) -> None:
    if request.failover not in generate_pb2.FailoverPolicy.values():
        raise InvalidArgument("failover", f"unknown value {request.failover}")
    chars = len(request.continuation)
    if chars > limits.max_prompt_chars:
        raise InvalidArgument(
            "continuation",
            f"is {chars} characters, longer than the limit of {limits.max_prompt_chars}",
        )
    if chars and request.cache_policy == generate_pb2.CACHE_POLICY_ONLY_IF_CACHED:
        raise InvalidArgument(
            "continuation",
            "a request with a continuation is never answered from the cache, so it cannot use "
            "CACHE_POLICY_ONLY_IF_CACHED",
        )


def _validate_input(request: generate_pb2.GenerateRequest, limits: Limits) -> None:
    if request.prompt and request.messages:
        raise InvalidArgument("prompt", "set either prompt or messages, not both")
    if request.messages:
        for i, message in enumerate(request.messages):
            if message.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role",
                    f"must be one of {', '.join(sorted(ROLES))} (got {message.role!r})",
                )
            if not message.content:
                raise InvalidArgument(f"messages[{i}].content", "must not be empty")
    elif not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty (or give messages)")
    chars = prompt_chars(request)
    if chars > limits.max_prompt_chars:
        name = "messages" if request.messages else "prompt"
        raise InvalidArgument(
            name, f"is {chars} characters, longer than the limit of {limits.max_prompt_chars}"
        )


def _validate_sampling(s: generate_pb2.SamplingParams, limits: Limits) -> None:
    if s.HasField("max_tokens"):
        if s.max_tokens <= 0:
            raise InvalidArgument("sampling.max_tokens", f"must be > 0 (got {s.max_tokens})")
        if s.max_tokens > limits.max_tokens_limit:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"{s.max_tokens} exceeds the limit of {limits.max_tokens_limit}",
            )
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument(
            "sampling.temperature", f"must be a finite number >= 0 (got {s.temperature})"
        )
    if s.HasField("top_p") and not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1] (got {s.top_p})")
    if s.HasField("top_k") and s.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (got {s.top_k})")
    if len(s.stop) > limits.max_stop_sequences:
        raise InvalidArgument(
            "sampling.stop", f"has {len(s.stop)} strings, more than {limits.max_stop_sequences}"
        )
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise InvalidArgument(
                f"sampling.stop[{i}]", f"must be 1 to {limits.max_stop_chars} characters"
            )
