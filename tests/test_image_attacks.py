"""Hostile images: every one is refused with InvalidArgument, in seconds, and leaves nothing
behind -- neither in the store (no layer, no work dir in store/tmp) nor on the host (a marker
directory the image aims at stays as it was).

The archives are crafted by hand with `tarfile` (layer tars, `docker save` archives) or as
directories (OCI layouts), each aiming at one way out of the layer being built: `..` and
absolute names, writes and hardlinks through symlinks (the image's own or planted ones),
whiteouts naming `.`/`..`, symlink loops in archives, OCI index cycles, digests that are
paths, blobs that are FIFOs, metadata headers that make parsers allocate or backtrack, and
tar bombs against the daemon's --max-image-bytes / --max-image-entries.

They run against a daemon of their own with small limits, so a regression that hangs an
import cannot wedge the session's daemon.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import deltabox
from conftest import DaemonProcess, leftovers
from test_images import Layer

LIMIT_BYTES = 16 << 20
LIMIT_ENTRIES = 3000
DEADLINE_S = 20  # "seconds, not minutes": generous for a loaded 2-core VM


@pytest.fixture(scope="module")
def hostile(workdir):
    """A daemon with small import limits; checked for leftovers when the module ends."""
    d = DaemonProcess(workdir / f"hostile-{uuid.uuid4().hex[:6]}", extra_args=(
        "--max-image-bytes", str(LIMIT_BYTES), "--max-image-entries", str(LIMIT_ENTRIES)))
    d.start()
    yield d
    assert d.stop() == 0, d.log()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}


@pytest.fixture
def outside(tmp_path):
    """A host directory images aim at; `outside.check()` asserts it is unchanged."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret").write_text("host secret\n")
    (d / "sub").mkdir()

    def snapshot():
        return sorted((str(p.relative_to(d)), p.lstat().st_mode, p.lstat().st_size)
                      for p in d.rglob("*"))
    before = snapshot()

    class Outside:
        path = d

        @staticmethod
        def check():
            assert snapshot() == before, "an import wrote outside its layer"
    return Outside


def layer_dirs(d) -> set[str]:
    return {p.name for p in (d.state_dir / "store" / "layers").iterdir()}


def tmp_dirs(d) -> set[str]:
    return {p.name for p in (d.state_dir / "store" / "tmp").iterdir()}


