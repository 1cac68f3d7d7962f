"""Generates the Python modules and typed stubs for protos/ (the one way they are made).

`make proto` writes them into client/ (they are committed, so the client installs without
grpcio-tools); tests/unit/test_proto_fresh.py runs this into a temporary directory and fails when
the committed copy differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_FILES = ("imagegen/v1/imagegen.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc with the Python, gRPC and mypy-protobuf plugins; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The mypy-protobuf plugins sit beside this interpreter, which need not be on PATH.
    bin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted(
        out_dir / Path(proto).with_suffix("").parent / (Path(proto).stem + suffix)
        for proto in PROTO_FILES
        for suffix in GENERATED_SUFFIXES
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "client")
    written = generate(parser.parse_args().out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
