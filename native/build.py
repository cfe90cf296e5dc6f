"""Build every generated or compiled artifact of the package, in place.

    python native/build.py [--package-dir DIR]

1. gRPC/protobuf code from proto/ into DIR/_proto (never hand-edited),
2. the cffi extension deltabox._native from native/src,
3. the static sandbox init native/init -> DIR/_bin/deltabox-init.

setup.py calls the same `build_all` for wheels, with the native parts (2 and 3) optional:
where there is no C compiler or cffi they are skipped with a warning, and the package is
then the client only. Run by hand, every step is required. Each step is skipped when its
output is newer than its inputs, so a second run takes a fraction of a second.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
NATIVE_DIR = ROOT / "native"


def _newer(outputs: list[Path], inputs: list[Path]) -> bool:
    if not all(p.exists() for p in outputs):
        return False
    oldest_out = min(p.stat().st_mtime for p in outputs)
    return all(p.stat().st_mtime <= oldest_out for p in inputs)


def build_protos(package_dir: Path) -> None:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    out = package_dir / "_proto"
    outputs = [out / p.relative_to(PROTO_DIR).with_name(p.stem + "_pb2.py") for p in protos]
    if _newer(outputs + [out / "__init__.py"], protos + [Path(__file__)]):
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes absolute imports ("from deltabox.v1 import x_pb2") that would
    # resolve against our own package; point them into deltabox._proto instead.
    for py in out.rglob("*.py"):
        text = py.read_text()
        fixed = re.sub(r"^from (deltabox\.v1|criu) import", r"from deltabox._proto.\1 import",
                       text, flags=re.M)
        py.write_text(fixed)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def build_native(package_dir: Path) -> None:
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = package_dir / f"_native{suffix}"
    sources = list((NATIVE_DIR / "src").iterdir()) + [NATIVE_DIR / "build_ffi.py"]
    if _newer([target], sources):
        return
    sys.path.insert(0, str(NATIVE_DIR))
    try:
        from build_ffi import ffibuilder
    finally:
        sys.path.pop(0)
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        shutil.copy2(built, target)


def build_init(package_dir: Path) -> None:
    out = package_dir / "_bin" / "deltabox-init"
    init_dir = NATIVE_DIR / "init"
    inputs = ["deltabox-init.c", "Makefile", "seccomp-allow.txt", "gen_seccomp.py"]
    if _newer([out], [init_dir / name for name in inputs]):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["make", "-s", "-C", str(init_dir), f"OUT={out}"], check=True,
                   env={**os.environ, "MAKEFLAGS": ""})


def build_all(package_dir: Path, native_optional: bool = False) -> bool:
    """Build everything into `package_dir`. The generated code is always built (the client
    needs it). With `native_optional` (setup.py: a client-only install needs no compiler),
    a native part that cannot be built is skipped with a warning; returns whether both
    native parts were built."""
    build_protos(package_dir)
    try:
        build_native(package_dir)
        build_init(package_dir)
    except Exception as e:  # noqa: BLE001 - cffi missing, no compiler, make failed...
        if not native_optional:
            raise
        reason = f"{type(e).__name__}: {e}".strip()
        print(f"""
WARNING: deltabox's native parts were NOT built ({reason[:300]}).
  The client works without them; the daemon (`deltabox daemon`) refuses to start.
  To build them: install a C compiler, make and static libc (apt-get install
  build-essential) and cffi, then reinstall: pip install 'deltabox[server]'.
""", file=sys.stderr, flush=True)
        return False
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package-dir", type=Path, default=ROOT / "deltabox")
    build_all(parser.parse_args().package_dir.resolve())