def import_timed(d, src: Path, name: str = "hostile", progress=None):
    """Import in a thread: (exception or None, image, seconds); fails if it outlives
    DEADLINE_S (a hang must not hang the test run)."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            with d.client() as c:
                out["image"] = c.import_image(name, src, progress=progress)
        except Exception as e:  # noqa: BLE001 -- handed to the test
            out["exc"] = e
        out["s"] = time.monotonic() - t0
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert not t.is_alive(), f"importing {src.name} did not finish within {DEADLINE_S} s"
    return out.get("exc"), out.get("image"), out["s"]


def refused(d, src: Path, match: str | None = None) -> str:
    """The import of `src` fails with InvalidArgument (matching `match`), quickly, and
    leaves no layer, no work dir and no image record. Returns the message."""
    before = layer_dirs(d)
    exc, image, seconds = import_timed(d, src)
    if image is not None:  # remove it, or every later test of this module fails too
        with d.client() as c:
            c.remove_image("hostile")
    assert image is None, f"{src.name} was imported"
    assert seconds < 10, f"refusing {src.name} took {seconds:.1f} s"
    assert isinstance(exc, deltabox.InvalidArgument), repr(exc)
    if match:
        assert match.lower() in exc.message.lower(), exc.message
    assert layer_dirs(d) == before
    assert not tmp_dirs(d), "a refused import left work in store/tmp"
    with d.client() as c:
        assert "hostile" not in {i.name for i in c.list_images()}
    return exc.message


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def up(n: int = 40) -> str:
    """Enough `../` to reach / from any layer directory."""
    return "../" * n


# ---- layer tarballs: names, symlinks, hardlinks ---------------------------------------------

def _cases(o: str) -> dict[str, tuple[Layer, str]]:
    rel_o = up() + o.lstrip("/")
    return {
        "dotdot": (Layer().file(rel_o + "/pwned", b"x"), ".."),
        "dotdot-inside": (Layer().dir("a").file("a/../b", b"x"), ".."),
        "dotdot-dir": (Layer().dir("a/..").file("a/../pwned", b"x"), ".."),
        "absolute": (Layer().file(o + "/pwned", b"x"), "absolute"),
        "absolute-dir": (Layer().dir(o + "/sub").file(o + "/sub/pwned", b"x"), "absolute"),
        "symlink-abs-then-write": (Layer().symlink("a", o).file("a/pwned", b"x"), "symlink"),
        "symlink-rel-then-write": (Layer().symlink("a", rel_o).file("a/pwned", b"x"),
                                   "symlink"),
        "symlink-chain-then-write": (Layer().symlink("a", "b").symlink("b", o)
                                     .file("a/pwned", b"x"), "symlink"),
        "symlink-inside-then-write": (Layer().dir("d").symlink("s", "d").file("s/x", b"x"),
                                      "symlink"),
        "symlink-replaces-dir": (Layer().dir("a").file("a/f", b"f").symlink("a", o)
                                 .file("a/pwned", b"x"), "symlink"),
        "symlink-then-dir": (Layer().symlink("a", o).dir("a/sub2"), "symlink"),
        "hardlink-absolute": (Layer().hardlink("h", o + "/secret"), "absolute"),
        "hardlink-dotdot": (Layer().hardlink("h", rel_o + "/secret"), ".."),
        "hardlink-through-symlink": (Layer().symlink("s", o).hardlink("h", "s/secret"),
                                     "symlink"),
        "hardlink-through-inner-symlink": (Layer().dir("d").file("d/f", b"f").symlink("s", "d")
                                           .hardlink("h", "s/f"), "symlink"),
        "hardlink-missing": (Layer().hardlink("h", "nosuchfile"), "nosuchfile"),
        "hardlink-to-dir": (Layer().dir("d").hardlink("h", "d"), "directory"),
        "root-is-symlink": (Layer().symlink(".", o).file("pwned", b"x"), "root"),
        "root-is-file": (Layer().file("./", b"x"), "root"),
    }


CASES = list(_cases("/o"))


@pytest.mark.parametrize("case", CASES)
def test_path_attacks_are_refused(hostile, outside, tmp_path, case):
    lay, match = _cases(str(outside.path))[case]
    src = write(tmp_path / f"{case}.tar", lay.bytes())
    refused(hostile, src, match)
    outside.check()


@pytest.mark.parametrize("case", ["symlink-abs-then-write", "absolute", "hardlink-dotdot"])
def test_path_attacks_in_upper_layers_are_refused(hostile, outside, tmp_path, case):
    """The same, as the second layer of a `docker save` archive and gzip-compressed."""
    from test_images import docker_archive
    lay, match = _cases(str(outside.path))[case]
    base = Layer().dir("etc").file("etc/hostname", b"base\n").bytes()
    src = write(tmp_path / f"{case}-docker.tar",
                docker_archive([base, gzip.compress(lay.bytes())]))
    refused(hostile, src, match)
    outside.check()


# ---- whiteouts ------------------------------------------------------------------------------

WHITEOUTS = {
    "wh-empty": Layer().file(".wh."),
    "wh-dot": Layer().file(".wh.."),
    "wh-dotdot": Layer().file(".wh..."),
    "wh-dot-in-dir": Layer().dir("d").file("d/f", b"f").file("d/.wh.."),
    "wh-dotdot-in-dir": Layer().dir("d").file("d/.wh..."),
    "wh-of-whiteout": Layer().file(".wh..wh.x"),
    "wh-as-dir": Layer().dir(".wh.x").file(".wh.x/f", b"f"),
    "opaque-as-dir": Layer().dir("d").dir("d/.wh..wh..opq").file("d/.wh..wh..opq/f", b"f"),
    "opaque-as-symlink": Layer().dir("d").symlink("d/.wh..wh..opq", "/"),
    "wh-as-symlink": Layer().symlink(".wh.etc", "/etc"),
}


@pytest.mark.parametrize("case", list(WHITEOUTS))
def test_bad_whiteouts_are_refused(hostile, tmp_path, case):
    """Whiteout names that would name the directory itself, its parent (the store's tmp
    dir, for the layer's root), or that are not plain marker files."""
    # A sibling of the layer being built: `.wh...` at the layer's root names store/tmp.
    sibling = hostile.state_dir / "store" / "tmp" / "zz-sibling"
    sibling.mkdir()
    try:
        src = write(tmp_path / f"{case}.tar", WHITEOUTS[case].bytes())
        before = layer_dirs(hostile)
        exc, image, _ = import_timed(hostile, src)
        assert sibling.is_dir(), "a whiteout deleted the store's tmp dir"
        assert image is None and isinstance(exc, deltabox.InvalidArgument), repr(exc)
        assert "whiteout" in exc.message, exc.message
        assert layer_dirs(hostile) == before
        assert tmp_dirs(hostile) == {"zz-sibling"}
    finally:
        sibling.rmdir()


def test_whiteouts_in_the_right_places_still_work(hostile, tmp_path):
    """.wh.NAME hides NAME of the lower layer, .wh..wh..opq makes a dir opaque; a whiteout and
    an entry of the same layer: the entry is kept, the lower one hidden."""
    from test_images import docker_archive
    base = (Layer().dir("d").file("d/gone", b"1").file("d/kept", b"2").dir("o")
            .file("o/old", b"3").dir("r").file("r/old", b"4").bytes())
    upper = (Layer().dir("d").file("d/.wh.gone").dir("o").file("o/.wh..wh..opq")
             .file("o/new", b"5").file(".wh.r").dir("r").file("r/new", b"6").bytes())
    src = write(tmp_path / "wh.tar", docker_archive([base, upper]))
    exc, image, _ = import_timed(hostile, src, name="wh-ok")
    assert exc is None, exc
    try:
        store = hostile.state_dir / "store" / "layers"
        top = store / image.layer_ids[1]
        st = os.lstat(top / "d" / "gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(top / "o", "trusted.overlay.opaque") == b"y"
        # r was deleted, then re-created by the same layer: opaque, with the new entry
        assert os.getxattr(top / "r", "trusted.overlay.opaque") == b"y"
        assert (top / "r" / "new").read_bytes() == b"6"
        assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(top) for n in ds + fs)
    finally:
        with hostile.client() as c:
            c.remove_image("wh-ok")


# ---- tar headers that make parsers work without bound ----------------------------------------

def _header(name: str, type_: bytes, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = type_, size, 0
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    n = len(body) + len(str(len(body)))
    n += len(str(n)) - len(str(len(body)))
    return b"%d%s" % (n, body)


def test_backtracking_pax_headers_are_refused_fast(hostile, tmp_path):
    """Pax headers full of digits made Python's tarfile (3.11.7) backtrack quadratically:
    about 7 s per 64 KiB header."""
    out = b""
    for i in range(8):
        out += _header(f"PaxHeader/{i}", tarfile.XHDTYPE, 60_000) + _pad(b"1" * 60_000)
        out += _header(f"f{i}", tarfile.REGTYPE, 1) + _pad(b"x")
    src = write(tmp_path / "redos.tar", out + b"\0" * 1024)
    refused(hostile, src, "pax")


def test_oversized_metadata_headers_are_refused(hostile, tmp_path):
    """A pax header or GNU long name larger than any real one (they are read into memory)."""
    big = _pax_record(b"comment", b"x" * (2 * 2**20))
    out = _header("PaxHeader/f", tarfile.XHDTYPE, len(big)) + _pad(big)
    out += _header("f", tarfile.REGTYPE, 0)
    refused(hostile, write(tmp_path / "bigpax.tar", out + b"\0" * 1024), "header")
    name = b"a" * (2 * 2**20)
    out = _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name)) + _pad(name)
    out += _header("f", tarfile.REGTYPE, 0)
    refused(hostile, write(tmp_path / "longname.tar", out + b"\0" * 1024), "header")


