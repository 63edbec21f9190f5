"""The bare pass-through proxy: the floor for one Python gRPC hop, run as its own process
(``python -m bench.hotpath --serve-proxy WORKER``)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio

from bench._common import open_channel
from bench.hotpath._options import ROUTER_SERVICE, WORKER_SERVICE
from llmmesh.server import ServerSettings, ServiceRunner, run_service


class PassThroughProxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not generic at run time
    """Forwards the Router's Generate and GenerateStream to a worker as opaque bytes.

    No message is parsed or built: the handlers and the upstream calls have no serializers, so
    grpc hands over the encoded request and response as they came. The caller's deadline goes
    upstream; an upstream status comes back as it was; a caller that goes away cancels upstream.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._unary = channel.unary_unary(WORKER_SERVICE + "Generate", None, None)
        self._stream = channel.unary_stream(WORKER_SERVICE + "GenerateStream", None, None)
        self._handlers = {
            ROUTER_SERVICE + "Generate": grpc.unary_unary_rpc_method_handler(self.generate),
            ROUTER_SERVICE + "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream
            ),
        }

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self._unary(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def generate_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = self._stream(request, timeout=context.time_remaining())
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()


class ProxyApp:
    """The proxy as a :class:`llmmesh.server.ServiceApp`: health, ready file and drain for free."""

    service_names: Sequence[str] = ("llmmesh.v1.Router",)

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self._channel = open_channel(self.target)
        server.add_generic_rpc_handlers((PassThroughProxy(self._channel),))

    async def start(self, runner: ServiceRunner) -> None:
        assert self._channel is not None
        await asyncio.wait_for(self._channel.channel_ready(), 10)

    async def drain(self) -> None:
        """Nothing to deregister."""

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


def serve_proxy(argv: Sequence[str]) -> int:
    """``python -m bench.hotpath --serve-proxy WORKER --host H --port P --ready-file F``."""
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath --serve-proxy")
    parser.add_argument("--serve-proxy", required=True, metavar="WORKER")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    server_settings = ServerSettings(
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        log_level=args.log_level,
        grace=timedelta(seconds=2),
    )
    return run_service(ProxyApp(args.serve_proxy), server_settings, name="bench-proxy")
