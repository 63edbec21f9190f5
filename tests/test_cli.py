"""The ``llm-mesh`` command: argument parsing, output formats, and calls to a fake router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from llmmesh import cli, client
from llmmesh.server import free_port
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc


def _summary(**overrides: object) -> generate_pb2.GenerationSummary:
    fields: dict[str, object] = {
        "finish_reason": generate_pb2.FINISH_REASON_LENGTH,
        "usage": generate_pb2.Usage(prompt_tokens=5, completion_tokens=16),
        "cached": False,
        "worker_id": "worker-1",
        "timings": generate_pb2.Timings(time_to_first_token_ms=12.345, total_ms=80.0),
    }
    fields.update(overrides)
    return generate_pb2.GenerationSummary(**fields)  # type: ignore[arg-type]


class FakeRpcError(grpc.RpcError):
    """What a failed sync call raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class TestParser:
    """build_parser() turns the command line into the options each subcommand uses."""

    def test_generate_defaults_are_deterministic_and_local(self, monkeypatch):
        """Without options generate asks the local router at temperature 0 for 60 s."""
        monkeypatch.delenv("LLMMESH_TARGET", raising=False)
        monkeypatch.delenv("LLMMESH_MODEL", raising=False)
        args = cli.build_parser().parse_args(["generate", "hello"])
        assert (args.target, args.model, args.temperature, args.timeout) == (
            "127.0.0.1:50051",
            "sim-llama-3.1-8b",
            0.0,
            60.0,
        )
        assert not args.stream
        assert args.stop == []
        assert args.cache_policy == "default"

    def test_target_and_model_come_from_the_environment(self, monkeypatch):
        """LLMMESH_TARGET and LLMMESH_MODEL set the defaults; flags still win."""
        monkeypatch.setenv("LLMMESH_TARGET", "127.0.0.1:6000")
        monkeypatch.setenv("LLMMESH_MODEL", "other")
        args = cli.build_parser().parse_args(["generate", "hi"])
        assert (args.target, args.model) == ("127.0.0.1:6000", "other")
        args = cli.build_parser().parse_args(["generate", "hi", "--target", "127.0.0.1:7"])
        assert args.target == "127.0.0.1:7"
        assert cli.build_parser().parse_args(["workers"]).target == "127.0.0.1:6000"

    def test_stop_repeats(self):
        """--stop may be given several times, in order."""
        args = cli.build_parser().parse_args(["generate", "x", "--stop", "a", "--stop", "\n"])
        assert args.stop == ["a", "\n"]

    @pytest.mark.parametrize(
        "argv",
        [
            ["generate", "x", "--seed", "-1"],
            ["generate", "x", "--max-tokens", "many"],
            ["generate", "x", "--cache-policy", "sometimes"],
            ["up", "--workers", "0"],
            ["up", "--port", "70000"],
            ["up", "--store", "disk"],
            [],
        ],
    )
    def test_bad_options_are_usage_errors(self, argv, capsys):
        """An option no request could carry exits 2 with a usage message."""
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(argv)
        assert exc.value.code == 2
        assert "usage: llm-mesh" in capsys.readouterr().err

    def test_up_defaults(self):
        """up runs two sim workers and the router on 127.0.0.1:50051, store chosen by PATH."""
        args = cli.build_parser().parse_args(["up"])
        assert (args.workers, args.engine, args.model) == (2, "sim", "sim-llama-3.1-8b")
        assert (args.host, args.port, args.store) == ("127.0.0.1", 50051, "auto")
        assert (args.try_prompt, args.ready_file, args.log_dir, args.verbose) == ("", "", "", False)

    def test_up_try(self):
        """--try takes the prompt to ask."""
        args = cli.build_parser().parse_args(["up", "--try", "What is a KV cache?"])
        assert args.try_prompt == "What is a KV cache?"