def test_chained_extended_headers_are_refused(hostile, tmp_path):
    """Thousands of pax headers before one member: tarfile recurses once per header."""
    rec = b"11 a=bcdef\n"
    out = b"".join(_header(f"PaxHeader/{i}", tarfile.XHDTYPE, len(rec)) + _pad(rec)
                   for i in range(5000))
    out += _header("f", tarfile.REGTYPE, 0)
    refused(hostile, write(tmp_path / "chain.tar", out + b"\0" * 1024), "header")


@pytest.mark.parametrize("case", ["checksum", "truncated", "docker-archive"])
def test_corrupt_header_mid_archive_is_refused(hostile, tmp_path, case):
    """tarfile takes a bad or truncated header after the first member for the end of the
    archive: the image would be imported cut short, silently. (A docker archive cut short
    after its first member would be taken for a rootfs tarball and imported as one.)"""
    first = Layer().file("a", b"a").bytes()
    if case == "docker-archive":
        good = _docker(Layer().file("l/layer.tar", first), ["l/layer.tar"])
        second = 512 + len(first)  # the second header: after l/layer.tar's
    else:
        good = Layer().file("a", b"a").file("b", b"b").bytes()
        second = 512 * 2
    assert good[second + 257:second + 262] == b"ustar"
    if case == "truncated":
        bad = good[:second + 100]
    else:
        bad = bytearray(good)
        bad[second + 148:second + 156] = b"0000000\0"  # its checksum
    refused(hostile, write(tmp_path / "corrupt.tar", bytes(bad)), "header")


