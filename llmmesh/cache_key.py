"""The cache key of a request: a versioned SHA-256 of its canonical form.

The canonical form is the compact JSON (sorted keys, UTF-8) of::

    {"v": 1,                       # KEY_VERSION: bump when this layout changes
     "tenant": "<tenant>",         # from metadata x-llmmesh-tenant, default "default"
     "model": "<model>",
     "prompt": "<prompt>"          # or "messages": [["role", "content"], ...]
     "max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
     "seed": int | null, "stop": ["...", ...]}

Sampling fields take their effective values (defaults filled in, see
:func:`llmmesh.validation.effective_sampling`), so leaving a field unset and setting it to its
default give the same key. Floats are the float32 values the wire carries, written with ``repr``.
Stop strings keep their order. Nothing else enters the key: not the request id, priority, cache
policy, TTL, failover policy or deadline. The key is ``llmmesh:v1:<64 hex digits>``.

A request with a non-empty ``continuation`` (text to continue from, as the router sends when it
continues a request on another worker) neither reads nor writes the cache: its answer is only the
rest of an answer, so it must never be served the whole answer stored under the original's key,
nor store its part there. The key's layout is therefore unchanged (the continuation never enters
it), and validation refuses a continuation under CACHE_POLICY_ONLY_IF_CACHED.
"""

from __future__ import annotations

import hashlib
import json

from llmmesh.v1 import generate_pb2
from llmmesh.validation import Limits, effective_sampling, is_deterministic

KEY_VERSION = 1
DEFAULT_TENANT = "default"
TENANT_METADATA_KEY = "x-llmmesh-tenant"


def canonical_request(
    request: generate_pb2.GenerateRequest, *, tenant: str, limits: Limits
) -> bytes:
    """The canonical bytes hashed into the key."""
    s = effective_sampling(request, limits)
    doc: dict[str, object] = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "model": request.model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "seed": s.seed,
        "stop": list(s.stop),
    }
    if request.messages:
        doc["messages"] = [[m.role, m.content] for m in request.messages]
    else:
        doc["prompt"] = request.prompt
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_key(request: generate_pb2.GenerateRequest, *, tenant: str, limits: Limits) -> str:
    """The key under which the answer to ``request`` for ``tenant`` is cached."""
    digest = hashlib.sha256(canonical_request(request, tenant=tenant, limits=limits)).hexdigest()
    return f"llmmesh:v{KEY_VERSION}:{digest}"


def reads_cache(request: generate_pb2.GenerateRequest) -> bool:
    """Whether the request may be answered from the cache (never with a continuation)."""
    if request.continuation:
        return False
    policy = request.cache_policy
    if policy == generate_pb2.CACHE_POLICY_ONLY_IF_CACHED:
        return True
    return policy == generate_pb2.CACHE_POLICY_UNSPECIFIED and is_deterministic(request)


def writes_cache(request: generate_pb2.GenerateRequest) -> bool:
    """Whether a finished answer to the request is stored in the cache (never one that
    continues from a ``continuation``: it is only the rest of an answer)."""
    if request.continuation:
        return False
    policy = request.cache_policy
    if policy in (generate_pb2.CACHE_POLICY_BYPASS, generate_pb2.CACHE_POLICY_ONLY_IF_CACHED):
        return False
    return is_deterministic(request)
