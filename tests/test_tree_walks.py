"""The daemon's walks of trees a sandbox wrote: Diff, the sink, squash, deletion, the file API.

Uppers, layers and branch mounts are written by root inside a sandbox, so every entry below
their roots is hostile: a symlink to `/`, to `/proc/1/root` or up a `../../..` chain where a
directory was, planted before a checkpoint or swapped in while the daemon walks. Each test
puts a uniquely named directory on the host, holding a file whose name exists nowhere in
any sandbox, and checks that this name never shows up in an answer or an error message,
that no error names the store's host path, and that nothing on the host changed. A
sanity step shows each probe really put the sandbox's tree in the daemon's way.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import deltabox
from conftest import delete_tree

SYMLINK = deltabox.FileType.SYMLINK

# Where a planted link may point: the host's root three ways (absolute, through pid 1's
# magic link, and up a relative chain long enough to climb out of any store path).
TARGETS = {"root": "/", "proc1": "/proc/1/root", "dotdot": "../" * 40}


def ok(sbx, cmd, **kw) -> bytes:
    r = sbx.exec(cmd, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


class HostDir:
    """/tmp/deltabox-walk-<tag>/secret-<tag> on the host. Sandboxes get a directory of
    the same path (so a walk through a planted link has somewhere to go), never the
    file: its name in any answer or error means the daemon read the host."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:12]
        self.dir = Path("/tmp") / f"deltabox-walk-{self.tag}"
        self.dir.mkdir()
        self.secret = f"secret-{self.tag}"
        self.content = f"HOST ONLY {self.tag}\n".encode()
        (self.dir / self.secret).write_bytes(self.content)
        self.new = f"new-{self.tag}"  # must never be created on the host

    def leaks(self, text: str) -> bool:
        return self.secret in text

    def check_untouched(self) -> None:
        assert sorted(os.listdir(self.dir)) == [self.secret], os.listdir(self.dir)
        assert (self.dir / self.secret).read_bytes() == self.content
        made = [p for base in (Path("/"), Path("/tmp")) for p in base.iterdir()
                if self.new in p.name]
        assert made == [], f"created on the host: {made}"

    def cleanup(self) -> None:
        for base in (Path("/"), Path("/tmp"), self.dir):
            for p in base.iterdir():
                if self.new in p.name:
                    p.unlink() if not p.is_dir() or p.is_symlink() else os.rmdir(p)
        (self.dir / self.secret).unlink(missing_ok=True)
        self.dir.rmdir()


@pytest.fixture
def host():
    h = HostDir()
    yield h
    h.cleanup()


def clean_message(e: Exception, host: HostDir, daemon, asked: str = "") -> str:
    """The error's text, checked: no host file name (other than in `asked`, the path the
    client itself gave) and no host path of the store."""
    text = str(e)
    assert not host.leaks(text.replace(asked, "")), f"an error names a host file: {text}"
    assert str(daemon.state_dir) not in text and "/store/" not in text, \
        f"an error names the store's host path: {text}"
    return text


@pytest.fixture
def tsbx(client):
    s = client.create("tiny")
    yield s
    try:
        delete_tree(client, s)
    except deltabox.NotFound:
        pass


# ---- (a) Diff of a live sandbox whose directory is swapped for a symlink ---------------------

SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
target, hostdir = sys.argv[1], sys.argv[2]
os.makedirs("/work/x" + hostdir, exist_ok=True)     # /work/x/tmp/deltabox-walk-<tag>
os.symlink(target, "/work/y")
os.chdir("/work")
print("ready", flush=True)
flips = 0
while not os.path.exists("/stop-swapping"):
    for _ in range(200):
        if libc.renameat2(AT_FDCWD, b"x", AT_FDCWD, b"y", RENAME_EXCHANGE) != 0:
            sys.exit("renameat2: errno %d" % ctypes.get_errno())
        flips += 1