@pytest.mark.parametrize("type_", [b"V", b"M", b"D"])
def test_unknown_entry_types_are_refused(hostile, tmp_path, type_):
    out = _header("vol", type_, 0) + _header("f", tarfile.REGTYPE, 0) + b"\0" * 1024
    refused(hostile, write(tmp_path / "type.tar", out), "type")


# ---- tar bombs: --max-image-bytes, --max-image-entries ---------------------------------------

def _zero_bomb(path: Path, size: int, compression: str = "gzip") -> Path:
    """A compressed tar of one file of `size` zero bytes (about 1000:1)."""
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    head, chunk = ti.tobuf(tarfile.GNU_FORMAT), b"\0" * (1 << 20)
    if compression == "zstd":
        with open(path, "wb") as out:
            z = subprocess.Popen(["zstd", "-q", "-c"], stdin=subprocess.PIPE, stdout=out)
            z.stdin.write(head)
            for _ in range(size >> 20):
                z.stdin.write(chunk)
            z.stdin.close()
            assert z.wait() == 0
        return path
    opener = {"gzip": lambda: gzip.open(path, "wb", compresslevel=1),
              "xz": lambda: lzma.open(path, "wb", preset=0)}[compression]
    with opener() as f:
        f.write(head)
        for _ in range(size >> 20):
            f.write(chunk)
        f.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd"])
def test_compression_bombs_are_refused_by_bytes(hostile, tmp_path, compression):
    src = _zero_bomb(tmp_path / "bomb.tar.x", 64 << 20, compression)
    assert src.stat().st_size < 1 << 20
    msg = refused(hostile, src, "max-image-bytes")
    assert "zeros" in msg
    # no decompressor left running
    kids = subprocess.run(["pgrep", "-P", str(hostile.proc.pid)], capture_output=True,
                          text=True).stdout.split()
    assert not kids, kids


def test_many_entries_are_refused(hostile, tmp_path):
    lay = Layer().dir("d")
    for i in range(LIMIT_ENTRIES + 10):
        lay.file(f"d/{i}")
    msg = refused(hostile, write(tmp_path / "inodes.tar", lay.bytes()), "max-image-entries")
    assert str(LIMIT_ENTRIES) in msg.replace(",", "")


