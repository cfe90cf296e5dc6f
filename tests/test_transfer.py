"""Checkpoints that travel: export from one daemon, import into another (two real daemons
on this host), then fork and roll back there; layers the target holds are not sent again;
a different host, a corrupt, truncated or hostile stream is refused and leaves nothing;
a FULL checkpoint is imported only when signed with the target's transfer key."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import deltabox
from conftest import DEMO_TAR, DaemonProcess, TINY_TAR, stopped_clean
from waiting import wait_for
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox.client.transfer import MAGIC, read_chunks, write_chunk
from deltabox.core.transfer_format import chain_hash


def key_file(path: Path, key: bytes) -> Path:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(key)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keys(workdir):
    """The transfer key the source and target daemons share, and another one."""
    return {"shared": key_file(workdir / "transfer-keys" / "shared", os.urandom(32)),
            "other": key_file(workdir / "transfer-keys" / "other", os.urandom(32))}


@pytest.fixture(scope="module")
def target(workdir, keys):
    """A second daemon, with no image at all: image layers travel in the streams. It holds
    the shared transfer key (FULL checkpoints from `source` import; from the unkeyed
    session daemon, only FS ones)."""
    d = DaemonProcess(workdir / "transfer-target",
                      extra_args=("--transfer-key-file", str(keys["shared"]))).start()
    yield d
    stopped_clean(d)


@pytest.fixture(scope="module")
def source(workdir, keys):
    """A daemon holding the same key as `target`: its exports are signed."""
    d = DaemonProcess(workdir / "transfer-source",
                      extra_args=("--transfer-key-file", str(keys["shared"]))).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        c.import_image("demo", DEMO_TAR)
    yield d
    stopped_clean(d)


@pytest.fixture
def src(source):
    with source.client() as c:
        yield c


@pytest.fixture
def src_demo(src):
    sbx = src.create("demo")
    yield sbx
    sbx.destroy()


@pytest.fixture
def dst(target):
    with target.client() as c:
        yield c


def sh(sbx, cmd: str) -> str:
    r = sbx.exec(["sh", "-c", cmd])
    assert r.exit_code == 0, r.stderr
    return r.stdout.decode()


def store_counts(d) -> dict:
    store = d.state_dir / "store"
    return {"tmp": sorted(os.listdir(store / "tmp")), "layers": len(os.listdir(store / "layers")),
            "images": sorted(os.listdir(store / "images"))}


def exported(client, ckpt, **kw) -> bytes:
    buf = io.BytesIO()
    client.export_checkpoint(ckpt, buf, **kw)
    return buf.getvalue()


def reframed(chunks) -> bytes:
    out = io.BytesIO()
    out.write(MAGIC)
    for c in chain_hash(chunks):
        write_chunk(out, c)
    return out.getvalue()


def metric(client, name: str, label: str) -> float:
    for line in client.stats().prometheus_text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- files ------------------------------------------------------------------------------------

def test_fs_checkpoint_export_import_fork_rollback(client, tiny, dst, tmp_path):
    sh(tiny, "mkdir -p /w/d && echo one > /w/a && echo gone > /w/b && ln /w/a /w/hard && "
             "ln -s ../a /w/d/link && mkfifo /w/fifo && chmod 4750 /w/a && "
             "echo x > /w/d/deep")
    first = tiny.checkpoint("first")
    sh(tiny, "rm /w/b && rm -r /w/d && mkdir /w/d && echo new > /w/d/other")
    second = tiny.checkpoint("second")
    path = tmp_path / "ck.dbx"
    res = client.export_checkpoint(second, path)
    assert res.layers_sent == len(second.layer_ids) and res.bytes_sent == path.stat().st_size
    got = dst.import_checkpoint(path)
    assert (got.id, got.label, got.mode) == (second.id, "second", "fs")
    assert dst.import_checkpoint(path).id == second.id          # again: a no-op
    [child] = dst.fork(got, 1)
    kid = child.sandbox
    try:
        assert sh(kid, "cat /w/a /w/hard /w/d/other") == "one\none\nnew\n"
        assert sh(kid, "ls /w/b /w/d/deep /w/d/link 2>&1 || true").count("No such file") == 3
        ino_a, ino_hard = sh(kid, "stat -c %i /w/a /w/hard").split()
        assert ino_a == ino_hard
        assert sh(kid, "stat -c '%h %a' /w/a").split() == ["2", "4750"]
        assert sh(kid, "stat -c %F /w/fifo").strip() == "fifo"
        sh(kid, "echo changed > /w/a")
        kid.rollback(got)                                       # its tree holds the import
        assert sh(kid, "cat /w/a") == "one\n"
    finally:
        kid.destroy()
    # the first checkpoint's chain is a prefix: only its missing layers would travel
    man = client.checkpoint_manifest(first)
    assert dst.have_layers(man.digests) == man.digests
    info = client.send_checkpoint(first, to=dst)
    assert info.id == first.id and info.layer_ids == got.layer_ids[:len(info.layer_ids)]


def test_symlinks_and_hardlinks_keep_their_shape(client, tiny, dst):
    sh(tiny, "mkdir /s && echo t > /s/t && ln -s /etc/passwd /s/abs && ln -s t /s/rel && "
             "ln /s/t /s/t2 && ln /s/t /s/t3")
    ck = tiny.checkpoint()
    got = client.send_checkpoint(ck, to=dst)
    [child] = dst.fork(got, 1)
    try:
        assert sh(child.sandbox, "readlink /s/abs; readlink /s/rel") == "/etc/passwd\nt\n"
        assert sh(child.sandbox, "stat -c %h /s/t /s/t2 /s/t3") == "3\n3\n3\n"
    finally:
        child.sandbox.destroy()


def test_a_tree_no_import_takes_is_refused_at_export(client, tiny):
    """MakeDir and the sandbox allow paths deeper than a transfer stream holds: the export
    says so, instead of writing a stream every import refuses ("nested too deep")."""
    sh(tiny, "mkdir -p /" + "/".join(["d"] * 600))
    ck = tiny.checkpoint()
    with pytest.raises(deltabox.FailedPrecondition, match=r"nested \d+ directories deep"):
        exported(client, ck)


def test_a_sparse_file_is_refused_at_export(client, tiny):
    """A stream has no holes: `truncate -s 8E` in a sandbox made an export (and every
    manifest or HaveLayers of its layer) read exabytes of zeros."""
    sh(tiny, "head -c 100000 /dev/zero > /dense && truncate -s 1M /dense")
    assert exported(client, tiny.checkpoint())  # small, or mostly stored: exported
    sh(tiny, "truncate -s 9223372036854775807 /sparse")
    ck = tiny.checkpoint()  # the checkpoint itself is fine (its layer stores nothing)
    assert ck.layer_bytes < 1 << 20
    with pytest.raises(deltabox.FailedPrecondition, match="sparse file"):
        exported(client, ck)
    with pytest.raises(deltabox.FailedPrecondition, match="sparse file"):
        client.checkpoint_manifest(ck)


def test_second_send_skips_the_shared_layers(client, tiny, dst):
    sh(tiny, "head -c 3000000 /dev/urandom > /big")
    base = tiny.checkpoint()
    client.send_checkpoint(base, to=dst)
    sh(tiny, "echo small > /small")
    child = tiny.checkpoint()
    man = client.checkpoint_manifest(child)
    have = dst.have_layers(man.digests)
    assert have == man.digests[:-1]                        # all but its own new layer
    whole = client.export_checkpoint(child, io.BytesIO())
    sent_before = metric(client, "deltabox_transfer_bytes_total", 'direction="export"')
    skipped_before = metric(client, "deltabox_transfer_layers_total", 'outcome="skipped"')
    info = client.send_checkpoint(child, to=dst)
    sent = metric(client, "deltabox_transfer_bytes_total", 'direction="export"') - sent_before
    skipped = metric(client, "deltabox_transfer_layers_total", 'outcome="skipped"') - \
        skipped_before
    assert info.id == child.id and skipped == len(man.layers) - 1
    assert whole.bytes_sent > 3_000_000 and sent < 100_000, (whole.bytes_sent, sent)
    assert client.send_checkpoint(child, to=dst).id == child.id   # again: a no-op
    [kid] = dst.fork(info, 1)
    try:
        assert sh(kid.sandbox, "cat /small; wc -c < /big") == "small\n3000000\n"
    finally:
        kid.sandbox.destroy()


def test_daemons_that_imported_the_same_image_share_its_layers(client, tiny, new_daemon):
    """Image layers get their digest when first asked for: not sent between two daemons
    that imported the same tarball."""
    other = new_daemon().start()
    with other.client() as c:
        c.import_image("tiny", TINY_TAR)
        man = client.checkpoint_manifest(tiny.checkpoint())
        image = man.digests[:man.image_layers]
        assert image and c.have_layers(man.digests) == image
        res = client.export_checkpoint(tiny.checkpoint(), io.BytesIO(), skip_layers=image)
        assert res.layers_skipped == len(image)


async def test_async_send_and_the_cli(daemon, target, tiny, dst):
    sh(tiny, "echo via-async > /a")
    ck = tiny.checkpoint()
    async with deltabox.AsyncClient(daemon.socket) as a, \
            deltabox.AsyncClient(target.socket) as b:
        got = await a.send_checkpoint(ck.id, to=b)
        assert got.id == ck.id and (await b.checkpoint_manifest(got)).digests == \
            (await a.checkpoint_manifest(ck)).digests
    sh(tiny, "echo via-cli > /a")
    ck2 = tiny.checkpoint()
    exported_ = daemon.cli("export", ck2.id, "-o", "-")
    assert exported_.returncode == 0 and exported_.stdout.startswith(MAGIC), exported_.stderr
    imported = target.cli("import", "-", input=exported_.stdout)
    assert imported.returncode == 0 and imported.stdout.decode().strip() == ck2.id, \
        imported.stderr
    [kid] = dst.fork(ck2.id, 1)
    try:
        assert sh(kid.sandbox, "cat /a") == "via-cli\n"
    finally:
        kid.sandbox.destroy()


# ---- processes --------------------------------------------------------------------------------

def test_full_checkpoint_restores_processes_on_the_target(src, src_demo, dst):
    """Two daemons sharing a transfer key: the FULL stream is signed and accepted."""
    demo = src_demo
    py = demo.open_session("python", name="py")
    py.run("import os\nopen('/xa', 'w').write('1')\nos.setxattr('/xa', 'user.k', b'val')")
    py.run("x = 41\nf = open('/tmp/held', 'w')\nf.write('written before')\nf.flush()")
    ck = demo.checkpoint("full", full=True)
    assert next(reversed(list(read_chunks([exported(src, ck)])))).trailer.hmac_sha256
    got = src.send_checkpoint(ck, to=dst)
    assert got.mode == "full"
    [child] = dst.fork(got, 1)
    assert child.error is None, child.error
    kid = child.sandbox
    try:
        s = kid.session("py")
        assert s.run("print(x + 1)").stdout == b"42\n"
        assert s.run("print(os.getxattr('/xa', 'user.k'))").stdout == b"b'val'\n"
        s.run("f.write(' and after'); f.flush()")
        assert kid.read_file("/tmp/held") == b"written before and after"
        s.run("x = 0")
        kid.rollback(got)
        assert kid.session("py").run("print(x)").stdout == b"41\n"
    finally:
        kid.destroy()


# ---- who may send a FULL checkpoint: the transfer key -----------------------------------------

@pytest.fixture(scope="module")
def signed_full(source):
    """A signed FULL stream (from `source`) and its checkpoint id."""
    with source.client() as c:
        sbx = c.create("demo")
        try:
            sbx.open_session("python", name="py").run("x = 7")
            data = exported(c, sbx.checkpoint("signed", full=True))
        finally:
            sbx.destroy()
    return data, next(read_chunks([data])).manifest.checkpoint_id


def refused_leaving_nothing(d, data: bytes, why: str) -> None:
    """Importing `data` into daemon `d` is PERMISSION_DENIED matching `why`, and leaves
    no layer, image dir, tmp entry nor checkpoint behind."""
    before = store_counts(d)
    ck = next(read_chunks([data])).manifest.checkpoint_id
    with d.client() as c:
        with pytest.raises(deltabox.PermissionDenied, match=why) as e:
            c.import_checkpoint(data)
        assert "transfer-key-file" in str(e.value)                # and says the fix
        with pytest.raises(deltabox.CheckpointNotFound):
            c.fork(ck, 1)
    assert store_counts(d) == before


def test_full_import_refused_without_a_key_on_the_target(daemon, signed_full):
    """The session daemon has no transfer key: it trusts no exporter's CRIU images."""
    refused_leaving_nothing(daemon, signed_full[0], "no transfer key configured")


