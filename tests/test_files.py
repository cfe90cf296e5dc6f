"""The file API (read/write/list/stat/remove/mkdir over gRPC) and its confinement.

The daemon resolves sandbox paths on the host, against the sandbox's branch
mount: every test that could be fooled into touching the host plants unique
marker files on the host and checks they are neither read, written, removed
nor joined by new files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import deltabox

REGULAR, DIRECTORY, SYMLINK = (deltabox.FileType.REGULAR, deltabox.FileType.DIRECTORY,
                               deltabox.FileType.SYMLINK)


def ok(sbx, cmd, **kw) -> bytes:
    r = sbx.exec(cmd, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


def exists_inside(sbx, path: str) -> bool:
    return sbx.exec(["test", "-e", path]).exit_code == 0 or \
        sbx.exec(["test", "-L", path]).exit_code == 0


def branch_host_path(sbx) -> str:
    """Where the daemon mounts the sandbox's branch on the host."""
    branch = sbx.refresh().info.branch_id
    assert branch
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    found = [t for t in targets if t.endswith("/" + branch)]
    assert len(found) == 1, found
    return found[0]


class HostMarkers:
    """Unique files on the host that the sandbox must never reach."""

    def __init__(self):
        self.tag = uuid.uuid4().hex
        self.dir = Path("/tmp") / f"deltabox-hostdir-{self.tag}"
        self.dir.mkdir()
        self.content = f"HOST SECRET {self.tag}\n".encode()
        self.marker = Path("/tmp") / f"deltabox-marker-{self.tag}"
        self.victim = Path("/tmp") / f"deltabox-victim-{self.tag}"
        self.in_dir = self.dir / "secret"
        for p in (self.marker, self.victim, self.in_dir):
            p.write_bytes(self.content)
        self.new_name = f"deltabox-new-{self.tag}"   # must never appear on the host

    def check_untouched(self) -> None:
        for p in (self.marker, self.victim, self.in_dir):
            assert p.read_bytes() == self.content, f"host file {p} was modified"
        assert sorted(os.listdir(self.dir)) == ["secret"], os.listdir(self.dir)
        created = [p for p in Path("/tmp").iterdir() if self.new_name in p.name]
        created += [p for p in Path("/").iterdir() if self.new_name in p.name]
        assert created == [], f"files created on the host: {created}"

    def cleanup(self) -> None:
        # everything here carries the unique tag; anything a broken daemon made too
        for base in (Path("/tmp"), Path("/")):
            for p in base.iterdir():
                if self.tag in p.name:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()


@pytest.fixture
def host():
    h = HostMarkers()
    yield h
    h.cleanup()


# ---- basic operations --------------------------------------------------------------------

def test_write_read_roundtrip_5mb_binary(tiny):
    data = os.urandom(5 << 20)
    assert tiny.write_file("/tmp/blob.bin", data) == len(data)
    assert tiny.read_file("/tmp/blob.bin") == data
    digest = ok(tiny, "sha256sum /tmp/blob.bin").split()[0].decode()
    assert digest == hashlib.sha256(data).hexdigest()
    info = tiny.stat("/tmp/blob.bin")
    assert (info.type, info.size) == (REGULAR, len(data))
    # overwrite with something shorter: no stale tail
    tiny.write_file("/tmp/blob.bin", b"\x00\xffshort")
    assert tiny.read_file("/tmp/blob.bin") == b"\x00\xffshort"


