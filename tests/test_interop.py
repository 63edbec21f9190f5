"""Clients that are not Python call the router's public API on a real mesh on loopback.

- a Node client built at runtime from ``protos/`` (``examples/node/generate.mjs``, @grpc/grpc-js);
- raw HTTP/2 with pre-encoded gRPC frames: ``h2load`` for many requests and ``nghttp`` to read the
  response frames and trailers of one.

The Python stub's answer to the same deterministic request is the reference.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.v1 import generate_pb2, router_pb2_grpc
from tests.grpc_frames import decode_frames, encode_frame, write_frame_file
from tests.harness import ROOT, ServiceProcess, assert_eventually

NODE = shutil.which("node")
H2LOAD = shutil.which("h2load")
NGHTTP = shutil.which("nghttp")
NODE_CLIENT = ROOT / "examples" / "node" / "generate.mjs"
NODE_MODULES = ROOT / "node_modules" / "@grpc"
MODEL = "sim-llama-3.1-8b"
PROMPT = "Explain least-loaded routing in one paragraph."
MAX_TOKENS = 24
GRPC_HEADERS = ("-H", "content-type: application/grpc", "-H", "te: trailers")
TOOL_TIMEOUT = 20.0
# A fast sim (delays / 10), and no fixed metrics port to collide with other tests.
WORKER_ARGS = ("--engine", "sim", "--sim-speed-factor", "10", "--metrics-port", "0")

needs_node = pytest.mark.skipif(
    NODE is None or not (NODE_MODULES / "grpc-js").is_dir(),
    reason="needs `node` on PATH and node_modules/@grpc (run `npm ci` at the repository root)",
)
needs_h2load = pytest.mark.skipif(
    H2LOAD is None, reason="needs h2load (apt-get install -y nghttp2-client)"
)
needs_nghttp = pytest.mark.skipif(
    NGHTTP is None, reason="needs nghttp (apt-get install -y nghttp2-client)"
)


def deterministic_request(prompt: str = PROMPT) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
    )


@dataclass
class Mesh:
    worker: ServiceProcess
    router: ServiceProcess

    def router_generate_requests(self, code: str) -> float:
        """The router's count of Generate RPCs that ended with ``code`` (a gRPC status name)."""
        url = f"http://127.0.0.1:{self.router.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "llmmesh_router_requests":
                for sample in family.samples:
                    labels = sample.labels
                    if sample.name.endswith("_total") and labels == {
                        "method": "Generate",
                        "code": code,
                    }:
                        return sample.value
        return 0.0


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """One sim worker and a router without a cache, both real processes on loopback."""
    with (
        ServiceProcess("worker", WORKER_ARGS) as worker,
        ServiceProcess(
            "router",
            ["--workers", worker.address, "--cache-address", "", "--metrics-port", "0"],
        ) as router,
    ):
        yield Mesh(worker, router)


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[router_pb2_grpc.RouterAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@pytest.fixture
async def reference(stub: router_pb2_grpc.RouterAsyncStub) -> generate_pb2.GenerateResponse:
    """The Python stub's answer to the deterministic request."""
    response = await stub.Generate(deterministic_request(), timeout=TOOL_TIMEOUT)
    assert response.text, "the reference answer is empty: nothing to compare"
    return response


@dataclass
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_tool(*argv: str, cwd: Path | None = None) -> Completed:
    """Run a command to completion, killing it past TOOL_TIMEOUT."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, stdout, stderr)


async def run_node(mesh: Mesh, args: Sequence[str], cwd: Path) -> Completed:
    assert NODE is not None
    return await run_tool(NODE, str(NODE_CLIENT), "--target", mesh.router.address, *args, cwd=cwd)


NODE_DETERMINISTIC = ("--model", MODEL, "--max-tokens", str(MAX_TOKENS), "--temperature", "0")


@needs_node
class TestNodeClient:
    """A Node client built from the .proto files calls Router/Generate and GenerateStream."""

    async def test_unary_generate_returns_the_python_stubs_text(
        self, mesh: Mesh, reference: generate_pb2.GenerateResponse, tmp_path: Path
    ) -> None:
        """Generate from Node answers the deterministic request with the Python stub's text."""
        result = await run_node(mesh, [*NODE_DETERMINISTIC, "--json", PROMPT], cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        answer = result.json()
        assert answer["text"] == reference.text
        assert answer["request_id"]
        summary = answer["summary"]
        assert summary["finish_reason"] == generate_pb2.FinishReason.Name(
            reference.summary.finish_reason
        )
        assert summary["usage"]["completion_tokens"] == reference.summary.usage.completion_tokens

    async def test_stream_chunks_add_up_to_the_text_and_end_with_the_summary(
        self, mesh: Mesh, reference: generate_pb2.GenerateResponse, tmp_path: Path
    ) -> None:
        """GenerateStream from Node: the chunks concatenate to the text; the last has a summary."""
        result = await run_node(
            mesh, [*NODE_DETERMINISTIC, "--stream", "--json", PROMPT], cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr.decode()
        chunks = result.json()["chunks"]
        assert len(chunks) >= 2, "the answer did not arrive as a stream"
        assert "".join(chunk["text"] for chunk in chunks) == reference.text
        assert all(chunk["summary"] is None for chunk in chunks[:-1])
        final = chunks[-1]["summary"]
        assert final is not None
        assert final["finish_reason"] not in ("", "FINISH_REASON_UNSPECIFIED")
        assert final["finish_reason"] == generate_pb2.FinishReason.Name(
            reference.summary.finish_reason
        )

    async def test_stream_prints_the_text_and_a_summary_line(
        self, mesh: Mesh, reference: generate_pb2.GenerateResponse, tmp_path: Path
    ) -> None:
        """Without --json the text goes to stdout and a one-line summary to stderr."""
        result = await run_node(mesh, [*NODE_DETERMINISTIC, "--stream", PROMPT], cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode() == reference.text + "\n"
        assert re.search(r"worker \S+ \| finish \w+ \| tokens \d+\+\d+", result.stderr.decode())

    @pytest.mark.parametrize("mode", [(), ("--stream",)], ids=["unary", "stream"])
    async def test_empty_prompt_is_invalid_argument_naming_the_field(
        self, mesh: Mesh, mode: tuple[str, ...], tmp_path: Path
    ) -> None:
        """An empty prompt from Node gets INVALID_ARGUMENT naming `prompt`, and exit status 1."""
        result = await run_node(mesh, [*mode, "--model", MODEL, ""], cwd=tmp_path)
        assert result.returncode == 1
        error = result.stderr.decode().strip()
        assert error.startswith("error: INVALID_ARGUMENT: "), error
        assert "prompt" in error.removeprefix("error: INVALID_ARGUMENT: ")
        assert "Traceback" not in error


@dataclass
class H2loadRun:
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int
    output: str


def parse_h2load(output: str) -> H2loadRun:
    """The request counts, status classes and DATA bytes of h2load's report."""
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored",
        output,
    )
    statuses = re.search(r"status codes: (\d+) 2xx", output)
    data = re.search(r"traffic: .*, \S+ \((\d+)\) data", output)
    assert requests, f"unexpected h2load output:\n{output}"
    assert statuses, f"unexpected h2load output:\n{output}"
    assert data, f"unexpected h2load output:\n{output}"
    total, started, done, succeeded, failed, errored = map(int, requests.groups())
    return H2loadRun(
        total=total,
        started=started,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        status_2xx=int(statuses.group(1)),
        data_bytes=int(data.group(1)),
        output=output,
    )


async def h2load(mesh: Mesh, frame: Path, *, n: int, verbose: bool = False) -> H2loadRun:
    assert H2LOAD is not None
    result = await run_tool(
        H2LOAD,
        *("-n", str(n), "-c", "2", "-m", "4"),
        *(["-v"] if verbose else []),
        *GRPC_HEADERS,
        *("-d", str(frame)),
        f"http://{mesh.router.address}/llmmesh.v1.Router/Generate",
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, output + result.stderr.decode(errors="replace")
    return parse_h2load(output)


@needs_h2load
class TestH2load:
    """h2load drives Router/Generate with pre-encoded gRPC frames over cleartext HTTP/2."""

    async def test_every_request_gets_a_real_answer(
        self, mesh: Mesh, reference: generate_pb2.GenerateResponse, tmp_path: Path
    ) -> None:
        """N requests all succeed: HTTP 200, a response message each, counted OK by the router."""
        n = 20
        frame = write_frame_file(tmp_path / "generate.bin", deterministic_request())
        ok_before = mesh.router_generate_requests("OK")
        run = await h2load(mesh, frame, n=n)
        assert (run.total, run.started, run.done, run.succeeded) == (n, n, n, n), run.output
        assert (run.failed, run.errored, run.status_2xx) == (0, 0, n), run.output
        # A gRPC error is a trailers-only response with no DATA; each answer is one frame.
        assert run.data_bytes >= n * (5 + len(reference.text.encode())), run.output
        await assert_eventually(
            lambda: mesh.router_generate_requests("OK") - ok_before == n,
            timeout=5,
            message=f"the router did not count {n} Generate RPCs ending OK",
        )

    async def test_an_invalid_request_is_http_200_but_grpc_invalid_argument(
        self, mesh: Mesh, tmp_path: Path
    ) -> None:
        """HTTP succeeds for a bad request; the gRPC status is INVALID_ARGUMENT and is counted."""
        n = 3
        frame = write_frame_file(tmp_path / "bad.bin", deterministic_request(prompt=""))
        invalid_before = mesh.router_generate_requests("INVALID_ARGUMENT")
        run = await h2load(mesh, frame, n=n, verbose=True)
        assert (run.succeeded, run.status_2xx, run.data_bytes) == (n, n, 0), run.output
        # h2load -v prints a trailers-only response's headers, which carry the status.
        assert len(re.findall(r"\] grpc-status: 3$", run.output, re.MULTILINE)) == n, run.output
        assert re.search(r"\] grpc-message: .*prompt", run.output), run.output
        await assert_eventually(
            lambda: mesh.router_generate_requests("INVALID_ARGUMENT") - invalid_before == n,
            timeout=5,
            message=f"the router did not count {n} Generate RPCs ending INVALID_ARGUMENT",
        )


@needs_nghttp
class TestRawHttp2Response:
    """A raw HTTP/2 POST gets gRPC frames that decode to the Python stub's answer."""

    async def test_response_frames_and_trailers(
        self, mesh: Mesh, reference: generate_pb2.GenerateResponse, tmp_path: Path
    ) -> None:
        """nghttp's response body is one GenerateResponse frame; the trailers say grpc-status 0."""
        assert NGHTTP is not None
        frame = write_frame_file(tmp_path / "generate.bin", deterministic_request())
        url = f"http://{mesh.router.address}/llmmesh.v1.Router/Generate"
        body, verbose = await asyncio.gather(
            run_tool(NGHTTP, *GRPC_HEADERS, "-d", str(frame), url),
            run_tool(NGHTTP, "-v", *GRPC_HEADERS, "-d", str(frame), url),
        )
        assert body.returncode == 0, body.stderr.decode(errors="replace")
        (payload,) = decode_frames(body.stdout)
        response = generate_pb2.GenerateResponse.FromString(payload)
        assert response.text == reference.text
        assert response.summary.finish_reason == reference.summary.finish_reason
        trailers = verbose.stdout.decode(errors="replace")
        assert re.search(r"\) grpc-status: 0$", trailers, re.MULTILINE), trailers


class TestGrpcFrames:
    """The frame helper round-trips messages and rejects what it cannot read."""

    def test_round_trip(self) -> None:
        """Frames decode to the messages encoded, in order."""
        messages = [deterministic_request("a"), deterministic_request("b" * 300)]
        data = b"".join(encode_frame(m) for m in messages)
        decoded = [generate_pb2.GenerateRequest.FromString(p) for p in decode_frames(data)]
        assert decoded == messages
        assert encode_frame(b"xyz") == b"\x00\x00\x00\x00\x03xyz"

    @pytest.mark.parametrize(
        "data",
        [b"\x00\x00\x00", b"\x00\x00\x00\x00\x05abc", b"\x01\x00\x00\x00\x01a"],
        ids=["short-header", "short-payload", "compressed"],
    )
    def test_rejects_truncated_or_compressed(self, data: bytes) -> None:
        """A frame cut short, or a compressed one, is a ValueError."""
        with pytest.raises(ValueError, match=r"truncated|declares|compressed"):
            decode_frames(data)