def test_implicit_directories_count_as_entries(hostile, tmp_path):
    """Entries whose names make hundreds of directories each: those are inodes too."""
    lay = Layer()
    for i in range(LIMIT_ENTRIES // 200 + 1):
        lay.file(f"{i}/" + "/".join(["d"] * 200) + "/f", b"x")
    refused(hostile, write(tmp_path / "implicit.tar", lay.bytes()), "max-image-entries")


def test_too_deep_paths_are_refused(hostile, tmp_path):
    name = "/".join(["d"] * 1000) + "/f"
    refused(hostile, write(tmp_path / "deep.tar", Layer().file(name, b"x").bytes()), "deep")


def test_limits_are_per_import_not_per_layer(hostile, tmp_path):
    from test_images import docker_archive
    layers = [Layer().file(f"f{i}", os.urandom(6 << 20)).bytes() for i in range(3)]
    src = write(tmp_path / "three.tar", docker_archive(layers))
    refused(hostile, src, "max-image-bytes")


def test_an_image_under_the_limits_imports(hostile, tmp_path):
    lay = Layer().dir("d").file("d/f", os.urandom(1 << 20))
    for i in range(100):
        lay.file(f"d/{i}")
    exc, image, _ = import_timed(hostile, write(tmp_path / "ok.tar", lay.bytes()), name="ok")
    assert exc is None, exc
    with hostile.client() as c:
        c.remove_image("ok")


# ---- device nodes ---------------------------------------------------------------------------

def test_device_nodes_are_dropped_and_named(hostile, tmp_path):
    """Char and block devices are not created (a node in a lower layer would be a door to
    the host's devices); the import says which ones it dropped. FIFOs are kept."""
    lay = (Layer().dir("dev").chardev("dev/null", 1, 3).dir("disk")
           .file("disk/readme", b"r"))
    lay.tf.addfile(lay._info("disk/sda", tarfile.BLKTYPE, 0o666, devmajor=8, devminor=0))
    lay.tf.addfile(lay._info("dev/fifo", tarfile.FIFOTYPE, 0o600))
    lay.chardev("dev/wh", 0, 0)
    msgs = []
    exc, image, _ = import_timed(hostile, write(tmp_path / "dev.tar", lay.bytes()),
                                 name="devs", progress=msgs.append)
    assert exc is None, exc
    try:
        warnings = [m.phase for m in msgs if "device" in m.phase]
        assert warnings and all(n in warnings[0] for n in ("dev/null", "disk/sda", "dev/wh"))
        layer = hostile.state_dir / "store" / "layers" / image.layer_ids[0]
        assert not os.path.lexists(layer / "dev" / "null")
        assert not os.path.lexists(layer / "disk" / "sda")
        assert not os.path.lexists(layer / "dev" / "wh")
        assert (layer / "disk" / "readme").read_bytes() == b"r"
        assert stat.S_ISFIFO(os.lstat(layer / "dev" / "fifo").st_mode)
        assert "dev/null" in hostile.log()  # and in the daemon's log
    finally:
        with hostile.client() as c:
            c.remove_image("devs")


def test_hardlink_to_a_dropped_device_is_dropped(hostile, tmp_path):
    lay = Layer().dir("dev").chardev("dev/mem", 1, 1)
    lay.hardlink("dev/mem2", "dev/mem")
    exc, image, _ = import_timed(hostile, write(tmp_path / "hl.tar", lay.bytes()),
                                 name="devlink")
    assert exc is None, exc
    try:
        layer = hostile.state_dir / "store" / "layers" / image.layer_ids[0]
        assert os.listdir(layer / "dev") == []
    finally:
        with hostile.client() as c:
            c.remove_image("devlink")


# ---- docker save archives -------------------------------------------------------------------

def _docker(lay: Layer, layers: list[str]) -> bytes:
    return (lay.file("c.json", b"{}")
            .file("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": [],
                                                "Layers": layers}]).encode())
            .bytes())


