"""Generate the Python gRPC stubs for tuneserve's API from proto/ into service/api/gen/, and TorchServe's
client stubs (from the descriptors inside its installed frontend jar) into service/packaging/ts_gen/.

The stubs are generated, not committed, so they can never drift from the contract in proto/.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "service" / "api" / "gen"
PACKAGE = "service.api.gen"
TS_OUT = ROOT / "service" / "packaging" / "ts_gen"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # protoc writes absolute imports rooted at proto/ ("from tuneserve.v1 import x_pb2"); make them
    # package-relative so the stubs import from inside the installed `service` package.
    for path in OUT.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^from tuneserve\.", f"from {PACKAGE}.tuneserve.", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for folder in [OUT, *[p for p in OUT.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return generate_torchserve_stubs()


def generate_torchserve_stubs() -> int:
    sys.path.insert(0, str(ROOT))
    from service.packaging.ts_protos import generate_stubs

    generate_stubs(TS_OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
