"""Tracing across the mesh: the cache service (memory store), a ``sim`` worker and a router run
in-process, each behind its own gRPC server on 127.0.0.1, with spans going to the SDK's in-memory
exporter through :func:`llmmesh.tracing.install`; the trace context crosses every hop in the
calls' metadata, as between processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import pytest
import structlog.testing
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cache_service import CacheApp, CacheConfig
from llmmesh import tracing
from llmmesh.server import ServerSettings, ServiceRunner, free_port
from llmmesh.settings import ConfigError
from llmmesh.v1 import generate_pb2, router_pb2_grpc
from tests.harness import ROOT, ServiceProcess, assert_eventually
from tests.test_router import running_router
from tests.test_worker import FAST
from worker import WorkerApp, WorkerConfig

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-llama-3.1-8b"
WORKER_ID = "w-traced"
ROUTER_GENERATE = "llmmesh.v1.Router/Generate"
ROUTER_STREAM = "llmmesh.v1.Router/GenerateStream"
WORKER_GENERATE = "llmmesh.v1.Worker/Generate"
WORKER_STREAM = "llmmesh.v1.Worker/GenerateStream"
CACHE_LOOKUP = "llmmesh.v1.Cache/Lookup"
CACHE_STORE = "llmmesh.v1.Cache/Store"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every span kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.install("llmmesh-test", SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


@asynccontextmanager
async def mesh(
    worker_overrides: dict[str, Any] | None = None, **router_overrides: Any
) -> AsyncIterator[router_pb2_grpc.RouterAsyncStub]:
    """Cache service, one fast sim worker and a router using both; the router's stub."""
    cache_config = CacheConfig(port=0, metrics_port=-1, store="memory", grace=timedelta(0))
    worker_config = WorkerConfig(
        port=0,
        metrics_port=-1,
        worker_id=WORKER_ID,
        grace=timedelta(0),
        model=MODEL,
        **{**FAST, **(worker_overrides or {})},
    )
    cache = ServiceRunner(CacheApp(cache_config), cache_config, name="cache_service")
    worker = ServiceRunner(WorkerApp(worker_config), worker_config, name="worker")
    async with (
        cache,
        worker,
        running_router([worker.address], cache=cache.address, **router_overrides) as router,
    ):
        yield router.stub


def request(prompt: str, **fields: Any) -> generate_pb2.GenerateRequest:
    """A deterministic request, so the router looks it up and stores its answer."""
    fields.setdefault("model", MODEL)
    fields.setdefault("sampling", generate_pb2.SamplingParams(temperature=0.0, max_tokens=12))
    return generate_pb2.GenerateRequest(prompt=prompt, **fields)


def by_trace(exported: Sequence[ReadableSpan]) -> dict[int, list[ReadableSpan]]:
    traces: dict[int, list[ReadableSpan]] = {}
    for span in exported:
        assert span.context is not None
        traces.setdefault(span.context.trace_id, []).append(span)
    return traces