class TestBuildRequest:
    """build_request() sets only what was asked, so the server's defaults apply to the rest."""

    def test_unset_options_stay_unset(self):
        """Only temperature (0) is set when no sampling option is given."""
        args = cli.build_parser().parse_args(["generate", "hi", "--model", "m"])
        request = cli.build_request(args)
        assert (request.model, request.prompt) == ("m", "hi")
        assert request.sampling.HasField("temperature")
        assert request.sampling.temperature == 0.0
        for name in ("max_tokens", "top_p", "top_k", "seed"):
            assert not request.sampling.HasField(name)
        assert request.cache_policy == generate_pb2.CACHE_POLICY_UNSPECIFIED

    def test_every_option_reaches_the_request(self):
        """Each sampling flag, the request id and the cache policy are carried."""
        argv = [
            "generate", "hi",
            "--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "4",
            "--seed", "42", "--stop", "x", "--request-id", "r1", "--cache-policy", "refresh",
        ]  # fmt: skip
        request = cli.build_request(cli.build_parser().parse_args(argv))
        s = request.sampling
        assert (s.max_tokens, s.top_k, s.seed, list(s.stop)) == (7, 4, 42, ["x"])
        assert s.temperature == pytest.approx(0.5)
        assert s.top_p == pytest.approx(0.9)
        assert request.request_id == "r1"
        assert request.cache_policy == generate_pb2.CACHE_POLICY_REFRESH

    def test_out_of_range_values_reach_the_server(self):
        """A negative max_tokens is the server's to reject (it names the field)."""
        args = cli.build_parser().parse_args(["generate", "hi", "--max-tokens", "-3"])
        assert cli.build_request(args).sampling.max_tokens == -3


class TestFormatSummary:
    """format_summary() is the one line after an answer."""

    def test_generated(self):
        """A generated answer names the worker, timings, tokens, finish and request id."""
        line = client.format_summary("req-1", _summary())
        assert line == (
            "[generated] worker=worker-1 ttft=12.3ms total=80.0ms"
            " prompt_tokens=5 completion_tokens=16 finish=length"
            " request_id=req-1"
        )

    def test_cached(self):
        """A cached answer starts with [cached]."""
        line = client.format_summary("r", _summary(cached=True, finish_reason=1))
        assert line.startswith("[cached] worker=worker-1 ")
        assert " finish=stop " in line


class TestFormatWorkersTable:
    """format_workers_table() aligns the routing table under a header."""

    def test_columns_line_up(self):
        """Every row has its cells where the header has its columns."""
        workers = [
            router_pb2.WorkerStatus(
                worker_id="worker-1",
                address="127.0.0.1:40001",
                model="sim-llama-3.1-8b",
                engine="sim",
                state=router_pb2.WORKER_STATE_HEALTHY,
                in_flight=3,
                capacity=8,
                kv_cache_used_fraction=0.25,
                score=1.5,
                last_report_age_ms=120,
            ),
            router_pb2.WorkerStatus(
                worker_id="worker-10",
                address="127.0.0.1:5",
                model="m",
                engine="sim",
                state=router_pb2.WORKER_STATE_SUSPECT,
                in_flight=12,
                last_report_age_ms=-1,
            ),
        ]
        lines = cli.format_workers_table(workers).splitlines()
        assert len(lines) == 3
        header = lines[0]
        assert header.split() == list(cli.WORKER_COLUMNS)
        row1, row2 = (line.split() for line in lines[1:])
        assert row1 == [
            "worker-1", "127.0.0.1:40001", "sim-llama-3.1-8b", "sim", "healthy",
            "3", "0", "0", "8", "25%", "1.50", "120ms", "ago",
        ]  # fmt: skip
        assert row2[4] == "suspect"
        assert row2[-1] == "never"
        address_at = header.index("ADDRESS")
        assert lines[1].index("127.0.0.1:40001") == lines[2].index("127.0.0.1:5") == address_at
        # numbers are right-aligned: the in-flight counts end where the header's column ends
        end = header.index("IN-FLIGHT") + len("IN-FLIGHT")
        assert lines[1][end - 1] == "3"
        assert lines[2][end - 2 : end] == "12"