def _docker_cases(o: str) -> dict[str, tuple[bytes, str]]:
    one = Layer().file("hello", b"hi").bytes()
    return {
        "manifest-symlink-self": (Layer().file("L/layer.tar", one)
                                  .symlink("manifest.json", "manifest.json").bytes(), "symlink"),
        "manifest-symlink-cycle": (Layer().symlink("manifest.json", "m2")
                                   .symlink("m2", "manifest.json").bytes(), "symlink"),
        "manifest-symlink-outside": (Layer().symlink("manifest.json", o + "/secret").bytes(),
                                     "outside"),
        "layer-symlink-self": (_docker(Layer().dir("L").symlink("L/layer.tar", "layer.tar"),
                                       ["L/layer.tar"]), "symlink"),
        "layer-symlink-cycle": (_docker(Layer().dir("A").dir("B")
                                        .symlink("A/layer.tar", "../B/layer.tar")
                                        .symlink("B/layer.tar", "../A/layer.tar"),
                                        ["A/layer.tar"]), "symlink"),
        "layer-symlink-dotdot": (_docker(Layer().dir("L").symlink("L/layer.tar",
                                                                  "../../../etc/passwd"),
                                         ["L/layer.tar"]), "outside"),
        "layer-path-dotdot": (_docker(Layer().file("L/layer.tar", one),
                                      ["../" + o + "/secret"]), "outside"),
        "layer-path-absolute": (_docker(Layer().file("L/layer.tar", one), [o + "/secret"]),
                                "outside"),
        "layer-is-dir": (_docker(Layer().dir("L").dir("L/layer.tar"), ["L/layer.tar"]),
                         "regular file"),
        "layer-hardlink-cycle": (_docker(Layer().dir("L").hardlink("L/layer.tar",
                                                                   "L/layer.tar"),
                                         ["L/layer.tar"]), "link"),
        "manifest-not-a-list": (Layer().file("manifest.json", b'{"Layers": 1}').bytes(),
                                "manifest"),
        "manifest-layers-not-strings": (_docker(Layer(), [{"a": 1}]), "manifest"),
        "manifest-deep-json": (Layer().file("manifest.json", b"[" * 100_000).bytes(),
                               "manifest"),
    }


@pytest.mark.parametrize("case", list(_docker_cases("/o")))
def test_docker_archive_attacks_are_refused(hostile, outside, tmp_path, case):
    data, match = _docker_cases(str(outside.path))[case]
    refused(hostile, write(tmp_path / f"{case}.tar", data), match)
    outside.check()


def test_docker_archive_with_a_symlinked_duplicate_layer(hostile, tmp_path):
    """What `docker save` really does for a layer used twice: a relative symlink."""
    one = Layer().file("hello", b"hi").bytes()
    two = Layer().file("bye", b"bye").bytes()
    data = _docker(Layer().file("A/layer.tar", one).file("B/layer.tar", two).dir("C")
                   .symlink("C/layer.tar", "../A/layer.tar"),
                   ["A/layer.tar", "B/layer.tar", "C/layer.tar"])
    exc, image, _ = import_timed(hostile, write(tmp_path / "dup.tar", data), name="dup")
    assert exc is None, exc
    try:
        assert len(image.layer_ids) == 3
        top = hostile.state_dir / "store" / "layers" / image.layer_ids[2]
        assert (top / "hello").read_bytes() == b"hi"
    finally:
        with hostile.client() as c:
            c.remove_image("dup")


# ---- OCI layouts ----------------------------------------------------------------------------

class OCI:
    """An OCI layout directory built blob by blob."""

    def __init__(self, root: Path):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    def manifest(self, layers: list[dict]) -> dict:
        config = self.blob(b"{}", "application/vnd.oci.image.config.v1+json")
        return self.blob(json.dumps({"schemaVersion": 2, "config": config,
                                     "layers": layers}).encode(),
                         "application/vnd.oci.image.manifest.v1+json")

    def layer(self, data: bytes) -> dict:
        return self.blob(data, "application/vnd.oci.image.layer.v1.tar")

    def index(self, desc: dict) -> Path:
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                          "manifests": [desc]}))
        return self.root


INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _self_index(oci: OCI) -> Path:
    """An index blob that names itself: a digest cannot match, the name is all we see."""
    name = "a" * 64
    body = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": INDEX, "digest": f"sha256:{name}", "size": 10}]}).encode()
    (oci.root / "blobs" / "sha256" / name).write_bytes(body)
    return oci.index({"mediaType": INDEX, "digest": f"sha256:{name}", "size": len(body)})