print("flips", flips, flush=True)
"""


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_diff_of_a_live_sandbox_never_walks_a_swapped_in_symlink(client, daemon, demo, host,
                                                                  target):
    """A process keeps exchanging /work/x (a directory) and /work/y (a symlink to the
    host's root) while Diff compares the live sandbox with a checkpoint. A walk by host
    path would, at some point, find x to be the symlink and list the host's directory."""
    ok(demo, "mkdir /work")
    base = demo.checkpoint()
    out, ready = [], threading.Event()

    def swap():
        try:
            for ev in demo.exec_stream(["python3", "-c", SWAPPER, target, str(host.dir)],
                                       timeout=120):
                if ev.kind in ("stdout", "stderr"):
                    out.append(ev.stdout or ev.stderr)
                    ready.set()
        except deltabox.DeltaboxError as e:
            out.append(repr(e).encode())
            ready.set()
    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    try:
        assert ready.wait(30) and out[0].startswith(b"ready"), out
        answers, errors, seen_inside = 0, [], False
        with deltabox.Client(daemon.socket, timeout=30) as c:
            deadline = time.monotonic() + 6
            for _ in range(500):
                if time.monotonic() > deadline and answers >= 20:
                    break
                try:
                    entries = c.diff(base.id, demo.id)
                except deltabox.DeadlineExceeded:
                    pytest.fail("a Diff of the live sandbox ran for 30 s: it walked outside")
                except deltabox.DeltaboxError as e:
                    errors.append(clean_message(e, host, daemon))
                    continue
                answers += 1
                leaked = [p for p, _ in entries if host.leaks(p)]
                assert not leaked, f"Diff listed the host's files: {leaked}"
                seen_inside |= any(p.endswith(host.dir.name) for p, _ in entries)
    finally:
        ok(demo, "touch /stop-swapping")
        swapper.join(30)
    text = b"".join(out).decode(errors="replace")
    flips = int(text.split("flips")[1].split()[0]) if "flips" in text else 0
    assert flips > 1000, f"the swap did not run: {text!r}"
    # sanity: the diffs did see the directory side (and its namesake of the host dir)
    assert seen_inside, "no Diff saw /work/x as a directory"
    # a link met mid-walk counts as "not a directory now": skipped, not an error
    assert answers >= 20 and not errors, (answers, errors[:5])
    host.check_untouched()


# ---- (b) links planted before a checkpoint: diff, squash, rollback ---------------------------

def test_planted_links_in_layers_vs_diff_and_squash(client, daemon, tsbx, host):
    """Checkpoint layers hold whatever the sandbox left: here /work/a<n> are symlinks to
    the host's root in one layer and directories in the next (/work/a<n>/tmp/deltabox-
    walk-<tag>, the host dir's path), plus a symlink straight at the host file and a
    hardlink pair. Overlayfs never merges a directory with a symlink below it; a Diff or
    squash that looked entries up by host path would go through the older layer's link."""
    links = {f"/work/a{i}": t for i, t in enumerate(TARGETS.values())}
    ok(tsbx, "mkdir /work && echo data > /work/h1 && ln /work/h1 /work/h2")
    c0 = tsbx.checkpoint()
    ok(tsbx, " && ".join(f"ln -s {t} {p}" for p, t in links.items())
       + f" && ln -s {host.dir}/{host.secret} /work/s && ln -s {host.dir} /work/d")
    c1 = tsbx.checkpoint()
    ok(tsbx, " && ".join(f"rm {p} && mkdir -p {p}{host.dir}" for p in links)
       + " && echo more > /work/h2")
    c2 = tsbx.checkpoint()

    inside = {(p + sub, "added") for p in links
              for sub in ("/tmp", f"/tmp/{host.dir.name}")} | {(p, "modified") for p in links}
    for a, b in ((c1, c2), (c0, c2), (c2, c0), (c1, tsbx.id), (c0, tsbx.id)):
        try:
            entries = client.diff(a, b)
        except deltabox.DeltaboxError as e:
            pytest.fail(f"diff failed: {clean_message(e, host, daemon)}")
        leaked = [p for p, _ in entries if host.leaks(p)]
        assert not leaked, f"Diff went through a planted link: {leaked}"
    got = {e for e in client.diff(c1, c2) if e[0].startswith("/work/a")}
    assert got == inside, got   # sanity: the directories are compared, and only them

    # Deeper than max_chain_depth (32): the daemon squashes the chain in the background.
    cks = []
    for i in range(34):
        ok(tsbx, f"echo {i} > /work/counter")
        cks.append(tsbx.checkpoint())
    deadline = time.monotonic() + 90
    while max(len(c.layer_ids) for c in tsbx.checkpoints()) > 32:
        assert time.monotonic() < deadline, "the chain was not squashed"
        time.sleep(0.2)
    image_depth = len(next(i for i in client.list_images() if i.name == "tiny").layer_ids)
    squashed = [c for c in tsbx.checkpoints() if c.id in {k.id for k in cks}
                and len(c.layer_ids) == image_depth + 1]
    assert squashed, "no checkpoint mounts a squashed chain"
    entries = client.diff(c0, squashed[-1])
    assert not [p for p, _ in entries if host.leaks(p)]
    assert {e for e in entries if e[0].startswith("/work/a")} == \
        {(p + sub, "added") for p in links for sub in ("", "/tmp", f"/tmp/{host.dir.name}")}
    # The squashed chain shows what the sandbox had: directories, the links, one file.
    tsbx.rollback(squashed[-1])
    for p in links:
        assert ok(tsbx, f"ls -A {p}{host.dir}") == b"", p
    assert ok(tsbx, "readlink /work/s") == f"{host.dir}/{host.secret}\n".encode()
    assert ok(tsbx, "readlink /work/d") == f"{host.dir}\n".encode()
    inodes = ok(tsbx, "stat -c %i /work/h1 /work/h2").split()
    assert len(inodes) == 2 and inodes[0] == inodes[1], inodes
    assert ok(tsbx, "cat /work/h1") == b"more\n"
    host.check_untouched()


def test_deep_trees_are_walked_and_removed_without_recursion(client, daemon, tsbx, host):
    """A sandbox can nest directories deeper than Python's recursion limit. Checkpoint,
    diff, the file API's recursive remove and the deletion of the branch and of the
    checkpoint's layer must all handle it (a RecursionError would leave the branch on
    disk and fail every later start-up's clean-up), and a link at the bottom is a link."""
    depth = 1100
    ok(tsbx, f"mkdir /work && cd /work && i=0; while [ $i -lt {depth} ]; do "
             "mkdir dd && cd dd || exit 1; i=$((i+1)); done; ln -s / up && "
             f"mkdir -p .{host.dir} && echo bottom > f")
    c1 = tsbx.checkpoint()
    assert [e for e in client.diff(c1, tsbx.id) if e[0].startswith("/work")] == []
    ok(tsbx, "cp -a /work /work2")
    entries = [e for e in client.diff(c1, tsbx.id) if e[0].startswith("/work")]
    # /work2, its `depth` directories, and up, tmp, tmp/deltabox-walk-<tag> and f below
    assert len(entries) == depth + 5, (len(entries), entries[:3])
    assert {c for _, c in entries} == {"added"}
    assert not [p for p, _ in entries if host.leaks(p)]
    tsbx.remove("/work2", recursive=True)
    assert tsbx.exec(["test", "-e", "/work2"]).exit_code == 1
    branch, layer = tsbx.refresh().info.branch_id, c1.layer_ids[-1]
    delete_tree(client, tsbx)
    store = daemon.state_dir / "store"
    assert not (store / "branches" / branch).exists() and not (store / "layers" / layer).exists()
    host.check_untouched()


# ---- (c) the file API through links to host paths -------------------------------------------

def test_file_api_through_links_to_host_paths_stays_inside(tiny, host, daemon):
    """Read, write, append, list, stat, mkdir and remove through every kind of link to the
    host: each resolves inside the sandbox (RESOLVE_IN_ROOT), so it fails or acts on the
    sandbox's own namesake, and the host dir is untouched."""
    hd = str(host.dir)
    ok(tiny, f"mkdir -p {hd} && echo inside > {hd}/mine && "
             + " && ".join(f"ln -s {t} /tmp/to-{k}" for k, t in TARGETS.items())
             + f" && ln -s {hd}/{host.secret} /tmp/to-secret && ln -s {hd} /tmp/to-dir")
    # /proc/1/root inside: the branch's own (empty) /proc on the host side, so nothing
    proc = f"/tmp/to-proc1{hd}"
    for probe in (lambda: tiny.list_dir(proc), lambda: tiny.read_file(f"{proc}/mine"),
                  lambda: tiny.write_file(f"{proc}/{host.new}", "x"),
                  lambda: tiny.write_file(f"{proc}/{host.new}", "x", append=True),
                  lambda: tiny.stat(f"{proc}/{host.secret}"),
                  lambda: tiny.remove(f"{proc}/{host.secret}")):
        with pytest.raises(deltabox.NotFound) as e:
            probe()
        clean_message(e.value, host, daemon, proc)
    ways = [f"/tmp/to-{k}{hd}" for k in TARGETS if k != "proc1"] + ["/tmp/to-dir"]
    for way in ways:
        # the sandbox's namesake of the host dir is what every way reaches
        names = {e.name for e in tiny.list_dir(way)}
        assert "mine" in names and host.secret not in names, (way, names)
        assert tiny.read_file(f"{way}/mine") == b"inside\n"
        asked = f"{way}/{host.secret}"
        for probe in (lambda: tiny.read_file(asked), lambda: tiny.stat(asked),
                      lambda: tiny.remove(asked), lambda: tiny.write_file(asked + "/x", "x")):
            with pytest.raises(deltabox.NotFound) as e:
                probe()
            clean_message(e.value, host, daemon, asked)
        tiny.write_file(f"{way}/{host.new}", "made inside")
        tiny.mkdir(f"{way}/{host.new}-d/sub", parents=True)
    with pytest.raises(deltabox.NotFound):
        tiny.read_file("/tmp/to-secret")
    assert tiny.stat("/tmp/to-secret").type == SYMLINK          # not followed
    tiny.write_file("/tmp/to-secret", "x", append=True)        # follows it, inside
    assert ok(tiny, f"cat {hd}/{host.secret}") == b"x"
    tiny.remove("/tmp/to-dir", recursive=True)                  # the link goes, not its target
    assert sorted(ok(tiny, f"ls -A {hd}").split()) == \
        sorted([b"mine", host.secret.encode(), host.new.encode(), f"{host.new}-d".encode()])
    tiny.write_file("/tmp/to-secret", "replaces the link")
    assert tiny.stat("/tmp/to-secret").type != SYMLINK
    host.check_untouched()


LISTER_RACE = r"""
import os, sys
os.makedirs("/tmp/lr/x/sub", exist_ok=True)
os.symlink(sys.argv[1], "/tmp/lr/x/link")
os.chdir("/tmp/lr/x")
print("ready", flush=True)
n = 0
while not os.path.exists("/tmp/lr-stop"):   # entries come and go, change type
    for name in ("a", "b", "c"):
        try:
            os.mkdir(name)
            os.rmdir(name)
            os.symlink("/", name)
            os.unlink(name)
            open(name, "w").close()
            os.unlink(name)
        except OSError:
            pass
        n += 1
print("rounds", n, flush=True)
"""


def test_list_and_stat_of_a_changing_directory(demo, host, daemon):
    """Entries vanish and change type while ListDir and Stat look at them: the answers
    are complete for what stayed, never an internal error, never about the host."""
    out, ready = [], threading.Event()

    def churn():
        for ev in demo.exec_stream(["python3", "-c", LISTER_RACE, str(host.dir)], timeout=120):
            if ev.kind in ("stdout", "stderr"):
                out.append(ev.stdout or ev.stderr)
                ready.set()
    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        assert ready.wait(30), out
        for i in range(300):
            names = {e.name for e in demo.list_dir("/tmp/lr/x")}
            assert {"sub", "link"} <= names and host.secret not in names, names
            try:
                info = demo.stat(f"/tmp/lr/x/{'abc'[i % 3]}")
                assert info.type in (deltabox.FileType.DIRECTORY, SYMLINK, deltabox.FileType.REGULAR)
            except deltabox.NotFound as e:
                clean_message(e, host, daemon, "/tmp/lr/x/")
            assert demo.stat("/tmp/lr/x/link").link_target == str(host.dir)
            with pytest.raises(deltabox.NotFound):
                demo.list_dir(f"/tmp/lr/x/link/{host.secret}")
    finally:
        demo.write_file("/tmp/lr-stop", "")
        t.join(30)
    assert b"rounds" in b"".join(out), out
    host.check_untouched()


# ---- (d) trees and files that cost the daemon more than the sandbox ---------------------------

def test_a_walk_refuses_a_path_longer_than_its_bound(tmp_path):
    """A chain of long-named directories costs the sandbox a few inodes and the daemon's
    walks depth^2 bytes of paths (outside any cgroup): past MAX_WALK_PATH bytes of path a
    walk refuses, naming where, instead of allocating gigabytes."""
    from deltabox.core.fdwalk import MAX_WALK_PATH, walk_tree
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        name, cur = "n" * 250, fd
        for _ in range(MAX_WALK_PATH // 251 + 2):
            os.mkdir(name, dir_fd=cur)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            if cur != fd:
                os.close(cur)
            cur = nxt
        os.close(cur)
        with pytest.raises(deltabox.FailedPrecondition, match="nested this deep"):
            for _ in walk_tree(fd):
                pass
    finally:
        os.close(fd)


def test_sparse_files_are_compared_by_what_they_hold(tmp_path):
    """Diff compares two files of the same size and mtime byte by byte: a sandbox's
    `truncate -s 1T` made that a day's read; only the ranges holding data are read."""
    from deltabox.core.deltafs import _same_bytes
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(1 << 40)
            f.seek(1 << 30)
            f.write(b"same")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        t0 = time.monotonic()
        assert _same_bytes(fa.fileno(), fb.fileno())
        assert time.monotonic() - t0 < 5
    with open(b, "r+b") as f:
        f.seek((1 << 39) + 7)
        f.write(b"x")  # data in b where a has a hole
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert not _same_bytes(fa.fileno(), fb.fileno())
    with open(a, "r+b") as f:
        f.seek((1 << 39) + 7)
        f.write(b"x")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert _same_bytes(fa.fileno(), fb.fileno())


def test_the_daemon_runs_with_its_hard_fd_limit(new_daemon):
    """A walk holds a directory fd per level: a daemon started from a shell (soft limit
    often 1,024) failed deep trees with EMFILE -- and every other thread's opens with it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # as a login shell has it
    try:
        d = new_daemon().start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(ln for ln in open(f"/proc/{d.pid}/limits").read().splitlines()
                if ln.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)], line


def test_a_tree_deeper_than_the_fd_limit_is_deleted(tmp_path):
    """Deleting holds at most MAX_OPEN_LEVELS directory fds, however deep the tree: one
    deeper than the fd limit was undeletable (EMFILE), its branch left on disk."""
    import resource
    from deltabox.core.fdwalk import remove_tree_contents
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    cur = root
    for i in range(1500):
        os.mkdir("d", dir_fd=cur)
        if i % 100 == 0:
            open(f"/proc/self/fd/{cur}/f", "w").close()
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
        if cur != root:
            os.close(cur)
        cur = nxt
    os.symlink("/", "up", dir_fd=cur)
    os.close(cur)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        remove_tree_contents(root)
        assert os.listdir(tmp_path) == []
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(root)
        # Left by a failure, a tree this deep breaks pytest's own clean-up of old temp
        # dirs (shutil.rmtree recurses): rm(1) walks it without recursion.
        subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path)], check=False)
