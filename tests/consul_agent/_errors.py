"""The agent's error answers."""

from __future__ import annotations


class HTTPError(Exception):
    """An error answer: status code and Consul's plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
