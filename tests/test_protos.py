"""The contract: protos lint clean and the committed stubs are what they generate."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmmesh.v1 import generate_pb2
from tests.harness import ROOT

BUF = ROOT / "node_modules" / ".bin" / "buf"


class TestProtos:
    """protos/llmmesh/v1 and llmmesh/v1."""

    def test_committed_stubs_are_fresh(self) -> None:
        """Regenerating the stubs changes nothing (else: run scripts/gen_protos.py)."""
        result = subprocess.run(
            [sys.executable, "scripts/gen_protos.py", "--check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_stale_stub_is_detected(self, tmp_path: Path) -> None:
        """The freshness check fails when a committed stub differs from the generated one."""
        sys.path.insert(0, str(ROOT / "scripts"))
        try:
            gen_protos = importlib.import_module("gen_protos")
        finally:
            sys.path.pop(0)
        gen_protos.generate(tmp_path)
        generated = tmp_path / "llmmesh" / "v1"
        committed = tmp_path / "committed"
        shutil.copytree(generated, committed)
        assert gen_protos.stale_files(generated, committed) == []
        (committed / "router_pb2.py").write_text("# edited by hand\n")
        assert gen_protos.stale_files(generated, committed) == ["router_pb2.py"]

    def test_buf_lint_is_clean(self) -> None:
        """`buf lint` finds nothing in protos/."""
        if not BUF.exists():
            pytest.skip("buf is not installed: run `npm ci` (./scripts/test does)")
        result = subprocess.run(
            [str(BUF), "lint", "protos"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_message_and_field_is_documented(self) -> None:
        """Every message, field, enum value, service and RPC in protos/ has a leading comment."""
        undocumented: list[str] = []
        for proto in sorted((ROOT / "protos").rglob("*.proto")):
            lines = proto.read_text().splitlines()
            for i, line in enumerate(lines):
                stripped = line.strip()
                declares = stripped.startswith(("message ", "enum ", "service ", "rpc ")) or (
                    stripped.endswith(";")
                    and "=" in stripped
                    and not stripped.startswith(("syntax", "option", "package", "import", "//"))
                )
                if declares and not lines[i - 1].strip().startswith("//"):
                    undocumented.append(f"{proto.name}:{i + 1}: {stripped}")
        assert undocumented == []

    def test_package_is_llmmesh_v1(self) -> None:
        """The generated messages live in the llmmesh.v1 proto package."""
        assert generate_pb2.DESCRIPTOR.package == "llmmesh.v1"

    def test_failover_fields_are_in_the_contract(self) -> None:
        """GenerateRequest carries continuation and failover; the summary attempts and workers,
        under their own field numbers (additive to v1)."""
        request = generate_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
        assert (request["continuation"].number, request["continuation"].type) == (
            9,
            request["continuation"].TYPE_STRING,
        )
        assert request["failover"].number == 10
        assert request["failover"].enum_type is generate_pb2.FailoverPolicy.DESCRIPTOR
        assert generate_pb2.FailoverPolicy.items() == [
            ("FAILOVER_POLICY_UNSPECIFIED", 0),
            ("FAILOVER_POLICY_DISABLED", 1),
        ]
        summary = generate_pb2.GenerationSummary.DESCRIPTOR.fields_by_name
        assert (summary["attempts"].number, summary["attempts"].type) == (
            7,
            summary["attempts"].TYPE_UINT32,
        )
        assert summary["workers"].number == 8
        assert summary["workers"].is_repeated
        # The defaults mean "as before": continue on failure, nothing to continue from.
        assert generate_pb2.GenerateRequest().continuation == ""
        assert generate_pb2.GenerateRequest().failover == generate_pb2.FAILOVER_POLICY_UNSPECIFIED
