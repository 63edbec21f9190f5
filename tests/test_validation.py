"""Validation of a GenerateRequest (llmmesh/validation.py): what the continuation fields accept."""

from __future__ import annotations

import pytest

from llmmesh.errors import InvalidArgument
from llmmesh.v1 import generate_pb2
from llmmesh.validation import Limits, validate_request

LIMITS = Limits(max_prompt_chars=100)


def request(**fields: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model="m1", prompt="Hello", **fields)  # type: ignore[arg-type]


class TestContinuation:
    """A continuation is bounded like the prompt and cannot be asked of the cache alone."""

    def test_continuation_up_to_the_prompt_limit_is_valid(self) -> None:
        validate_request(request(continuation="x" * 100), LIMITS)

    def test_over_long_continuation_names_the_field(self) -> None:
        with pytest.raises(InvalidArgument) as caught:
            validate_request(request(continuation="x" * 101), LIMITS)
        assert caught.value.field == "continuation"
        assert "101 characters" in str(caught.value)
        assert "100" in str(caught.value)

    def test_continuation_with_only_if_cached_is_refused(self) -> None:
        policy = generate_pb2.CACHE_POLICY_ONLY_IF_CACHED
        with pytest.raises(InvalidArgument) as caught:
            validate_request(request(continuation="Once", cache_policy=policy), LIMITS)
        assert caught.value.field == "continuation"
        validate_request(request(cache_policy=policy), LIMITS)  # without one: as before

    @pytest.mark.parametrize(
        "policy", [generate_pb2.FAILOVER_POLICY_UNSPECIFIED, generate_pb2.FAILOVER_POLICY_DISABLED]
    )
    def test_known_failover_policies_are_valid(self, policy: int) -> None:
        validate_request(request(failover=policy), LIMITS)

    def test_unknown_failover_policy_names_the_field(self) -> None:
        with pytest.raises(InvalidArgument) as caught:
            validate_request(request(failover=7), LIMITS)
        assert caught.value.field == "failover"
