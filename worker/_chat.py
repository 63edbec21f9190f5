"""Rendering chat messages into one prompt, for engines that take text.

The template is a simple, documented one (close to Llama 3's shape) so that the simulator's text
and token counts depend on the whole conversation. An engine with its own chat template (a
Hugging Face tokenizer's ``apply_chat_template``) may render messages itself later.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmmesh.v1 import generate_pb2


def render_chat(messages: Iterable[generate_pb2.ChatMessage]) -> str:
    """Render messages as ``<|role|>\\ncontent\\n`` turns, ending with the assistant's cue."""
    turns = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


def prompt_of(request: generate_pb2.GenerateRequest) -> str:
    """The prompt an engine is given: the prompt, or the rendered chat messages ending with the
    assistant's cue (the generation prompt). A request's ``continuation`` is not part of it: the
    engine reads it right after (:attr:`worker.engines.EngineRequest.input_text`)."""
    if request.messages:
        return render_chat(request.messages)
    return request.prompt


__all__ = ["prompt_of", "render_chat"]