def test_full_import_refused_when_signed_with_another_key(new_daemon, keys, signed_full):
    d = new_daemon(extra_args=("--transfer-key-file", str(keys["other"]))).start()
    refused_leaving_nothing(d, signed_full[0], "signed with another key")


def test_full_import_refused_when_exported_unsigned(client, demo, target):
    """The session daemon has no key: its FULL export carries no signature."""
    data = exported(client, demo.checkpoint(full=True))
    assert not next(reversed(list(read_chunks([data])))).trailer.hmac_sha256
    refused_leaving_nothing(target, data, "not signed")


def test_full_import_refused_when_altered_after_signing(target, signed_full):
    """Checksums recomputed over an edited stream (what a forger can do) do not make it
    verify: the signature covers the whole stream."""
    chunks = list(read_chunks([signed_full[0]]))
    chunks[0].manifest.label = "forged"
    refused_leaving_nothing(target, reframed(chunks), "another key.*altered")


def test_require_signature_refuses_unsigned_fs_imports(client, tiny, src, new_daemon, keys):
    """FS checkpoints import unsigned (the tests above send them from the unkeyed session
    daemon), unless the target says transfer-require-signature."""
    d = new_daemon(extra_args=("--transfer-key-file", str(keys["shared"]),
                               "--transfer-require-signature")).start()
    sh(tiny, "echo unsigned > /u")
    refused_leaving_nothing(d, exported(client, tiny.checkpoint()), "not signed")
    sbx = src.create("tiny")
    try:
        sh(sbx, "echo signed > /u")
        ck = sbx.checkpoint()
        with d.client() as c:
            got = src.send_checkpoint(ck, to=c)
            [kid] = c.fork(got, 1)
            assert sh(kid.sandbox, "cat /u") == "signed\n"
            kid.sandbox.destroy()
    finally:
        sbx.destroy()


