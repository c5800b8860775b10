#!/usr/bin/env python3
"""Fetches Modal's published protobuf descriptors for the proto-subset check.

Downloads the pinned `modal` wheel from PyPI with pip (no install, no dependencies), pulls the
serialized FileDescriptorProtos out of `modal_proto/api_pb2.py` and
`modal_proto/task_command_router_pb2.py` (the `AddSerializedFile(b'...')` literal, read with
`ast`, never executed), and writes them as one encoded FileDescriptorSet:

    ${TAILBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tailbox}/modal-<version>/descriptors.binpb

It prints that path. The Rust tests read it (see tailbox_testkit::modal_descriptors). Re-running
is a no-op once the file exists. Needs only python3 and pip.
"""

import ast
import os
import pathlib
import subprocess
import sys
import zipfile

MODAL_VERSION = "1.6.4"
MODULES = ["modal_proto/api_pb2.py", "modal_proto/task_command_router_pb2.py"]


def cache_dir() -> pathlib.Path:
    if os.environ.get("TAILBOX_CACHE_DIR"):
        return pathlib.Path(os.environ["TAILBOX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "tailbox"


def serialized_files(source: str) -> list:
    """Every bytes literal passed to AddSerializedFile(...) in a generated _pb2 module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            found.append(node.args[0].value)
    return found


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def main() -> int:
    target_dir = cache_dir() / f"modal-{MODAL_VERSION}"
    target = target_dir / "descriptors.binpb"
    if target.is_file() and target.stat().st_size > 0:
        print(target)
        return 0
    wheel_dir = target_dir / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"modal-{MODAL_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"modal=={MODAL_VERSION}",
             "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir), "--quiet"],
            check=True,
        )
        wheels = sorted(wheel_dir.glob(f"modal-{MODAL_VERSION}-*.whl"))
    if not wheels:
        print(f"pip did not produce a modal-{MODAL_VERSION} wheel in {wheel_dir}", file=sys.stderr)
        return 1
    # FileDescriptorSet { repeated FileDescriptorProto file = 1; }: each file is field 1, LEN.
    encoded = bytearray()
    with zipfile.ZipFile(wheels[0]) as wheel:
        for module in MODULES:
            files = serialized_files(wheel.read(module).decode("utf-8"))
            if len(files) != 1:
                print(f"{module}: expected one AddSerializedFile literal, found {len(files)}",
                      file=sys.stderr)
                return 1
            encoded += b"\x0a" + varint(len(files[0])) + files[0]
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(bytes(encoded))
    tmp.replace(target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
