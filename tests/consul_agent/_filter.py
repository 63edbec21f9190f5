"""Consul's ``filter`` query parameter: a subset of go-bexpr (``==``, ``!=``, ``in``, ``not in``,
``contains``, ``matches``, ``is [not] empty``, ``and``/``or``/``not``, parentheses)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tests.consul_agent._errors import HTTPError

_FILTER_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|\(|\)|\[|\])
      | (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<num>-?\d+(?:\.\d+)?(?![\w.]))
      | (?P<word>[A-Za-z0-9_\-/:]+(?:\.[A-Za-z0-9_\-/:]+)*)
    )""",
    re.VERBOSE,
)
_Matcher = Callable[[Any], bool]


def compile_filter(expression: str) -> _Matcher:
    """A subset of go-bexpr, Consul's ``filter`` language; 400 for what it cannot parse."""
    if not expression.strip():
        return lambda _: True
    try:
        return _FilterParser(expression).parse()
    except ValueError as exc:
        raise HTTPError(400, f"Failed to create boolean expression evaluator: {exc}") from None


class _FilterParser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        text = text.rstrip()
        while position < len(text):
            match = _FILTER_TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise ValueError(f"unexpected input at offset {position}: {text[position:]!r}")
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.position = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.position + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.position += 1
        return token

    def keyword(self, word: str, offset: int = 0) -> bool:
        kind, value = self.peek(offset)
        return kind == "word" and value.lower() == word

    def expect_keyword(self, word: str) -> None:
        if not self.keyword(word):
            raise ValueError(f"expected {word!r}, got {self.peek()[1]!r}")
        self.position += 1

    def parse(self) -> _Matcher:
        matcher = self.parse_or()
        if self.peek()[0] != "end":
            raise ValueError(f"unexpected {self.peek()[1]!r}")
        return matcher

    def parse_or(self) -> _Matcher:
        parts = [self.parse_and()]
        while self.keyword("or"):
            self.position += 1
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else lambda obj: any(p(obj) for p in parts)

    def parse_and(self) -> _Matcher:
        parts = [self.parse_not()]
        while self.keyword("and"):
            self.position += 1
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else lambda obj: all(p(obj) for p in parts)

    def parse_not(self) -> _Matcher:
        if self.keyword("not"):
            self.position += 1
            inner = self.parse_not()
            return lambda obj: not inner(obj)
        if self.peek() == ("op", "("):
            self.position += 1
            inner = self.parse_or()
            if self.take() != ("op", ")"):
                raise ValueError("missing ')'")
            return inner
        return self.parse_match()

    def parse_value(self) -> str:
        kind, value = self.take()
        if kind == "str":
            return json.loads(value) if value.startswith('"') else value[1:-1]
        if kind in ("num", "word"):
            return value
        raise ValueError(f"expected a value, got {value!r}")

    def parse_selector(self) -> list[str]:
        kind, value = self.take()
        if kind != "word":
            raise ValueError(f"expected a selector, got {value!r}")
        parts = value.split(".")
        while self.peek() == ("op", "["):
            self.position += 1
            parts.append(self.parse_value())
            if self.take() != ("op", "]"):
                raise ValueError("missing ']'")
        return parts

    def parse_match(self) -> _Matcher:
        # value [not] in selector
        first_kind = self.peek()[0]
        if (
            first_kind in ("str", "num")
            or self.keyword("in", 1)
            or (self.keyword("not", 1) and self.keyword("in", 2))
        ):
            value = self.parse_value()
            negate = self.keyword("not")
            if negate:
                self.position += 1
            self.expect_keyword("in")
            selector = self.parse_selector()
            return _negate(
                negate, lambda obj: any(_contains(c, value) for c in _select(obj, selector))
            )
        selector = self.parse_selector()
        kind, op = self.peek()
        if kind == "op" and op in ("==", "!="):
            self.position += 1
            value = self.parse_value()
            equal = lambda obj: any(_equal(c, value) for c in _select(obj, selector))  # noqa: E731
            return _negate(op == "!=", equal)
        if self.keyword("is"):
            self.position += 1
            negate = self.keyword("not")
            if negate:
                self.position += 1
            self.expect_keyword("empty")
            empty = lambda obj: all(c in (None, "", [], {}) for c in _select(obj, selector))  # noqa: E731
            return _negate(negate, empty)
        negate = self.keyword("not")
        if negate:
            self.position += 1
        if self.keyword("contains"):
            self.position += 1
            value = self.parse_value()
            return _negate(
                negate, lambda obj: any(_contains(c, value) for c in _select(obj, selector))
            )
        if self.keyword("matches"):
            self.position += 1
            pattern = re.compile(self.parse_value())
            return _negate(
                negate,
                lambda obj: any(
                    isinstance(c, str) and pattern.search(c) for c in _select(obj, selector)
                ),
            )
        raise ValueError(f"expected an operator after {'.'.join(selector)!r}")


def _negate(negate: bool, matcher: _Matcher) -> _Matcher:
    return (lambda obj: not matcher(obj)) if negate else matcher


def _select(obj: Any, parts: list[str]) -> list[Any]:
    """The values a selector reaches; through a list it reaches into every element."""
    values = [obj]
    for part in parts:
        reached: list[Any] = []
        for value in values:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict) and part in item:
                    reached.append(item[part])
        values = reached
    return values


def _equal(field_value: Any, text: str) -> bool:
    if isinstance(field_value, bool):
        return text.lower() == str(field_value).lower()
    if isinstance(field_value, int | float):
        try:
            return float(text) == float(field_value)
        except ValueError:
            return False
    return isinstance(field_value, str) and field_value == text


def _contains(container: Any, text: str) -> bool:
    if isinstance(container, list):
        return any(_equal(item, text) for item in container)
    if isinstance(container, dict):
        return text in container
    return isinstance(container, str) and text in container