def test_append_and_mode(tiny):
    assert tiny.write_file("/tmp/log", "one\n") == 4
    assert tiny.write_file("/tmp/log", "two\n", append=True) == 8
    assert tiny.write_file("/tmp/new-by-append", b"x", append=True) == 1
    assert tiny.read_file("/tmp/log") == b"one\ntwo\n"
    assert tiny.read_file("/tmp/new-by-append") == b"x"

    tiny.write_file("/tmp/secret", "s", mode=0o600)
    assert tiny.stat("/tmp/secret").mode == 0o600
    assert ok(tiny, "stat -c %a /tmp/secret") == b"600\n"
    tiny.write_file("/tmp/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert ok(tiny, "/tmp/run.sh") == b"ran\n"
    tiny.write_file("/tmp/default", "d")
    assert tiny.stat("/tmp/default").mode == 0o644
    # rewriting a file sets the requested mode again
    tiny.write_file("/tmp/secret", "s2", mode=0o640)
    assert tiny.stat("/tmp/secret").mode == 0o640


def test_make_parents(tiny):
    with pytest.raises(deltabox.NotFound):
        tiny.write_file("/tmp/p/q/r/file", "x")
    tiny.write_file("/tmp/p/q/r/file", "x", make_parents=True)
    assert ok(tiny, "cat /tmp/p/q/r/file") == b"x"
    assert tiny.stat("/tmp/p/q").type == DIRECTORY
    tiny.write_file("/tmp/p/q/r/file2", "y", make_parents=True)   # parents exist: fine
    assert sorted(e.name for e in tiny.list_dir("/tmp/p/q/r")) == ["file", "file2"]


def test_read_ranges(tiny):
    data = bytes(range(256)) * 4
    tiny.write_file("/tmp/r", data)
    assert tiny.read_file("/tmp/r", offset=10, length=5) == data[10:15]
    assert tiny.read_file("/tmp/r", offset=1000) == data[1000:]
    assert tiny.read_file("/tmp/r", length=7) == data[:7]
    assert tiny.read_file("/tmp/r", offset=1020, length=100) == data[1020:]
    assert tiny.read_file("/tmp/r", offset=5000) == b""
    assert tiny.read_file("/tmp/r", offset=5000, length=10) == b""
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("/tmp/r", offset=-1)
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("/tmp/r", length=-1)
    with pytest.raises(deltabox.InvalidArgument, match="2\\^63"):  # not pread's EINVAL
        tiny.read_file("/tmp/r", offset=(1 << 63) - 1, length=10)


def test_a_symlink_to_bytes_that_are_not_utf8_lists(tiny):
    """Root in the sandbox makes the link; ListDir and StatPath of it must still answer
    (its target shown with backslash escapes), not fail for the whole directory."""
    ok(tiny, "mkdir -p /tmp/l && ln -s \"$(printf 'a\\377\\376')\" /tmp/l/bad")
    [entry] = tiny.list_dir("/tmp/l")
    assert entry.link_target == "a\\xff\\xfe"
    assert tiny.stat("/tmp/l/bad").link_target == "a\\xff\\xfe"


def test_list_dir_of_a_huge_directory_is_refused_early(tmp_path, monkeypatch):
    """A directory with millions of entries (the sandbox's to make) is refused once past
    MAX_LIST_ENTRIES, not turned into gigabytes of FileInfo first."""
    import subprocess
    from deltabox.core import files as files_mod
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    for i in range(11):
        (root / "d" / f"f{i}").touch()
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    try:
        files = files_mod.SandboxFiles(root, 1 << 20)
        assert len(files.list("/d")) == 11
        monkeypatch.setattr(files_mod, "MAX_LIST_ENTRIES", 10)
        with pytest.raises(deltabox.ResourceExhausted, match="more than 10 entries"):
            files.list("/d")
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_a_root_that_is_no_longer_mounted_is_refused(tmp_path):
    """A file call that began before a destroy or rollback unmounted the branch finds an
    empty directory at its path: it must not write there (the write would be lost and
    the directory left behind), but say the files are gone."""
    from deltabox.core.files import SandboxFiles
    root = tmp_path / "mnt-branch"
    root.mkdir()
    files = SandboxFiles(root, 1 << 20)
    with pytest.raises(deltabox.FailedPrecondition, match="not mounted any more"):
        files.write("/zz/f", b"x", make_parents=True)
    with pytest.raises(deltabox.FailedPrecondition, match="not mounted any more"):
        files.mkdir("/d", parents=True)
    assert os.listdir(root) == []


def test_list_dir_sorted_with_types(tiny):
    ok(tiny, "mkdir -p /tmp/ls/b && printf 12345 > /tmp/ls/c && touch /tmp/ls/a "
             "&& ln -s a /tmp/ls/d && ln -s /nowhere /tmp/ls/Z")
    entries = tiny.list_dir("/tmp/ls")
    assert [e.name for e in entries] == ["Z", "a", "b", "c", "d"]
    by = {e.name: e for e in entries}
    assert [by[n].type for n in ("Z", "a", "b", "c", "d")] == \
        [SYMLINK, REGULAR, DIRECTORY, REGULAR, SYMLINK]
    assert by["c"].size == 5
    assert (by["d"].link_target, by["Z"].link_target) == ("a", "/nowhere")
    assert by["a"].link_target == ""
    assert by["a"].path == "/tmp/ls/a"
    assert tiny.list_dir("/tmp/ls/b") == []
    root = [e.name for e in tiny.list_dir("/")]
    assert root == sorted(root) and {"bin", "etc", "tmp"} <= set(root)
    with pytest.raises(deltabox.NotFound):
        tiny.list_dir("/tmp/nope")


def test_stat_does_not_follow_symlinks(tiny):
    ok(tiny, "ln -s /etc/passwd /tmp/pw && ln -s /missing /tmp/dangling")
    link = tiny.stat("/tmp/pw")
    assert (link.type, link.link_target, link.size) == (SYMLINK, "/etc/passwd", 11)
    assert (link.name, link.path) == ("pw", "/tmp/pw")
    target = tiny.stat("/etc/passwd")
    assert target.type == REGULAR
    assert target.size == int(ok(tiny, "wc -c < /etc/passwd"))
    assert tiny.stat("/tmp/dangling").type == SYMLINK
    assert tiny.stat("/").type == DIRECTORY
    assert tiny.stat("/etc").type == DIRECTORY
    with pytest.raises(deltabox.NotFound):
        tiny.stat("/tmp/absent")


def test_remove(tiny):
    ok(tiny, "mkdir -p /tmp/rm/full/sub /tmp/rm/empty /tmp/rm/keep && touch /tmp/rm/f "
             "/tmp/rm/full/sub/x /tmp/rm/keep/k && ln -s keep /tmp/rm/keep-link "
             "&& ln -s /tmp/rm/full /tmp/rm/dir-link")
    tiny.remove("/tmp/rm/f")
    assert not exists_inside(tiny, "/tmp/rm/f")
    tiny.remove("/tmp/rm/empty")
    assert not exists_inside(tiny, "/tmp/rm/empty")
    with pytest.raises(deltabox.FailedPrecondition):
        tiny.remove("/tmp/rm/full")
    assert exists_inside(tiny, "/tmp/rm/full/sub/x")
    # a symlink goes, never what it points at (recursive or not)
    tiny.remove("/tmp/rm/keep-link", recursive=True)
    assert not exists_inside(tiny, "/tmp/rm/keep-link")
    assert exists_inside(tiny, "/tmp/rm/keep/k")
    tiny.remove("/tmp/rm/dir-link")
    assert exists_inside(tiny, "/tmp/rm/full/sub/x")
    tiny.remove("/tmp/rm/full", recursive=True)
    assert not exists_inside(tiny, "/tmp/rm/full")
    with pytest.raises(deltabox.NotFound):
        tiny.remove("/tmp/rm/f")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.remove("/")


def test_mkdir(tiny):
    tiny.mkdir("/tmp/m1")
    assert tiny.stat("/tmp/m1").type == DIRECTORY
    with pytest.raises(deltabox.AlreadyExists):
        tiny.mkdir("/tmp/m1")
    with pytest.raises(deltabox.NotFound):
        tiny.mkdir("/tmp/m2/a/b")
    tiny.mkdir("/tmp/m2/a/b", parents=True)
    assert ok(tiny, "test -d /tmp/m2/a/b && echo yes") == b"yes\n"
    tiny.mkdir("/tmp/m2/a/b", parents=True)    # exists: fine with parents
    tiny.mkdir("/tmp/m3", mode=0o700)
    assert tiny.stat("/tmp/m3").mode == 0o700
    tiny.write_file("/tmp/file", "x")
    with pytest.raises(deltabox.AlreadyExists):
        tiny.mkdir("/tmp/file", parents=True)


def test_errors(tiny):
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/no/such/file")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("/etc")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.write_file("/etc", "x")
    assert tiny.stat("/etc").type == DIRECTORY
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/etc/passwd/x")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("")
    with pytest.raises(deltabox.InvalidArgument):
        tiny.read_file("/tmp/a\0b")
    ok(tiny, "mkdir -p /tmp/full && touch /tmp/full/x")
    with pytest.raises((deltabox.FailedPrecondition, deltabox.AlreadyExists)):
        tiny.remove("/tmp/full")
    with pytest.raises(deltabox.NotFound):
        tiny.remove("/tmp/absent")
    with pytest.raises(deltabox.NotFound):
        tiny.list_dir("/tmp/absent")


def test_api_and_exec_see_the_same_files(tiny):
    tiny.write_file("/root/from-api", "api says hi\n")
    assert ok(tiny, "cat /root/from-api") == b"api says hi\n"
    ok(tiny, "printf 'exec says hi' > /root/from-exec && mkdir /root/dir-from-exec")
    assert tiny.read_file("/root/from-exec") == b"exec says hi"
    assert {"from-api", "from-exec", "dir-from-exec"} <= {e.name for e in tiny.list_dir("/root")}
    tiny.remove("/root/from-exec")
    assert not exists_inside(tiny, "/root/from-exec")
    tiny.mkdir("/root/dir-from-api")
    assert ok(tiny, "test -d /root/dir-from-api && echo d") == b"d\n"
    tiny.write_file("/root/from-api", "v2", append=True)
    assert ok(tiny, "cat /root/from-api") == b"api says hi\nv2"


# ---- confinement --------------------------------------------------------------------------

def test_dotdot_stays_in_sandbox(tiny, host):
    inside_passwd = ok(tiny, "cat /etc/passwd")
    assert inside_passwd != Path("/etc/passwd").read_bytes()
    up = "/" + "../" * 12
    assert tiny.read_file(up + "etc/passwd") == inside_passwd
    assert tiny.read_file("../../../../etc/passwd") == inside_passwd
    assert tiny.read_file("/tmp/../../../../etc/../../etc/passwd") == inside_passwd
    with pytest.raises(deltabox.NotFound):
        tiny.read_file(up + str(host.marker).lstrip("/"))
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/../../../tmp/" + host.marker.name)
    assert [e.name for e in tiny.list_dir(up)] == [e.name for e in tiny.list_dir("/")]
    assert tiny.stat(up + "tmp").type == DIRECTORY
    tiny.write_file(up + "tmp/" + host.new_name, "inside")
    assert ok(tiny, f"cat /tmp/{host.new_name}") == b"inside"
    tiny.mkdir(up + "tmp/" + host.new_name + "-dir")
    with pytest.raises(deltabox.NotFound):
        tiny.remove(up + str(host.victim).lstrip("/"))
    host.check_untouched()


def test_absolute_symlinks_resolve_inside(tiny, host):
    ok(tiny, f"ln -s / /tmp/root && ln -s /etc/passwd /tmp/pw && ln -s {host.marker} /tmp/hm "
             f"&& ln -s {host.dir} /tmp/hd && ln -s ../../../../../../.. /tmp/up")
    inside_passwd = ok(tiny, "cat /etc/passwd")
    assert tiny.read_file("/tmp/pw") == inside_passwd
    assert tiny.read_file("/tmp/root/etc/passwd") == inside_passwd
    assert tiny.read_file("/tmp/up/etc/passwd") == inside_passwd
    assert tiny.read_file("/tmp/root/tmp/root/tmp/pw") == inside_passwd
    assert [e.name for e in tiny.list_dir("/tmp/root")] == [e.name for e in tiny.list_dir("/")]
    for path in ("/tmp/hm", f"/tmp/root{host.marker}", f"/tmp/up{host.marker}", "/tmp/hd/secret"):
        with pytest.raises(deltabox.NotFound):
            tiny.read_file(path)
    with pytest.raises(deltabox.NotFound):
        tiny.list_dir("/tmp/hd")
    assert tiny.stat("/tmp/hm").type == SYMLINK
    host.check_untouched()


def test_symlinks_to_host_branch_path_and_proc_do_not_escape(tiny, host, daemon):
    hostpath = branch_host_path(tiny)
    # sanity: the host path really is the sandbox's root, seen from the host
    ok(tiny, "echo probe > /tmp/probe")
    assert Path(hostpath, "tmp/probe").read_bytes() == b"probe\n"
    ok(tiny, f"ln -s {hostpath} /tmp/own && ln -s {hostpath}/etc/passwd /tmp/ownpw "
             f"&& ln -s /proc/1/root /tmp/p1 && ln -s /proc/self/root /tmp/pself "
             f"&& ln -s /proc/{daemon.proc.pid}/root /tmp/pd")
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/tmp/ownpw")
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/tmp/own/tmp/probe")
    # through the host path, these would land in the sandbox's own /tmp
    with pytest.raises(deltabox.NotFound):
        tiny.write_file(f"/tmp/own/tmp/{host.new_name}", "x")
    try:
        tiny.write_file(f"/tmp/own/tmp/{host.new_name}", "x", make_parents=True)
        # if anything, a path named like the host path was made *inside* the sandbox
        assert ok(tiny, f"cat {hostpath}/tmp/{host.new_name}") == b"x"
    except deltabox.DeltaboxError:
        pass
    assert not exists_inside(tiny, f"/tmp/{host.new_name}")

    host_passwd = Path("/etc/passwd").read_bytes()
    assert ok(tiny, "cat /etc/passwd") != host_passwd
    for link in ("/tmp/p1", "/tmp/pself", "/tmp/pd"):
        for rel, host_data in ((str(host.marker), host.content),
                               (str(host.in_dir), host.content), ("/etc/passwd", host_passwd)):
            try:
                data = tiny.read_file(link + rel)
            except deltabox.DeltaboxError:
                continue
            assert data != host_data, f"{link + rel} read the host's file"
        for make_parents in (False, True):
            try:
                tiny.write_file(f"{link}/tmp/{host.new_name}", "escaped?",
                                make_parents=make_parents)
            except deltabox.DeltaboxError:
                pass
            try:
                tiny.write_file(f"{link}{host.marker}", "escaped?", append=True)
            except deltabox.DeltaboxError:
                pass
        try:
            tiny.remove(f"{link}{host.victim}")
        except deltabox.DeltaboxError:
            pass
    host.check_untouched()


def test_write_through_symlink_stays_inside(tiny, host):
    # Every link points at a host marker path (never at a real host file: a
    # broken daemon must not be able to damage the host running this test).
    # The sandbox has its own files at the same paths.
    ok(tiny, f"mkdir -p {host.dir} && printf inside > {host.marker} && printf inside > {host.in_dir} "
             f"&& ln -s {host.marker} /tmp/w1 && ln -s {host.in_dir} /tmp/w2 "
             f"&& ln -s {host.dir}/{host.new_name} /tmp/w3 "
             f"&& ln -s {host.marker} /tmp/a1 && ln -s {host.in_dir} /tmp/a2 "
             f"&& ln -s {host.dir}/{host.new_name}-a /tmp/a3")
    # plain writes replace the link itself
    for link in ("/tmp/w1", "/tmp/w2", "/tmp/w3"):
        tiny.write_file(link, "replaced")
        info = tiny.stat(link)
        assert (info.type, info.link_target) == (REGULAR, "")
        assert ok(tiny, f"cat {link}") == b"replaced"
    assert ok(tiny, f"cat {host.marker} {host.in_dir}") == b"insideinside"
    # appends follow the link, inside the sandbox
    tiny.write_file("/tmp/a1", "+a1", append=True)
    tiny.write_file("/tmp/a2", "+a2", append=True)
    tiny.write_file("/tmp/a3", "new", append=True)
    assert ok(tiny, f"cat {host.marker}") == b"inside+a1"
    assert ok(tiny, f"cat {host.in_dir}") == b"inside+a2"
    assert ok(tiny, f"cat {host.dir}/{host.new_name}-a") == b"new"
    assert tiny.stat("/tmp/a1").type == SYMLINK
    host.check_untouched()


def test_remove_symlink_removes_link_not_target(tiny, host):
    # links point at host marker paths (disposable), with namesakes inside
    ok(tiny, f"mkdir -p {host.dir} /tmp/tree && echo inside > {host.in_dir} && touch {host.victim} "
             f"&& ln -s {host.victim} /tmp/rv && ln -s {host.dir} /tmp/rd "
             f"&& ln -s {host.dir} /tmp/tree/hostdir && ln -s {host.victim} /tmp/tree/victim "
             f"&& ln -s ../.. /tmp/tree/up && mkdir /tmp/tree/sub && touch /tmp/tree/sub/f")
    tiny.remove("/tmp/rv")
    tiny.remove("/tmp/rd", recursive=True)
    tiny.remove("/tmp/tree", recursive=True)
    for p in ("/tmp/rv", "/tmp/rd", "/tmp/tree"):
        assert not exists_inside(tiny, p)
    # what the links pointed at, inside the sandbox, is all still there
    assert ok(tiny, f"cat {host.in_dir}") == b"inside\n"
    assert exists_inside(tiny, str(host.victim))
    assert exists_inside(tiny, "/etc/passwd") and exists_inside(tiny, "/bin/busybox")
    host.check_untouched()


FLIPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
os.makedirs("/tmp/race/x/tmp", exist_ok=True)
os.symlink("/", "/tmp/race/y")
os.chdir("/tmp/race")
print("ready", flush=True)
flips = 0
while not os.path.exists("/tmp/race-stop"):
    for _ in range(200):
        if libc.renameat2(AT_FDCWD, b"x", AT_FDCWD, b"y", RENAME_EXCHANGE) != 0:
            sys.exit("renameat2: errno %d" % ctypes.get_errno())
        flips += 1
print("flips", flips, flush=True)
"""


def test_symlink_race_never_touches_host(demo, host, client):
    """A process inside flips /tmp/race/x between a directory and a symlink to /
    while the API works through that path: the kernel-side resolution
    (RESOLVE_IN_ROOT) must keep every operation inside the sandbox."""
    out, ready = [], threading.Event()

    def flip():
        try:
            for ev in demo.exec_stream(["python3", "-c", FLIPPER], timeout=60):
                if ev.kind in ("stdout", "stderr"):
                    out.append(ev.stdout or ev.stderr)
                    ready.set()
        except deltabox.DeltaboxError as e:
            out.append(repr(e).encode())
            ready.set()
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    assert ready.wait(20) and out[0].startswith(b"ready"), out

    base = "/tmp/race/x/tmp/"
    marker, victim = host.marker.name, host.victim.name
    outcomes: dict[str, int] = {}
    for i in range(300):
        op = i % 6
        try:
            if op == 0:
                data = demo.read_file(base + marker)
                assert data != host.content, "read a host file"
            elif op == 1:
                demo.write_file(base + marker, b"PWNED")
            elif op == 2:
                demo.write_file(base + f"{host.new_name}-{i}", b"new", make_parents=True)
            elif op == 3:
                demo.write_file(base + marker, b"+", append=True)
            elif op == 4:
                demo.remove(base + victim)
            else:
                names = {e.name for e in demo.list_dir(base)}
                assert host.dir.name not in names, "listed the host's /tmp"
                demo.mkdir(base + f"{host.new_name}-d{i}", parents=True)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except deltabox.DeltaboxError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
    demo.write_file("/tmp/race-stop", "")
    flipper.join(20)
    assert not flipper.is_alive()
    text = b"".join(out).decode(errors="replace")
    flips = int(text.split("flips")[1].split()[0]) if "flips" in text else 0
    assert flips > 1000, f"the race did not run: {text!r}"
    assert outcomes.get("ok", 0) > 30, outcomes        # both states were hit
    host.check_untouched()
    client.status()


# ---- daemon robustness against hostile file types ------------------------------------------

def test_reading_a_fifo_does_not_hang(tiny, daemon):
    """A FIFO made inside the sandbox (no privilege needed) must not block the
    daemon's worker thread on open(): each would pin one thread of the small
    default executor that every file call and create/destroy runs on."""
    ok(tiny, "mkfifo /tmp/fifo")
    try:
        with deltabox.Client(daemon.socket, timeout=5) as c:
            s = c.get(tiny.id)
            t0 = time.monotonic()
            with pytest.raises(deltabox.DeltaboxError) as e:
                s.read_file("/tmp/fifo")
            assert not isinstance(e.value, deltabox.DeadlineExceeded), \
                "ReadFile of a FIFO blocked the daemon until the client gave up"
            assert time.monotonic() - t0 < 5
            with pytest.raises(deltabox.DeltaboxError) as e:
                s.write_file("/tmp/fifo", "x", append=True)
            assert not isinstance(e.value, deltabox.DeadlineExceeded), \
                "appending to a FIFO blocked the daemon until the client gave up"
    finally:
        # release a daemon thread stuck in open() from either side
        tiny.exec("echo x > /tmp/fifo", timeout=1)
        tiny.exec("cat /tmp/fifo > /dev/null", timeout=1)


def test_mkdir_through_symlink_does_not_probe_host(tiny, host):
    """mkdir(parents=True) through a symlink must behave the same whether or not
    the link's target happens to exist on the *host*: an answer that depends on
    the host's file system leaks it (and here reports success for a directory
    that does not exist in the sandbox)."""
    ok(tiny, f"ln -s {host.dir} /tmp/to-host-dir && ln -s /tmp/{host.new_name}-nodir "
             "/tmp/to-nothing")
    outcomes = []
    for link in ("/tmp/to-host-dir", "/tmp/to-nothing"):
        try:
            tiny.mkdir(link, parents=True)
            outcomes.append("ok")
        except deltabox.DeltaboxError as e:
            outcomes.append(type(e).__name__)
            continue
        assert tiny.exec(["test", "-d", link]).exit_code == 0, \
            f"mkdir({link}, parents=True) succeeded but there is no directory in the sandbox"
    assert outcomes[0] == outcomes[1], outcomes
    host.check_untouched()


# ---- property test ------------------------------------------------------------------------

COMPONENTS = ["..", ".", "a", "b", "link", "/", ""]


@pytest.fixture(scope="module")
def maze(daemon, workdir):
    """A sandbox full of ways up and out, and host files named like its entries
    in the host directories an escape would reach."""
    secret = f"HOST-ONLY {uuid.uuid4().hex}".encode()
    planted = []
    with daemon.client() as c:
        sbx = c.create("tiny")
        try:
            hostpath = Path(branch_host_path(sbx))
            # every host ancestor of the sandbox root that is ours to write in
            spots = [workdir, Path("/tmp") / f"deltabox-maze-{uuid.uuid4().hex[:8]}"]
            spots[1].mkdir()
            for d in spots:
                for name in ("a", "b", "link"):
                    (d / name).write_bytes(secret)
                    planted.append(d / name)
            ok(sbx, "mkdir -p /a/b /b && echo in-a-b-a > /a/b/a && echo in-b-b > /b/b "
                    "&& ln -s / /link && ln -s ../../.. /a/link "
                    f"&& ln -s {workdir} /a/b/link && ln -s {workdir}/a /a/a "
                    f"&& ln -s {hostpath}/../../../.. /b/a && ln -s {spots[1]} /b/link "
                    f"&& ln -s /proc/self/root{workdir} /a/b/b")
            yield sbx, secret
        finally:
            sbx.destroy()
            for p in planted:
                p.unlink(missing_ok=True)
            spots[1].rmdir()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=14))
@example(["..", "..", "..", "..", "a"])
@example(["/", "..", "..", "..", "..", "..", "..", "..", "link"])
@example(["a", "a"])
@example(["a", "b", "link", "a"])
@example(["b", "a", "a"])
@example(["b", "link", "b"])
@example(["a", "link", "..", "..", "a"])
@example(["a", "b", "b", "a"])
def test_random_paths_never_read_host_files(maze, parts):
    sbx, secret = maze
    path = "/".join(parts)
    try:
        data = sbx.read_file(path)
    except deltabox.DeltaboxError:
        return
    assert secret not in data, f"{path!r} read a host file"
