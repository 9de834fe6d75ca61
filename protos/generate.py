"""Regenerate the Python gRPC stubs from ``protos/dvd/v1/*.proto``.

    python -m protos.generate          # rewrite the committed stubs
    python -m protos.generate --check  # exit 1 if the committed stubs are stale

The generated modules import each other with package-relative imports, so they work as
``protos.dvd.v1.*`` wherever the package is installed.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE_DIR = PROTO_ROOT / "dvd" / "v1"
_ABSOLUTE_IMPORT = re.compile(r"^from dvd\.v1 import (\w+_pb2) as", re.MULTILINE)


def generated_names(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every .proto into ``out_root`` (mirroring ``dvd/v1``); return the files."""
    from grpc_tools import protoc

    protos = sorted(PROTO_PACKAGE_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for proto in protos:
        for name in generated_names(proto):
            path = out_root / "dvd" / "v1" / name
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as", path.read_text())
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = PROTO_PACKAGE_DIR / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(committed)
                if not args.check:
                    committed.write_text(path.read_text())
    if args.check and stale:
        names = ", ".join(p.name for p in stale)
        print(f"stale generated stubs: {names}; run `python -m protos.generate`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
