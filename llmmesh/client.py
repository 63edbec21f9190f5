"""A synchronous client of the router, shared by the ``llm-mesh`` command (:mod:`llmmesh.cli`)
and the local mesh's ``--try`` (:mod:`llmmesh.local_mesh`): send a request and print its answer,
and put a summary or a failed call in words a person can act on.

It imports only the generated stubs, so a command that uses it starts fast.
"""

from __future__ import annotations

from typing import TextIO

import grpc

from llmmesh.v1 import generate_pb2, router_pb2_grpc

#: Where ``llm-mesh up`` serves the router, and so where the command looks first.
DEFAULT_TARGET = "127.0.0.1:50051"
#: The model ``llm-mesh up`` serves.
DEFAULT_MODEL = "sim-llama-3.1-8b"


class CommandError(Exception):
    """A failure to report as one ``error: ...`` line (exit status 1)."""


def format_summary(request_id: str, summary: generate_pb2.GenerationSummary) -> str:
    """The one-line summary ``generate`` prints after an answer."""
    finish = generate_pb2.FinishReason.Name(summary.finish_reason)
    return (
        f"[{'cached' if summary.cached else 'generated'}]"
        f" worker={summary.worker_id or '-'}"
        f" ttft={summary.timings.time_to_first_token_ms:.1f}ms"
        f" total={summary.timings.total_ms:.1f}ms"
        f" prompt_tokens={summary.usage.prompt_tokens}"
        f" completion_tokens={summary.usage.completion_tokens}"
        f" finish={finish.removeprefix('FINISH_REASON_').lower()}"
        f" request_id={request_id}"
    )


def rpc_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call (a sync call's error is also a grpc.Call)."""
    code: grpc.StatusCode = getattr(error, "code", lambda: grpc.StatusCode.UNKNOWN)()
    details: str = getattr(error, "details", lambda: "")() or ""
    return code, details


def format_rpc_error(error: grpc.RpcError, target: str) -> str:
    """``error: <CODE>: <details>``, in words a person can act on."""
    code, details = rpc_status(error)
    if code == grpc.StatusCode.UNAVAILABLE and "connection refused" in details.lower():
        details = f"nothing is listening at {target}; start a mesh with `llm-mesh up`"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"{details or 'deadline exceeded'} (no complete answer within --timeout)"
    return f"error: {code.name}: {details or code.name}"


def ask(
    stub: router_pb2_grpc.RouterStub,
    request: generate_pb2.GenerateRequest,
    *,
    stream: bool,
    timeout: float,
    out: TextIO,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[str, generate_pb2.GenerationSummary]:
    """Send one request; print the answer to ``out``; return (request id, summary).

    With ``stream`` the text is printed chunk by chunk as it arrives. Raises grpc.RpcError when
    the call fails, CommandError when a stream ends without its summary.
    """
    if not stream:
        reply = stub.Generate(request, timeout=timeout, metadata=metadata)
        out.write(reply.text)
        out.write("\n")
        out.flush()
        return reply.request_id, reply.summary
    summary: generate_pb2.GenerationSummary | None = None
    request_id = request.request_id
    for chunk in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
        request_id = chunk.request_id or request_id
        if chunk.text:
            out.write(chunk.text)
            out.flush()
        if chunk.HasField("summary"):
            summary = chunk.summary
    out.write("\n")
    out.flush()
    if summary is None:
        raise CommandError("the stream ended without its final summary")
    return request_id, summary