class TestFormatRpcError:
    """format_rpc_error() is one `error: CODE: details` line a person can act on."""

    def test_carries_code_and_details(self):
        """The status code name and the server's message."""
        error = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: 2 is not in (0, 1]")
        assert client.format_rpc_error(error, "127.0.0.1:1") == (
            "error: INVALID_ARGUMENT: sampling.top_p: 2 is not in (0, 1]"
        )

    def test_connection_refused_says_to_start_a_mesh(self):
        """UNAVAILABLE from a refused connection names the target and `llm-mesh up`."""
        error = FakeRpcError(
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
            "Failed to connect to remote host: connect: Connection refused (111)",
        )
        assert client.format_rpc_error(error, "127.0.0.1:9") == (
            "error: UNAVAILABLE: nothing is listening at 127.0.0.1:9; "
            "start a mesh with `llm-mesh up`"
        )

    def test_other_unavailable_keeps_the_details(self):
        """UNAVAILABLE for another reason (no healthy worker) is shown as the server said."""
        error = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "no healthy worker serves model m")
        assert client.format_rpc_error(error, "t") == (
            "error: UNAVAILABLE: no healthy worker serves model m"
        )

    def test_deadline_mentions_the_timeout(self):
        """DEADLINE_EXCEEDED points at --timeout."""
        error = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert client.format_rpc_error(error, "t") == (
            "error: DEADLINE_EXCEEDED: Deadline Exceeded (no complete answer within --timeout)"
        )


class TestNothingListening:
    """generate and workers against a port where nothing listens."""

    @pytest.mark.parametrize(
        "command", [["generate", "hi"], ["generate", "hi", "--stream"], ["workers"]]
    )
    def test_fails_with_one_line_and_exit_1(self, command, capsys):
        """Exit 1, one error line naming the target, no traceback."""
        target = f"127.0.0.1:{free_port()}"
        assert cli.main([*command, "--target", target]) == 1
        err = capsys.readouterr().err
        assert err.strip() == (
            f"error: UNAVAILABLE: nothing is listening at {target}; start a mesh with `llm-mesh up`"
        )