def _index_cycle(oci: OCI) -> Path:
    a, b = "a" * 64, "b" * 64
    for me, other in ((a, b), (b, a)):
        (oci.root / "blobs" / "sha256" / me).write_text(json.dumps({"manifests": [
            {"mediaType": INDEX, "digest": f"sha256:{other}", "size": 10}]}))
    return oci.index({"mediaType": INDEX, "digest": f"sha256:{a}", "size": 10})


def _deep_index(oci: OCI) -> Path:
    desc = oci.manifest([oci.layer(Layer().file("f", b"f").bytes())])
    for _ in range(40):
        desc = oci.blob(json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode(), INDEX)
    return oci.index(desc)


def _digest_is_a_path(oci: OCI, o: Path) -> Path:
    """Digests that walk out of blobs/ to a valid manifest and layer on the host."""
    (o / "layer.tar").write_bytes(Layer().file("stolen", b"s").bytes())
    rel = "../../../" + os.path.relpath(o, oci.root)
    (o / "m.json").write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar",
         "digest": f"sha256:{rel}/layer.tar", "size": 1}]}))
    return oci.index({"mediaType": MANIFEST, "digest": f"sha256:{rel}/m.json", "size": 1})


def _blob_symlink_outside(oci: OCI, o: Path) -> Path:
    (o / "layer.tar").write_bytes(Layer().file("stolen", b"s").bytes())
    name = "c" * 64
    os.symlink(o / "layer.tar", oci.root / "blobs" / "sha256" / name)
    return oci.index(oci.manifest([{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                    "digest": f"sha256:{name}", "size": 1}]))


def _blob_fifo(oci: OCI, o: Path) -> Path:
    name = "d" * 64
    os.mkfifo(oci.root / "blobs" / "sha256" / name)
    return oci.index(oci.manifest([{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                    "digest": f"sha256:{name}", "size": 1}]))


def _blob_symlink_loop(oci: OCI, o: Path) -> Path:
    name = "e" * 64
    os.symlink(name, oci.root / "blobs" / "sha256" / name)
    return oci.index({"mediaType": MANIFEST, "digest": f"sha256:{name}", "size": 1})


def _index_is_a_fifo(oci: OCI, o: Path) -> Path:
    os.mkfifo(oci.root / "index.json")
    return oci.root


OCI_CASES = {
    "index-names-itself": (lambda oci, o: _self_index(oci), "cycle"),
    "index-cycle": (lambda oci, o: _index_cycle(oci), "cycle"),
    "index-too-deep": (lambda oci, o: _deep_index(oci), "nested"),
    "digest-is-a-path": (_digest_is_a_path, "digest"),
    "blob-symlink-outside": (_blob_symlink_outside, "outside"),
    "blob-symlink-loop": (_blob_symlink_loop, "symlink"),
    "blob-fifo": (_blob_fifo, "regular file"),
    "index-json-fifo": (_index_is_a_fifo, "regular file"),
}


@pytest.mark.parametrize("case", list(OCI_CASES))
def test_oci_layout_attacks_are_refused(hostile, outside, tmp_path, case):
    build, match = OCI_CASES[case]
    src = build(OCI(tmp_path / case), outside.path)
    before = sorted(os.listdir(outside.path))
    refused(hostile, src, match)
    assert sorted(os.listdir(outside.path)) == before


@pytest.mark.parametrize("case", ["index-names-itself", "index-cycle"])
def test_oci_archive_attacks_are_refused(hostile, tmp_path, case):
    """The same cycles in an OCI layout packed as a tar."""
    from test_images import tar_dir
    build, match = OCI_CASES[case]
    layout = build(OCI(tmp_path / case), tmp_path)
    refused(hostile, tar_dir(layout, tmp_path / f"{case}.tar"), match)


# ---- host directories -----------------------------------------------------------------------

