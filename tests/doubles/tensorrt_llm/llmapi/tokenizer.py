"""``tensorrt_llm.llmapi.tokenizer``: a word-piece tokenizer with the Hugging Face methods used.

Pieces are runs of non-space characters with their leading whitespace (as byte-level BPE keeps
them); ids are handed out on first sight, after the special tokens ``<pad>`` 0, ``<s>`` 1 and
``</s>`` 2. ``encode`` adds ``<s>`` unless ``add_special_tokens=False``; ``decode`` drops special
tokens unless ``skip_special_tokens=False``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any

_PIECE = re.compile(r"\s*\S+|\s+")


class TransformersTokenizer:
    """The tokenizer an ``LLM`` exposes as ``llm.tokenizer``."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self) -> None:
        self._pieces: list[str] = ["<pad>", "<s>", "</s>"]
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def piece_id(self, piece: str) -> int:
        """The id of ``piece``, assigning the next free one on first sight."""
        with self._lock:
            found = self._ids.get(piece)
            if found is None:
                found = self._ids[piece] = len(self._pieces)
                self._pieces.append(piece)
            return found

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int]:
        ids = [self.bos_token_id] if add_special_tokens else []
        ids.extend(self.piece_id(piece) for piece in _PIECE.findall(text))
        return ids

    def decode(
        self, token_ids: Iterable[int], skip_special_tokens: bool = False, **kwargs: Any
    ) -> str:
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(self._pieces[i] for i in token_ids if i not in special)


__all__ = ["TransformersTokenizer"]