class FakeRouter(router_pb2_grpc.RouterServicer):
    """A router that answers "echo: <prompt>" in three chunks and records what it got."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.requests: list[generate_pb2.GenerateRequest] = []
        #: What ListWorkers says of discovery (None: nothing).
        self.discovery: router_pb2.DiscoveryStatus | None = None

    def _record(self, request, context) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))

    async def Generate(self, request, context):
        self._record(request, context)
        if request.prompt == "":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: must not be empty")
        return generate_pb2.GenerateResponse(
            request_id=request.request_id or "assigned-1",
            model=request.model,
            text=f"echo: {request.prompt}",
            summary=_summary(cached=request.sampling.temperature == 0),
        )

    async def GenerateStream(
        self, request, context
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        self._record(request, context)
        rid = request.request_id or "assigned-2"
        for piece in ("echo", ": ", request.prompt):
            yield generate_pb2.GenerateStreamResponse(request_id=rid, text=piece)
        if request.prompt != "no summary":
            yield generate_pb2.GenerateStreamResponse(request_id=rid, summary=_summary())

    async def ListWorkers(self, request, context):
        self._record(request, context)
        workers = [
            router_pb2.WorkerStatus(worker_id=f"worker-{i}", model="sim-llama-3.1-8b", engine="sim")
            for i in (1, 2)
        ]
        return router_pb2.ListWorkersResponse(
            workers=[w for w in workers if request.model in ("", w.model)],
            discovery=self.discovery,
        )


@pytest.fixture
async def fake_router() -> AsyncIterator[tuple[FakeRouter, str]]:
    """A FakeRouter served by grpc.aio on a free loopback port."""
    servicer = FakeRouter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def _main(*argv: str) -> int:
    return await asyncio.wait_for(asyncio.to_thread(cli.main, list(argv)), 20)


class TestGenerate:
    """llm-mesh generate against a router."""

    async def test_unary_prints_answer_then_summary(self, fake_router, capsys):
        """The answer goes to stdout, the summary line to stderr."""
        router, target = fake_router
        assert await _main("generate", "hello", "--target", target) == 0
        out, err = capsys.readouterr()
        assert out == "echo: hello\n"
        assert err == (
            "[cached] worker=worker-1 ttft=12.3ms total=80.0ms"
            " prompt_tokens=5 completion_tokens=16 finish=length"
            " request_id=assigned-1\n"
        )
        assert router.requests[0].sampling.temperature == 0.0

    async def test_stream_prints_chunks_then_summary(self, fake_router, capsys):
        """--stream prints every chunk's text in order and the final summary."""
        _, target = fake_router
        assert (
            await _main("generate", "hi", "--stream", "--request-id", "mine", "--target", target)
            == 0
        )
        out, err = capsys.readouterr()
        assert out == "echo: hi\n"
        assert err.startswith("[generated] worker=worker-1 ")
        assert err.rstrip().endswith("request_id=mine")

    async def test_stream_without_summary_is_an_error(self, fake_router, capsys):
        """A stream that ends without its summary chunk exits 1 and says so."""
        _, target = fake_router
        assert await _main("generate", "no summary", "--stream", "--target", target) == 1
        assert capsys.readouterr().err == "error: the stream ended without its final summary\n"

    async def test_tenant_travels_as_metadata(self, fake_router):
        """--tenant becomes the x-llmmesh-tenant metadata; without it none is sent."""
        router, target = fake_router
        assert await _main("generate", "a", "--tenant", "team-a", "--target", target) == 0
        assert await _main("generate", "a", "--target", target) == 0
        assert router.metadata[0]["x-llmmesh-tenant"] == "team-a"
        assert "x-llmmesh-tenant" not in router.metadata[1]

    async def test_server_error_is_one_line(self, fake_router, capsys):
        """A status from the router prints `error: CODE: details`, exit 1, no traceback."""
        _, target = fake_router
        assert await _main("generate", "", "--target", target) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err == "error: INVALID_ARGUMENT: prompt: must not be empty\n"


class TestWorkers:
    """llm-mesh workers prints the routing table."""

    async def test_prints_a_row_per_worker(self, fake_router, capsys):
        """A header and one line per worker."""
        _, target = fake_router
        assert await _main("workers", "--target", target) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("WORKER ")
        assert [line.split()[0] for line in lines[1:]] == ["worker-1", "worker-2"]

    async def test_no_workers_says_so(self, fake_router, capsys):
        """A filter that matches nothing says the router knows no workers."""
        router, target = fake_router
        assert await _main("workers", "--model", "none", "--target", target) == 0
        out, err = capsys.readouterr()
        assert out == ""
        assert err == f"the router at {target} knows no workers\n"
        assert router.requests[-1].model == "none"

    async def test_degraded_discovery_is_said_with_its_cause(self, fake_router, capsys):
        """Discovery that is not healthy is named, with why, before the table."""
        router, target = fake_router
        router.discovery = router_pb2.DiscoveryStatus(
            source="consul",
            target="http://127.0.0.1:8500 service llm-worker",
            healthy=False,
            last_error="its ACL default policy is deny and this router sends no ACL token",
        )
        assert await _main("workers", "--model", "none", "--target", target) == 0
        err = capsys.readouterr().err
        assert err.splitlines()[0] == (
            "warning: discovery (consul, http://127.0.0.1:8500 service llm-worker) is degraded: "
            "its ACL default policy is deny and this router sends no ACL token"
        )

    async def test_healthy_discovery_says_nothing(self, fake_router, capsys):
        router, target = fake_router
        router.discovery = router_pb2.DiscoveryStatus(source="consul", healthy=True)
        assert await _main("workers", "--target", target) == 0
        assert capsys.readouterr().err == ""