def test_directory_source_copies_symlinks_as_symlinks(hostile, outside, tmp_path):
    """Importing a host directory never follows a symlink out of it (absolute, relative,
    to a directory or a file); devices are dropped, FIFOs copied without opening them."""
    src = tmp_path / "rootfs"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hostname").write_text("box\n")
    os.symlink(str(outside.path), src / "out")
    os.symlink(str(outside.path / "secret"), src / "secret-link")
    os.symlink(up(), src / "etc" / "up")
    os.symlink("/etc", src / "host-etc")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.link(src / "etc" / "hostname", src / "hard")
    exc, image, _ = import_timed(hostile, src, name="dir-ok")
    assert exc is None, exc
    try:
        layer = hostile.state_dir / "store" / "layers" / image.layer_ids[0]
        assert os.readlink(layer / "out") == str(outside.path)
        assert os.readlink(layer / "secret-link") == str(outside.path / "secret")
        assert os.readlink(layer / "etc" / "up") == up()
        assert os.readlink(layer / "host-etc") == "/etc"
        assert stat.S_ISFIFO(os.lstat(layer / "fifo").st_mode)
        assert not os.path.lexists(layer / "null")
        assert os.lstat(layer / "hard").st_ino == os.lstat(layer / "etc" / "hostname").st_ino
        assert sorted(os.listdir(layer)) == ["etc", "fifo", "hard", "host-etc", "out",
                                             "secret-link"]
    finally:
        with hostile.client() as c:
            c.remove_image("dir-ok")
    outside.check()


@pytest.mark.parametrize("name", [".wh...", ".wh..", ".wh."])
def test_directory_source_with_escaping_whiteouts_is_refused(hostile, tmp_path, name):
    src = tmp_path / "rootfs"
    (src / "d").mkdir(parents=True)
    (src / "d" / name).write_bytes(b"")
    sibling = hostile.state_dir / "store" / "tmp" / "zz-sibling"
    sibling.mkdir()
    try:
        exc, image, _ = import_timed(hostile, src)
        assert sibling.is_dir()
        assert image is None and isinstance(exc, deltabox.InvalidArgument), repr(exc)
        assert "whiteout" in exc.message
        assert tmp_dirs(hostile) == {"zz-sibling"}
    finally:
        sibling.rmdir()


def test_directory_source_over_the_limits_is_refused(hostile, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    (src / "big").write_bytes(b"\0" * (LIMIT_BYTES + 1))
    refused(hostile, src, "max-image-bytes")
    (src / "big").unlink()
    for i in range(LIMIT_ENTRIES + 1):
        (src / str(i)).touch()
    refused(hostile, src, "max-image-entries")


def test_directory_source_with_a_mount_inside_is_refused(hostile, tmp_path):
    """A host directory with /proc or another mount inside: not copied across."""
    src = tmp_path / "chroot"
    (src / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(src / "proc")], check=True)
    try:
        (src / "proc" / "f").write_text("x")
        refused(hostile, src, "mount")
    finally:
        subprocess.run(["umount", str(src / "proc")], check=True)


# ---- a decoy ---------------------------------------------------------------------------------

def test_names_that_look_bad_but_are_not(hostile, tmp_path):
    """`..x`, `x..`, `...`, `.wh` and `wh..x` are ordinary names; symlinks may point anywhere
    (they are resolved inside the sandbox, never by the importer)."""
    lay = (Layer().dir("./d").file("./d/..x", b"1").file("./d/x..", b"2").file("./d/...", b"3")
           .file("./d/.wh", b"4").file("./d/wh..x", b"5").symlink("./d/abs", "/etc/passwd")
           .symlink("./d/rel", "../../../../..").file("./d/" + "n" * 255, b"6"))
    exc, image, _ = import_timed(hostile, write(tmp_path / "decoy.tar", lay.bytes()),
                                 name="decoy")
    assert exc is None, exc
    try:
        layer = hostile.state_dir / "store" / "layers" / image.layer_ids[0]
        assert sorted(os.listdir(layer / "d")) == sorted(
            ["..x", "x..", "...", ".wh", "wh..x", "abs", "rel", "n" * 255])
        assert os.readlink(layer / "d" / "rel") == "../../../../.."
    finally:
        with hostile.client() as c:
            c.remove_image("decoy")

