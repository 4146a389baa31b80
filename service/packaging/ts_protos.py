"""Generate Python gRPC client stubs for TorchServe from the descriptors inside its frontend jar.

TorchServe's pip package ships no `.proto` files, but the jar's protobuf-java classes
(`org/pytorch/serve/grpc/inference/Inference.class`, `.../management/Management.class`) hold each file's
serialized FileDescriptorProto as Java string constants. We read them from the class constant pool,
so the stubs always match the TorchServe that is installed, and no proto text is copied from elsewhere.
"""

from __future__ import annotations

import importlib
import re
import struct
import tempfile
import zipfile
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

DESCRIPTOR_CLASSES = {
    "inference.proto": "org/pytorch/serve/grpc/inference/Inference.class",
    "management.proto": "org/pytorch/serve/grpc/management/Management.class",
}
GEN_PACKAGE = "service.packaging.ts_gen"
# protoc's Java generator splits descriptor bytes into string constants of this many characters.
_JAVA_DESCRIPTOR_PIECE = 16000


def frontend_jar() -> Path:
    """The installed TorchServe frontend jar."""
    import ts  # deferred: only the generator needs TorchServe's package location

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def read_utf8_constants(class_bytes: bytes) -> list[bytes]:
    """The raw CONSTANT_Utf8 entries of a Java class file's constant pool, in pool order."""
    if class_bytes[:4] != b"\xca\xfe\xba\xbe":
        raise ValueError("not a Java class file (bad magic)")
    (count,) = struct.unpack(">H", class_bytes[8:10])
    pos, index, found = 10, 1, []
    while index < count:
        tag = class_bytes[pos]
        pos += 1
        if tag == 1:  # Utf8: u2 length, bytes
            (length,) = struct.unpack(">H", class_bytes[pos : pos + 2])
            found.append(class_bytes[pos + 2 : pos + 2 + length])
            pos += 2 + length
        elif tag in (3, 4, 9, 10, 11, 12, 17, 18):
            pos += 4
        elif tag in (5, 6):  # Long and Double take two pool slots
            pos += 8
            index += 1
        elif tag in (7, 8, 16, 19, 20):
            pos += 2
        elif tag == 15:
            pos += 3
        else:
            raise ValueError(f"unknown constant pool tag {tag} at byte {pos - 1}")
        index += 1
    return found


def decode_modified_utf8(raw: bytes) -> list[int]:
    """Java's modified UTF-8 to code points (descriptor strings only use U+0000..U+00FF)."""
    points, i = [], 0
    while i < len(raw):
        byte = raw[i]
        if byte < 0x80:
            points.append(byte)
            i += 1
        elif byte >> 5 == 0b110:
            points.append(((byte & 0x1F) << 6) | (raw[i + 1] & 0x3F))
            i += 2
        else:
            points.append(((byte & 0x0F) << 12) | ((raw[i + 1] & 0x3F) << 6) | (raw[i + 2] & 0x3F))
            i += 3
    return points


def extract_file_descriptor(class_bytes: bytes, proto_name: str) -> descriptor_pb2.FileDescriptorProto:
    """Find `proto_name`'s serialized FileDescriptorProto among a class's string constants."""
    name = proto_name.encode()
    # A FileDescriptorProto starts with field 1 (name): tag 0x0A, length, the file name.
    header = b"\n" + bytes([len(name)]) + name
    pieces: list[bytes] = []
    for constant in read_utf8_constants(class_bytes):
        points = decode_modified_utf8(constant)
        if max(points, default=0) > 0xFF:
            if pieces:
                break
            continue
        data = bytes(points)
        if not pieces and not data.startswith(header):
            continue
        pieces.append(data)
        if len(points) != _JAVA_DESCRIPTOR_PIECE:  # a shorter piece is the last one
            break
    if not pieces:
        raise ValueError(f"no serialized descriptor for {proto_name} in the class constant pool")
    raw = b"".join(pieces)
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    if proto.name != proto_name or proto.SerializeToString() != raw:
        raise ValueError(f"the descriptor found for {proto_name} does not round-trip; the jar layout changed")
    return proto


def build_descriptor_set(jar: Path) -> descriptor_pb2.FileDescriptorSet:
    """TorchServe's two files plus every file they import, dependencies first (as protoc expects)."""
    with zipfile.ZipFile(jar) as archive:
        ours = [extract_file_descriptor(archive.read(cls), name) for name, cls in DESCRIPTOR_CLASSES.items()]
    # The imports' descriptors come from the protobuf runtime's own generated modules (importing them
    # registers their files in the default pool).
    for module in ("google.protobuf.empty_pb2", "google.rpc.status_pb2"):
        importlib.import_module(module)

    pool = descriptor_pool.Default()
    ordered: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def add_with_dependencies(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        proto = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(name).CopyToProto(proto)
        for dependency in proto.dependency:
            add_with_dependencies(dependency)
        ordered.append(proto)

    for proto in ours:
        for dependency in proto.dependency:
            add_with_dependencies(dependency)
    return descriptor_pb2.FileDescriptorSet(file=[*ordered, *ours])


def generate_stubs(out_dir: Path, jar: Path | None = None) -> list[Path]:
    """Write inference/management `_pb2`, `_pb2_grpc` and `.pyi` modules into out_dir (a package)."""
    from grpc_tools import protoc  # deferred: a build-time tool

    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor_set = build_descriptor_set(jar or frontend_jar())
    with tempfile.TemporaryDirectory() as tmp:
        set_path = Path(tmp) / "torchserve.pb"
        set_path.write_bytes(descriptor_set.SerializeToString())
        args = [
            "protoc",
            f"--descriptor_set_in={set_path}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *DESCRIPTOR_CLASSES,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed to generate the TorchServe stubs")
    written = sorted(out_dir.glob("*_pb2*.py*"))
    # protoc imports sibling modules as top-level names ("import inference_pb2"); make them package-relative.
    for path in written:
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as ", rf"from {GEN_PACKAGE} import \1 as ", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    (out_dir / "__init__.py").touch()
    return written
