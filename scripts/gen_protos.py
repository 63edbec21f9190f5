"""Regenerate the committed Python stubs in llmmesh/v1/ from protos/llmmesh/v1/*.proto.

Usage: python scripts/gen_protos.py [--check]

--check regenerates into a temporary directory and exits 1 (listing the files) when the committed
stubs differ, so CI catches a .proto edited without regenerating. The generators are pinned exactly
in pyproject.toml's dev extra, because their version is written into the output.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = Path("llmmesh") / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC stubs for the llmmesh.v1 API. Do not edit."""\n'


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = shutil.which(name, path=str(scripts)) or shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> None:
    """Write the stubs for every proto under protos/ into out_dir/llmmesh/v1/."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        *protos,
    ]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"protoc failed:\n{result.stderr}")
    (out_dir / OUT_PACKAGE / "__init__.py").write_text(INIT_TEXT)
    (out_dir / OUT_PACKAGE / "py.typed").write_text("")


def stale_files(generated: Path, committed: Path) -> list[str]:
    """Names of files that differ, are missing, or are extra in the committed directory."""
    names = {p.name for p in generated.iterdir()} | {
        p.name for p in committed.glob("*") if p.is_file()
    }
    stale = []
    for name in sorted(names):
        a, b = generated / name, committed / name
        if not (a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)):
            stale.append(name)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stubs are stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        committed = ROOT / OUT_PACKAGE
        if args.check:
            stale = stale_files(out / OUT_PACKAGE, committed)
            if stale:
                print(
                    "generated stubs are stale; run `python scripts/gen_protos.py`:",
                    *stale,
                    sep="\n  ",
                )
                return 1
            print("generated stubs are up to date")
            return 0
        shutil.rmtree(committed, ignore_errors=True)
        shutil.copytree(out / OUT_PACKAGE, committed)
        print(f"wrote {committed.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
