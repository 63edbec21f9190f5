"""The cache key and whether a request reads or writes the cache (llmmesh/cache_key.py)."""

from __future__ import annotations

import pytest

from llmmesh.cache_key import KEY_VERSION, cache_key, reads_cache, writes_cache
from llmmesh.v1 import generate_pb2
from llmmesh.validation import Limits

LIMITS = Limits()


def request(**fields: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model="m1",
        prompt="Hello",
        sampling=generate_pb2.SamplingParams(temperature=0.0, max_tokens=10),
        **fields,  # type: ignore[arg-type]
    )


class TestContinuation:
    """A request with a continuation is only the rest of an answer: never read nor stored."""

    def test_deterministic_request_uses_the_cache(self) -> None:
        assert reads_cache(request())
        assert writes_cache(request())

    @pytest.mark.parametrize(
        "policy",
        [
            generate_pb2.CACHE_POLICY_UNSPECIFIED,
            generate_pb2.CACHE_POLICY_REFRESH,
            generate_pb2.CACHE_POLICY_BYPASS,
        ],
    )
    def test_a_continuation_neither_reads_nor_writes(self, policy: int) -> None:
        continued = request(continuation="Once upon", cache_policy=policy)
        assert not reads_cache(continued)
        assert not writes_cache(continued)

    def test_an_empty_continuation_changes_nothing(self) -> None:
        assert reads_cache(request(continuation=""))
        assert writes_cache(request(continuation=""))

    def test_key_layout_is_unchanged(self) -> None:
        """The rule keeps continued requests away from the cache, so the key needs no new field:
        the failover fields do not enter it and its version stays."""
        assert KEY_VERSION == 1
        plain = cache_key(request(), tenant="default", limits=LIMITS)
        disabled = request(failover=generate_pb2.FAILOVER_POLICY_DISABLED)
        assert cache_key(disabled, tenant="default", limits=LIMITS) == plain
        assert plain.startswith("llmmesh:v1:")
