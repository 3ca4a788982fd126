"""Regenerate the committed gRPC stubs from fedray/bridge/proto/*.proto.

Run from anywhere: ``python scripts/gen_proto.py``. With ``--check`` it writes to a temporary
folder and exits 1 when the committed stubs differ (tests/test_proto_stubs.py uses it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "fedray" / "bridge" / "proto"


def generate(out_root: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # only needed by developers

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    for proto in protos:
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted((out_root / "fedray" / "bridge" / "proto").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(Path(tmp))
            stale = [f.name for f in fresh if not filecmp.cmp(f, PROTO_DIR / f.name, shallow=False)
                     if (PROTO_DIR / f.name).exists()]
            missing = [f.name for f in fresh if not (PROTO_DIR / f.name).exists()]
            if stale or missing:
                print(f"stale stubs: {stale + missing}; run python scripts/gen_proto.py")
                return 1
            print("stubs are up to date")
            return 0
    generate(ROOT)
    print(f"regenerated stubs in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