def one(spans: Sequence[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind is kind]
    assert len(found) == 1, f"{name} {kind.name}: {[(s.name, s.kind.name) for s in spans]}"
    return found[0]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def assert_child(child: ReadableSpan, parent: ReadableSpan) -> None:
    assert parent_id(child) == span_id(parent), f"{child.name} is not a child of {parent.name}"


def names(spans: Sequence[ReadableSpan]) -> set[str]:
    return {s.name for s in spans}


async def stored(exporter: InMemorySpanExporter, count: int) -> None:
    """Wait for ``count`` Store RPCs to have ended in the cache service (stores are in the
    background)."""

    def ended() -> bool:
        exported = exporter.get_finished_spans()
        return sum(s.name == CACHE_STORE and s.kind is SpanKind.SERVER for s in exported) >= count

    await assert_eventually(ended, message="the cache store's span never ended")


class TestOneTrace:
    async def test_a_miss_and_a_hit_each_make_one_trace_across_the_services(
        self, spans: InMemorySpanExporter
    ) -> None:
        async with mesh() as router:
            miss = await router.Generate(request("Trace this request."), timeout=10)
            await stored(spans, 1)
            hit = await router.Generate(request("Trace this request."), timeout=10)
        assert not miss.summary.cached
        assert hit.summary.cached

        traces = by_trace(spans.get_finished_spans())
        assert len(traces) == 2, {t: names(s) for t, s in traces.items()}
        first, second = sorted(traces.values(), key=lambda t: min(s.start_time or 0 for s in t))

        # The miss: router -> cache lookup, router -> worker, router -> cache store.
        root = one(first, ROUTER_GENERATE, SpanKind.SERVER)
        assert root.parent is None
        assert [s for s in first if s.parent is None] == [root]
        lookup_client = one(first, CACHE_LOOKUP, SpanKind.CLIENT)
        lookup_server = one(first, CACHE_LOOKUP, SpanKind.SERVER)
        attempt = one(first, WORKER_GENERATE, SpanKind.CLIENT)
        worker = one(first, WORKER_GENERATE, SpanKind.SERVER)
        store_client = one(first, CACHE_STORE, SpanKind.CLIENT)
        store_server = one(first, CACHE_STORE, SpanKind.SERVER)
        assert_child(lookup_client, root)
        assert_child(lookup_server, lookup_client)
        assert_child(attempt, root)
        assert_child(worker, attempt)
        assert_child(store_client, root)
        assert_child(store_server, store_client)
        assert len(first) == 7, sorted((s.name, s.kind.name) for s in first)

        assert root.attributes is not None
        assert root.attributes["llmmesh.request_id"] == miss.request_id
        assert root.attributes["gen_ai.request.model"] == MODEL
        assert root.attributes["llmmesh.cached"] is False
        assert root.attributes["llmmesh.worker_id"] == WORKER_ID
        assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert root.status.status_code is StatusCode.UNSET
        assert attempt.attributes is not None
        assert attempt.attributes["llmmesh.attempt"] == 1
        assert attempt.attributes["llmmesh.worker_id"] == WORKER_ID
        assert worker.attributes is not None
        usage = miss.summary.usage
        assert worker.attributes["llmmesh.request_id"] == miss.request_id
        assert worker.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
        assert worker.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
        finish = generate_pb2.FinishReason.Name(miss.summary.finish_reason)
        assert worker.attributes["gen_ai.response.finish_reasons"] == (
            finish.removeprefix("FINISH_REASON_").lower(),
        )
        assert worker.attributes["llmmesh.worker_id"] == WORKER_ID
        assert worker.attributes["rpc.grpc.status_code"] == 0

        # The hit: router -> cache lookup, and nothing else.
        root = one(second, ROUTER_GENERATE, SpanKind.SERVER)
        assert root.parent is None
        assert_child(one(second, CACHE_LOOKUP, SpanKind.CLIENT), root)
        assert_child(
            one(second, CACHE_LOOKUP, SpanKind.SERVER), one(second, CACHE_LOOKUP, SpanKind.CLIENT)
        )
        assert names(second) == {ROUTER_GENERATE, CACHE_LOOKUP}
        assert root.attributes is not None
        assert root.attributes["llmmesh.cached"] is True
        assert root.attributes["llmmesh.request_id"] == hit.request_id

    async def test_a_stream_is_traced_to_the_worker(self, spans: InMemorySpanExporter) -> None:
        async with mesh() as router:
            chunks = [
                c async for c in router.GenerateStream(request("Stream and trace."), timeout=10)
            ]
            await stored(spans, 1)
        assert chunks[-1].HasField("summary")
        (trace,) = by_trace(spans.get_finished_spans()).values()
        root = one(trace, ROUTER_STREAM, SpanKind.SERVER)
        assert root.parent is None
        attempt = one(trace, WORKER_STREAM, SpanKind.CLIENT)
        worker = one(trace, WORKER_STREAM, SpanKind.SERVER)
        assert_child(attempt, root)
        assert_child(worker, attempt)
        assert worker.attributes is not None
        assert worker.attributes["gen_ai.usage.output_tokens"] == (
            chunks[-1].summary.usage.completion_tokens
        )

    async def test_a_stream_the_caller_leaves_ends_its_spans_cancelled(
        self, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
    ) -> None:
        slow = {
            "sim_token_delay": timedelta(milliseconds=20),
            "sim_min_answer_tokens": 4000,
            "sim_max_answer_tokens": 4000,
        }
        long_answer = generate_pb2.SamplingParams(temperature=0.0, max_tokens=4000)
        async with mesh(worker_overrides=slow) as router:
            call = router.GenerateStream(request("Leave early.", sampling=long_answer), timeout=30)
            first = await call.read()
            assert isinstance(first, generate_pb2.GenerateStreamResponse)
            call.cancel()

            def ended() -> bool:
                return {ROUTER_STREAM, WORKER_STREAM} <= names(spans.get_finished_spans())

            await assert_eventually(ended, message="the spans of a cancelled stream never ended")
        exported = spans.get_finished_spans()
        for span in (
            one(exported, ROUTER_STREAM, SpanKind.SERVER),
            one(exported, WORKER_STREAM, SpanKind.CLIENT),
            one(exported, WORKER_STREAM, SpanKind.SERVER),
        ):
            assert span.attributes is not None
            assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
            assert span.status.status_code is StatusCode.ERROR
        assert "Failed to detach context" not in caplog.text

    async def test_an_error_sets_the_status_on_the_span(self, spans: InMemorySpanExporter) -> None:
        async with mesh() as router:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await router.Generate(request("hello", model="no-such-model"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        root = one(spans.get_finished_spans(), ROUTER_GENERATE, SpanKind.SERVER)
        assert root.status.status_code is StatusCode.ERROR
        assert root.status.description is not None
        assert root.status.description.startswith("NOT_FOUND: ")
        assert root.attributes is not None
        assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]

    async def test_the_callers_trace_context_is_continued(self) -> None:
        """A caller that sends ``traceparent`` gets the router's span in its own trace, and its
        sampling decision is followed even where the mesh samples nothing itself."""
        exporter = InMemorySpanExporter()
        tracing.install("llmmesh-test", SimpleSpanProcessor(exporter), sample_ratio=0.0)
        trace_id, parent = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
        try:
            async with mesh() as router:
                await router.Generate(request("Unsampled by the mesh."), timeout=10)
                assert exporter.get_finished_spans() == ()
                sampled = f"00-{trace_id:032x}-{parent:016x}-01"
                await router.Generate(
                    request(
                        "Sampled by the caller.", cache_policy=generate_pb2.CACHE_POLICY_BYPASS
                    ),
                    metadata=((tracing.TRACEPARENT, sampled),),
                    timeout=10,
                )
        finally:
            tracing.shutdown()
        exported = exporter.get_finished_spans()
        assert {s.context.trace_id for s in exported if s.context is not None} == {trace_id}
        root = one(exported, ROUTER_GENERATE, SpanKind.SERVER)
        assert parent_id(root) == parent
        assert_child(
            one(exported, WORKER_GENERATE, SpanKind.SERVER),
            one(exported, WORKER_GENERATE, SpanKind.CLIENT),
        )


class TestOff:
    def test_the_services_import_no_opentelemetry_when_off(self) -> None:
        """Nothing of OpenTelemetry's is imported for the services, beyond what redis (8 and
        later) imports of it on its own when it is installed; the tracing SDK and the exporter
        are not loaded at all."""
        script = (
            "import sys\n"
            "def otel(): return {m for m in sys.modules if m.startswith('opentelemetry')}\n"
            "import redis\n"
            "before = otel()\n"
            "import router, worker, cache_service, llmmesh.server\n"
            "from llmmesh import tracing\n"
            "from llmmesh.server import ServerSettings\n"
            "assert not tracing.configure('router', ServerSettings(), environ={})\n"
            "assert tracing.server_span('x/y', None) is tracing.NO_SPAN\n"
            "assert tracing.client_span('x/y').outgoing((('k', 'v'),)) == (('k', 'v'),)\n"
            "print(sorted(otel() - before))\n"
            "print(sorted(m for m in otel() if m.startswith(('opentelemetry.sdk.trace',"
            " 'opentelemetry.exporter'))))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout

    async def test_requests_carry_no_trace_context_when_off(self) -> None:
        assert not tracing.enabled()
        async with mesh() as router:
            call = router.Generate(request("Untraced."), timeout=10)
            await call
            assert (await call.code()) == grpc.StatusCode.OK
        assert tracing.client_span("x/y") is tracing.NO_SPAN


class TestConfigure:
    def test_off_without_an_endpoint(self) -> None:
        assert not tracing.configure("router", ServerSettings(), environ={})
        assert not tracing.enabled()

    def test_the_standard_variable_turns_it_on_unless_the_sdk_is_disabled(self) -> None:
        port = free_port()
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        try:
            assert tracing.configure("router", ServerSettings(), environ=environ)
            assert tracing.enabled()
        finally:
            tracing.shutdown()
        assert not tracing.enabled()
        disabled = {**environ, "OTEL_SDK_DISABLED": "true"}
        assert not tracing.configure("router", ServerSettings(), environ=disabled)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("otlp_endpoint", "127.0.0.1:4317"),
            ("otlp_endpoint", "grpc://collector:4317"),
            ("trace_sample_ratio", 1.5),
            ("trace_sample_ratio", -0.1),
        ],
    )
    def test_bad_settings_are_refused_naming_the_setting(self, field: str, value: Any) -> None:
        with pytest.raises(ValueError, match=f"^{field}: "):
            ServerSettings(**{field: value})

    def test_an_endpoint_without_the_extra_is_a_configuration_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(
            sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None
        )
        settings = ServerSettings(otlp_endpoint="http://127.0.0.1:4317")
        with pytest.raises(ConfigError, match="tracing extra"):
            tracing.configure("router", settings, environ={})
        assert not tracing.enabled()


class TestCollectorDown:
    async def test_a_closed_collector_port_fails_no_request_and_is_logged_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # One export attempt per batch, so that flushing ends in about a second.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        settings = ServerSettings(otlp_endpoint=f"http://127.0.0.1:{free_port()}")
        failed = tracing.spans_counter("tracetest").labels("failed")
        before = failed._value.get()
        with structlog.testing.capture_logs() as logs:
            try:
                assert tracing.configure("tracetest", settings, environ={})
                async with mesh() as router:
                    for n in range(2):
                        response = await router.Generate(request(f"Collector down {n}."))
                        assert response.text
                        assert tracing._state is not None
                        assert tracing._state.provider.force_flush(10_000)
            finally:
                tracing.shutdown()
        assert failed._value.get() - before >= 2
        failing = [e for e in logs if e["event"].startswith("trace export failing")]
        assert len(failing) == 1, logs
        assert failing[0]["otlp_endpoint"] == settings.otlp_endpoint
        assert (
            prometheus_client.REGISTRY.get_sample_value(
                "llmmesh_tracetest_trace_spans_total", {"result": "failed"}
            )
            == failed._value.get()
        )


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it is sent: (service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []

    async def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.slow
class TestProcesses:
    async def test_three_processes_export_one_trace_to_a_collector(self) -> None:
        """The services as processes, turned on by LLMMESH_OTLP_ENDPOINT, export over OTLP; the
        spans they flush on SIGTERM make one trace with the hops' parent links."""
        collector = _Collector()
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            collector, server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        env = {"LLMMESH_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        processes: list[ServiceProcess] = []
        try:
            cache = ServiceProcess("cache_service", ["--store", "memory"], env=env).start()
            processes.append(cache)
            worker = ServiceProcess(
                "worker", ["--engine", "sim", "--model", MODEL, "--worker-id", WORKER_ID], env=env
            ).start()
            processes.append(worker)
            router = ServiceProcess(
                "router", ["--workers", worker.address, "--cache-address", cache.address], env=env
            ).start()
            processes.append(router)
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                response = await stub.Generate(request("Across processes."), timeout=20)
            # Stopped from threads: the collector answers the exports they flush meanwhile.
            for process in reversed(processes):
                assert await asyncio.to_thread(process.stop) == 0, process.logs()
        finally:
            for process in processes:
                await asyncio.to_thread(process.close)
            await server.stop(0)

        found = {(service, span.name, span.kind) for service, span in collector.spans}
        server_kind, client_kind = 2, 3  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT
        assert {
            ("router", ROUTER_GENERATE, server_kind),
            ("router", WORKER_GENERATE, client_kind),
            ("router", CACHE_LOOKUP, client_kind),
            ("cache_service", CACHE_LOOKUP, server_kind),
            ("worker", WORKER_GENERATE, server_kind),
        } <= found, found
        (root,) = [s for _, s in collector.spans if s.name == ROUTER_GENERATE]
        assert not root.parent_span_id
        trace = [(service, s) for service, s in collector.spans if s.trace_id == root.trace_id]
        spans_by_id = {s.span_id: s for _, s in trace}
        (worker_span,) = [s for svc, s in trace if svc == "worker"]
        attempt = spans_by_id[worker_span.parent_span_id]
        assert attempt.name == WORKER_GENERATE
        assert attempt.kind == client_kind
        assert attempt.parent_span_id == root.span_id
        attributes = {a.key: a.value for a in root.attributes}
        assert attributes["llmmesh.request_id"].string_value == response.request_id