@pytest.mark.parametrize("shape, why", [
    ("group-readable", "accessible by group or others"),
    ("symlink", "is a symlink"),
    ("short", "at least 32 random"),
])
def test_a_bad_key_file_is_refused_at_start_up(tmp_path, shape, why):
    key = key_file(tmp_path / "keys" / "key", os.urandom(16 if shape == "short" else 32))
    if shape == "group-readable":
        key.chmod(0o640)
    if shape == "symlink":
        (tmp_path / "keys" / "link").symlink_to(key)
        key = tmp_path / "keys" / "link"
    state = tmp_path / "never-made"
    proc = subprocess.Popen([sys.executable, "-m", "deltabox.cli", "daemon", "--state-dir",
                             str(state), "--socket", str(tmp_path / "never.sock"),
                             "--store-size", "1G", "--transfer-key-file", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:   # it started: stop it (SIGTERM unmounts its store)
        proc.terminate()
        proc.communicate(timeout=60)
        pytest.fail("the daemon started with a bad transfer key file")
    assert proc.returncode != 0 and "transfer-key-file" in err and why in err, err
    assert not state.exists()


# ---- refusals ---------------------------------------------------------------------------------

def _edited_manifest(data: bytes, **fields) -> bytes:
    chunks = list(read_chunks([data]))
    for k, v in fields.items():
        setattr(chunks[0].manifest, k, v)
    return reframed(chunks)


def test_another_kernel_criu_or_arch_is_refused(client, tiny, demo, dst, target):
    fs = exported(client, tiny.checkpoint())
    before = store_counts(target)
    with pytest.raises(deltabox.FailedPrecondition, match="architecture is 'riscv64'"):
        dst.import_checkpoint(_edited_manifest(fs, arch="riscv64"))
    with pytest.raises(deltabox.FailedPrecondition, match="store format"):
        dst.import_checkpoint(_edited_manifest(fs, store_format="btrfs/9"))
    full = exported(client, demo.checkpoint(full=True))
    with pytest.raises(deltabox.FailedPrecondition, match="kernel release is '2.6.32'"):
        dst.import_checkpoint(_edited_manifest(full, kernel_release="2.6.32"))
    with pytest.raises(deltabox.FailedPrecondition, match="CRIU version is '0.1'"):
        dst.import_checkpoint(_edited_manifest(full, criu_version="0.1"))
    assert store_counts(target) == before


def test_corrupt_or_truncated_stream_leaves_nothing(client, tiny, dst, target):
    sh(tiny, "head -c 200000 /dev/urandom > /r")
    ck = tiny.checkpoint()
    data = exported(client, ck)
    before = store_counts(target)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    with pytest.raises(deltabox.InvalidArgument, match="corrupt|checksum"):
        dst.import_checkpoint(bytes(flipped))
    with pytest.raises(deltabox.InvalidArgument, match="truncated"):
        dst.import_checkpoint(data[:len(data) * 2 // 3])
    chunks = list(read_chunks([data]))
    with pytest.raises(deltabox.InvalidArgument, match="truncated"):
        dst.import_checkpoint(reframed(chunks[:-1]))          # no trailer, checksums fine
    with pytest.raises(deltabox.InvalidArgument, match="checksum mismatch"):
        dst.import_checkpoint(reframed(chunks[:3]) + data[len(reframed(chunks[:4])):])
    assert store_counts(target) == before
    with pytest.raises(deltabox.CheckpointNotFound):
        dst.fork(ck, 1)


# ---- hostile streams: records built by hand --------------------------------------------------

_HEAD = struct.Struct(">cIIIqQHHI")


def rec(kind: bytes, name: str, data: bytes = b"", link: str = "", mode: int = 0o644,
        xattrs: bytes = b"") -> bytes:
    n, lk = name.encode(), link.encode()
    return _HEAD.pack(kind, mode, 0, 0, 0, len(data), len(n), len(lk), len(xattrs)) + n + lk \
        + xattrs + data


# A spec as a daemon stores it (`create`'s), for the hand-made manifests.
SPEC = {"memory_bytes": 256 << 20, "pids": 512, "cpus": 0.0, "network": "none", "env": {},
        "hostname": "made-by-hand", "disk_bytes": 1 << 30, "disk_inodes": 1 << 20}


def hostile(manifest: pb.Manifest, records: bytes) -> bytes:
    """A stream whose last layer is `records` (checksums all correct); the manifest's
    spec is SPEC unless it has one."""
    import hashlib
    digest = "sha256:" + hashlib.sha256(records).hexdigest()
    m = pb.Manifest()
    m.CopyFrom(manifest)
    m.spec_json = m.spec_json or json.dumps(SPEC)
    m.checkpoint_id = m.checkpoint_id or "ck-0badc0ffee00"
    del m.layers[:]
    m.layers.add(digest=digest, size_bytes=len(records))
    chunks = [pb.ExportChunk(manifest=m),
              pb.ExportChunk(start=pb.ExportSectionStart(kind="layer", digest=digest)),
              pb.ExportChunk(data=zlib.compress(records)),
              pb.ExportChunk(end=pb.ExportSectionEnd(sha256=digest, raw_bytes=len(records))),
              pb.ExportChunk(trailer=pb.ExportTrailer(chunks=5, layers_sent=1))]
    return reframed(chunks)


ROOT = rec(b"d", "", mode=0o755)
END = rec(b"E", "")


@pytest.mark.parametrize("records, why", [
    (ROOT + rec(b"f", "../escape", b"x") + END, "'..'"),
    (ROOT + rec(b"f", "/etc/escape", b"x") + END, "absolute"),
    (ROOT + rec(b"l", "a", link="/tmp") + rec(b"f", "a/escape", b"x") + END, "symlink"),
    (ROOT + rec(b"l", "a", link="..") + rec(b"h", "h", link="a/x") + END, "symlink"),
    (ROOT + rec(b"b", "sda", mode=0o600) + END, "unknown entry kind"),
    (ROOT + rec(b"f", "a", b"x") + rec(b"f", "a", b"y") + END, "exists"),
    (ROOT + rec(b"d", "o", mode=0o755, xattrs=struct.pack(">HI", 24, 1) +
                b"trusted.overlay.redirect" + b"x") + END, "overlay xattr"),
    (ROOT + rec(b"f", "a", b"x", xattrs=struct.pack(">HI", 7, 1) + b"bogus.k" + b"x") + END,
     "cannot be written: Operation not supported"),
    (rec(b"d", "", mode=0o755, xattrs=struct.pack(">HI", 5, 1) + b"bogus" + b"x") + END,
     "its root directory: cannot be written"),
])
def test_hostile_entries_are_refused(client, tiny, dst, target, records, why):
    man = client.checkpoint_manifest(tiny.checkpoint())
    before = store_counts(target)
    with pytest.raises(deltabox.InvalidArgument, match=why):
        dst.import_checkpoint(hostile(pb.Manifest(
            format=man.format, mode=pb.CHECKPOINT_MODE_FS, arch=man.arch,
            store_format=man.store_format, kernel_release=man.kernel_release,
            criu_version=man.criu_version), records))
    assert store_counts(target) == before
    assert not os.path.exists("/tmp/escape") and not os.path.exists("/etc/escape")


def _fs_manifest(man, **fields) -> pb.Manifest:
    return pb.Manifest(format=man.format, mode=pb.CHECKPOINT_MODE_FS, arch=man.arch,
                       store_format=man.store_format, image="tiny", **fields)


@pytest.mark.parametrize("spec, why", [
    ({}, "'memory_bytes' is missing"),
    ({**SPEC, "memory_bytes": 1}, "memory limit must be at least"),
    ({**SPEC, "pids": 1}, "pids limit"),
    ({**SPEC, "cpus": -3}, "cpus limit"),
    ({**SPEC, "memory_bytes": "lots"}, "'memory_bytes' is missing or not a number"),
    ({**SPEC, "hostname": "../../etc"}, "invalid host name"),
    ({**SPEC, "network": "host"}, "network must be"),
    ({**SPEC, "env": {"A": "\0"}}, "NUL byte"),
    ({**SPEC, "disk_bytes": -1}, "'disk_bytes' must be >= 0"),
])
def test_a_hostile_spec_is_refused(client, tiny, dst, target, spec, why):
    """Forks of an imported checkpoint are created with the spec its manifest carries:
    one `create` would refuse is refused at the import (it used to be stored, and every
    fork of it failed with INTERNAL)."""
    man = client.checkpoint_manifest(tiny.checkpoint())
    before = store_counts(target)
    with pytest.raises(deltabox.InvalidArgument, match=why):
        dst.import_checkpoint(hostile(_fs_manifest(man, spec_json=json.dumps(spec)),
                                      ROOT + END))
    assert store_counts(target) == before


def test_imported_stats_and_sandbox_are_sanitised(client, tiny):
    """Stats that are not numbers are dropped (they broke every later call showing the
    checkpoint); a source sandbox id that names a sandbox here is not kept (the
    checkpoint would have joined that sandbox's tree)."""
    man = client.checkpoint_manifest(tiny.checkpoint())
    m = _fs_manifest(man, checkpoint_id="ck-5a11e5c0ffee", sandbox_id=tiny.id,
                     stats_json=json.dumps({"frozen_ms": "x", "dump_ms": 3.5, "n": [1]}))
    got = client.import_checkpoint(hostile(m, ROOT + rec(b"f", "ok", b"fine") + END))
    try:
        assert got.sandbox_id == "" and got.timings_ms == {"dump_ms": 3.5}
        assert got.id not in {c.id for c in tiny.checkpoints()}
        assert client.wait_checkpoint(got.id).id == got.id
        [child] = client.fork(got, 1)
        assert child.sandbox.read_file("/ok") == b"fine"
        child.sandbox.destroy()
    finally:
        client.delete_checkpoint(got)


def test_a_well_formed_hand_made_stream_imports(client, tiny, dst):
    """The refusals above are the entries', not the hand-made stream's."""
    man = client.checkpoint_manifest(tiny.checkpoint())
    m = pb.Manifest(format=man.format, mode=pb.CHECKPOINT_MODE_FS, arch=man.arch,
                    store_format=man.store_format, image="tiny")
    got = dst.import_checkpoint(hostile(m, ROOT + rec(b"f", "ok", b"fine") + END))
    assert got.id == "ck-0badc0ffee00" and len(got.layer_ids) == 1
    dst.delete_checkpoint(got)


# ---- a daemon killed mid-import -----------------------------------------------------------------

@pytest.mark.parametrize("point", ["transfer.written", "transfer.commit"])
def test_a_daemon_killed_mid_import_leaves_nothing(client, tiny, workdir, point):
    sh(tiny, "echo crash > /c")
    data = exported(client, tiny.checkpoint())
    d = DaemonProcess(workdir / f"transfer-crash-{point}")
    os.environ["DELTABOX_FAULT"] = point
    try:
        d.start()
    finally:
        del os.environ["DELTABOX_FAULT"]
    try:
        with d.client() as c, pytest.raises(deltabox.DeltaboxError):
            c.import_checkpoint(data)
        assert d.proc.wait(30) == -9, d.log()
        d.start()
        with d.client() as c:
            with pytest.raises(deltabox.CheckpointNotFound):
                c.fork(read_chunks([data]).__next__().manifest.checkpoint_id, 1)
        assert store_counts(d) == {"tmp": [], "layers": 0, "images": []}
        with d.client() as c:                  # and the same stream imports fine now
            assert c.import_checkpoint(data).layer_ids
    finally:
        d.stop()


def test_import_over_tcp_needs_the_token(client, tiny, new_daemon, tmp_path, monkeypatch):
    """ImportCheckpoint is the API's only client-streaming RPC: the interceptor checks its
    token (and maps its errors) as it does every other call's."""
    from tcp import free_port, make_tls_files, tcp_daemon_args, token_file
    key, cert = make_tls_files(tmp_path)
    port = free_port()
    monkeypatch.delenv("DELTABOX_TOKEN", raising=False)
    tok = token_file(tmp_path / "token", "s3cret")
    d = new_daemon(extra_args=tcp_daemon_args("localhost", port, key, cert, tok)).start()
    data = exported(client, tiny.checkpoint())
    with deltabox.Client(f"localhost:{port}", tls_ca=cert, token="wrong") as c:
        with pytest.raises(deltabox.PermissionDenied, match="token"):
            c.import_checkpoint(data)
    with d.client() as c:
        with pytest.raises(deltabox.CheckpointNotFound):
            c.fork(next(read_chunks([data])).manifest.checkpoint_id, 1)
    with deltabox.Client(f"localhost:{port}", tls_ca=cert, token="s3cret") as c:
        with pytest.raises(deltabox.InvalidArgument, match="truncated"):
            c.import_checkpoint(data[:len(data) // 2])
        assert c.import_checkpoint(data).layer_ids


def test_an_import_cancelled_midway_leaves_nothing(client, tiny, dst, target):
    sh(tiny, "head -c 4000000 /dev/urandom > /big2")
    ck = tiny.checkpoint()
    data = exported(client, ck)
    before = store_counts(target)

    def half_then_fail():
        yield data[:len(data) // 2]
        raise RuntimeError("the sender went away")
    with pytest.raises(deltabox.DeltaboxError):
        dst.import_checkpoint(half_then_fail())
    wait_for(lambda: store_counts(target) == before, "the cancelled import's clean-up")
    assert dst.import_checkpoint(data).id == ck.id          # the daemon imports it after
