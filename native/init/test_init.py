#!/usr/bin/env python3
"""Exercise deltabox-init for real: namespaces, mounts, ptys, the control socket.

usage (as root):  python3 native/init/test_init.py path/to/deltabox-init

Builds a busybox rootfs, mounts an overlay over it (as the daemon does), launches
the init, talks to /proc/<pid>/root/dev/.deltabox/init.sock and checks the
behaviour promised in docs/init-protocol.md.  Standard library only.
"""
import errno
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BUSYBOX = "/bin/busybox"
HOSTNAME = "dbx-test"
# Docker's default capability set minus MKNOD (see deltabox-init.c)
ALLOWED_CAPS = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 29, 31]
CAP_SYS_ADMIN = 21


# --------------------------------------------------------------- protocol client

def spawn_payload(argv, env=None, cwd=None, pty=False, winsize=None, session=None, keep=False):
    recs = [b"a:" + a.encode() for a in argv]
    recs += [b"e:" + e.encode() for e in (env or [])]
    if cwd:
        recs.append(b"c:" + cwd.encode())
    if pty:
        recs.append(b"t:1")
    if winsize:
        recs.append(b"w:%dx%d" % winsize)
    if session:
        recs.append(b"n:" + session.encode())
    if keep:
        recs.append(b"k:1")
    return b"".join(r + b"\0" for r in recs)


def records(payload):
    assert payload.endswith(b"\0"), payload
    return {r[:1].decode(): r[2:].decode() for r in payload.split(b"\0")[:-1]}


class Conn:
    def __init__(self, path, timeout=15):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, ftype, payload=b""):
        self.sock.sendall(ftype.encode() + struct.pack("<I", len(payload)) + payload)

    def _recv_exact(self, n):
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def recv(self):
        """Next frame as (type, payload), or None at EOF."""
        hdr = self._recv_exact(5)
        if hdr is None:
            return None
        (n,) = struct.unpack("<I", hdr[1:])
        payload = self._recv_exact(n) if n else b""
        assert payload is not None, "EOF inside a frame"
        return chr(hdr[0]), payload

    def expect(self, ftype):
        f = self.recv()
        assert f is not None and f[0] == ftype, f"expected {ftype!r}, got {f!r}"
        return f[1]

    def spawn(self, argv, **kw):
        self.send("S", spawn_payload(argv, **kw))
        f = self.recv()
        assert f is not None, "EOF after SPAWN"
        if f[0] == "P":
            return struct.unpack("<I", f[1])[0]
        raise SpawnFailed(f)

    def collect(self, until_text=None):
        """Read frames until E (or until `until_text` shows up in stdout)."""
        out, err, status = bytearray(), bytearray(), None
        while True:
            f = self.recv()
            if f is None:
                break
            t, p = f
            if t == "O":
                out += p
                if until_text is not None and until_text in out:
                    break
            elif t == "R":
                err += p
            elif t == "E":
                (status,) = struct.unpack("<i", p)
                assert self.recv() is None, "connection not closed after E"
                break
            else:
                raise AssertionError(f"unexpected frame {f!r}")
        return bytes(out), bytes(err), status

    def close(self):
        self.sock.close()


class SpawnFailed(Exception):
    def __init__(self, frame):
        super().__init__(frame)
        self.frame = frame


# ----------------------------------------------------------------- the sandbox

class Sandbox:
    def __init__(self, binary, pid=None):
        """A new sandbox to build(), or (pid=...) a handle on a running one."""
        self.binary = binary
        self.base = None if pid else tempfile.mkdtemp(prefix="dbx-init-test-")
        self.mounts = []
        self.cgroups = []
        self.pid = pid
        self.sock_path = f"/proc/{pid}/root/dev/.deltabox/init.sock" if pid else None
        self.extra_pids = []      # restored copies, killed with the sandbox

    def mount(self, *args):
        subprocess.run(["mount", *args], check=True)
        self.mounts.append(args[-1])

    def build(self):
        # Everything on a tmpfs so cleanup is one umount away.
        self.mount("-t", "tmpfs", "tmpfs", self.base)
        lower = os.path.join(self.base, "lower")
        for d in ("bin", "proc", "dev", "etc", "root", "mnt", "data", "opt/bin"):
            os.makedirs(os.path.join(lower, d))
        shutil.copy(BUSYBOX, os.path.join(lower, "bin/busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                                 check=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", os.path.join(lower, "bin", a))
        with open(os.path.join(lower, "etc/passwd"), "w") as f:
            f.write("root:x:0:0:root:/root:/bin/sh\n")
        self.big = os.urandom(10 * 1000 * 1000)
        with open(os.path.join(lower, "data/big"), "wb") as f:
            f.write(self.big)
        with open(os.path.join(lower, "opt/bin/hello-from-opt"), "w") as f:
            f.write("#!/bin/sh\necho opt-path-used\n")
        os.chmod(os.path.join(lower, "opt/bin/hello-from-opt"), 0o755)
        for d in ("upper", "work", "merged"):
            os.makedirs(os.path.join(self.base, d))
        self.rootfs = os.path.join(self.base, "merged")
        self.mount("-t", "overlay", "overlay", "-o",
                   f"lowerdir={lower},upperdir={self.base}/upper,workdir={self.base}/work",
                   self.rootfs)
        # one v1 and one v2 cgroup, as the daemon would pass
        name = os.path.basename(self.base)
        for root in ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/unified"):
            if os.path.isdir(root):
                path = os.path.join(root, name)
                os.mkdir(path)
                self.cgroups.append(path)

    def launch(self):
        cmd = [self.binary, "--rootfs", self.rootfs, "--hostname", HOSTNAME]
        for cg in self.cgroups:
            cmd += ["--cgroup-procs", os.path.join(cg, "cgroup.procs")]
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        self.launch_ms = (time.monotonic() - t0) * 1000
        assert r.returncode == 0, f"launcher failed rc={r.returncode} stderr={r.stderr!r}"
        assert r.stderr == "", r.stderr
        self.pid = int(r.stdout.strip())
        assert r.stdout == f"{self.pid}\n"
        self.sock_path = f"/proc/{self.pid}/root/dev/.deltabox/init.sock"

    def connect(self):
        return Conn(self.sock_path)

    def run(self, argv, stdin=None, **kw):
        c = self.connect()
        c.spawn(argv, **kw)
        if stdin is not None:
            c.send("I", stdin)
            c.send("i")
        return c.collect()

    def inside(self, path):
        """A path inside the sandbox, seen from the host."""
        return f"/proc/{self.pid}/root{path}"

    def query(self, name, **recs):
        """QUERY `name`: (records of `q`, stdout tail, stderr tail), or the `F` payload."""
        c = self.connect()
        c.send("Q", b"".join(f"{k}:{v}".encode() + b"\0" for k, v in
                             [("n", name), *recs.items()]))
        f = c.recv()
        if f[0] == "F":
            assert c.recv() is None
            return f[1]
        assert f[0] == "q", f
        out, err = b"", b""
        while (g := c.recv()) is not None:
            if g[0] == "O":
                out += g[1]
            elif g[0] == "R":
                err += g[1]
            else:
                raise AssertionError(f"unexpected frame {g!r} after q")
        return records(f[1]), out, err

    def alive(self, pid):
        """Running (not a zombie) inside the sandbox."""
        try:
            return open(self.inside(f"/proc/{pid}/stat")).read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):  # ESRCH: reaped while we read
            return False

    def nfds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def destroy(self):
        pids = [p for p in [self.pid] + self.extra_pids if p]
        for pid in pids:
            try:
                os.kill(pid, 9)     # pid 1 dies: the kernel kills its namespace
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", m], check=False)
        self.mounts = []
        for cg in self.cgroups:
            for _ in range(100):
                try:
                    os.rmdir(cg)
                    break
                except OSError:
                    time.sleep(0.05)
        self.cgroups = []
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None


def wait_for(cond, timeout=3.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def exit_code(status):
    return os.waitstatus_to_exitcode(status)


# ------------------------------------------------------------------------ tests

def t_launcher_reports_errors(sb):
    r = subprocess.run([sb.binary, "--rootfs", "/nonexistent-dbx", "--hostname", "x"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and r.stdout == "", r
    assert r.stderr == "ERR chdir rootfs: No such file or directory\n", repr(r.stderr)
    plain = os.path.join(sb.base, "plain")     # a directory, not a mount point
    os.makedirs(plain, exist_ok=True)
    r = subprocess.run([sb.binary, "--rootfs", plain, "--hostname", "x"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and r.stderr.startswith("ERR "), r
    r = subprocess.run([sb.binary, "--rootfs", "/"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr, r


def t_hello(sb):
    c = sb.connect()
    c.send("H")
    assert c.expect("h") == b"deltabox-init 1"
    # the connection stays usable after HELLO
    c.spawn(["echo", "after-hello"])
    out, _, st = c.collect()
    assert out == b"after-hello\n" and st == 0


def t_echo(sb):
    c = sb.connect()
    pid = c.spawn(["echo", "hi"])
    assert pid > 1
    out, err, st = c.collect()
    assert (out, err, st) == (b"hi\n", b"", 0), (out, err, st)


def t_exit_code_and_stderr(sb):
    out, err, st = sb.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out == b"out\n" and err == b"err\n", (out, err)
    assert exit_code(st) == 3 and st == 3 << 8, st


def t_exec_missing(sb):
    c = sb.connect()
    try:
        c.spawn(["/bin/nosuch"])
        raise AssertionError("spawn of a missing binary succeeded")
    except SpawnFailed as e:
        t, p = e.frame
    assert t == "F", (t, p)
    assert p == b"errno=2 exec /bin/nosuch: No such file or directory", p
    assert c.recv() is None


def t_bad_cwd(sb):
    c = sb.connect()
    try:
        c.spawn(["pwd"], cwd="/nonexistent")
        raise AssertionError("spawn with a missing cwd succeeded")
    except SpawnFailed as e:
        assert e.frame == ("F", b"errno=2 chdir /nonexistent: No such file or directory"), e.frame
    out, _, st = sb.run(["pwd"], cwd="/tmp")
    assert out == b"/tmp\n" and st == 0


def t_env(sb):
    out, _, _ = sb.run(["env"])
    assert sorted(out.decode().split()) == sorted([
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root", "TERM=xterm"]), out
    out, _, _ = sb.run(["env"], env=["FOO=bar", "PATH=/bin"])
    assert sorted(out.decode().split()) == ["FOO=bar", "PATH=/bin"], out
    # PATH search uses the env we pass, not init's
    out, _, st = sb.run(["hello-from-opt"], env=["PATH=/opt/bin:/bin"])
    assert out == b"opt-path-used\n" and st == 0, (out, st)
    c = sb.connect()
    try:
        c.spawn(["echo", "x"], env=["PATH=/nonexistent"])
        raise AssertionError("PATH from the env was ignored")
    except SpawnFailed as e:
        assert e.frame[1].startswith(b"errno=2 exec echo: "), e.frame


def t_stdin_relay(sb):
    out, _, st = sb.run(["cat"], stdin=b"hello stdin\n")
    assert out == b"hello stdin\n" and st == 0, (out, st)
    # 5 MB through stdin: exercises init's stdin buffering
    data = os.urandom(5 * 1000 * 1000)
    c = sb.connect()
    c.spawn(["sha256sum"])
    for i in range(0, len(data), 300 * 1000):
        c.send("I", data[i:i + 300 * 1000])
    c.send("i")
    out, _, st = c.collect()
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest() and st == 0


def t_big_output(sb):
    t0 = time.monotonic()
    out, err, st = sb.run(["cat", "/data/big"])
    dt = time.monotonic() - t0
    assert st == 0 and err == b"", (st, err)
    assert len(out) == len(sb.big) and out == sb.big, len(out)
    print(f"    10 MB relayed in {dt * 1000:.0f} ms")


def t_slow_reader_backpressure(sb):
    """A client that stops reading must not make init buffer everything."""
    c = sb.connect()
    c.spawn(["cat", "/data/big"])
    time.sleep(0.5)
    rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{sb.pid}/status").read()).group(1))
    assert rss < 8 * 1024, f"init RSS {rss} kB while a client is stalled"
    out, _, st = c.collect()
    assert out == sb.big and st == 0


def t_signal(sb):
    c = sb.connect()
    c.spawn(["sleep", "100"])
    c.send("K", struct.pack("<I", 15))
    out, _, st = c.collect()
    assert os.WIFSIGNALED(st) and os.WTERMSIG(st) == 15, st


def t_disconnect_kills(sb):
    c = sb.connect()
    pid = c.spawn(["sleep", "1000"])
    assert os.path.exists(sb.inside(f"/proc/{pid}"))
    c.close()
    wait_for(lambda: not os.path.exists(sb.inside(f"/proc/{pid}")), what="sleep to die")


def t_background_grandchild(sb):
    """E comes ~100 ms after the exit even if a grandchild holds the pipe; the
    grandchild (same process group) keeps running, re-parented to init."""
    c = sb.connect()
    t0 = time.monotonic()
    pid = c.spawn(["sh", "-c", "sleep 30 & echo $! ; echo started"])
    out, _, st = c.collect()
    dt = time.monotonic() - t0
    assert st == 0 and out.endswith(b"started\n"), (out, st)
    assert dt < 2, f"E took {dt:.2f}s"
    bg = int(out.split()[0])
    assert pid != bg
    time.sleep(0.3)
    assert sb.alive(bg), "the background sleep died with its exec"
    stat = open(sb.inside(f"/proc/{bg}/stat")).read().rsplit(")", 1)[1].split()
    assert (int(stat[1]), int(stat[2])) == (1, pid), stat   # ppid init, pgid the exec's
    sb.run(["kill", "-9", str(bg)])
    wait_for(lambda: not os.path.exists(sb.inside(f"/proc/{bg}")), what="the sleep to be reaped")
    wait_for(lambda: sb.nfds() == 5, what="init to drop the ended exec's pipes")


def t_background_writer_is_drained(sb):
    """A background process that keeps writing to the ended exec's stdout and stderr
    (in its own session, or not) is neither killed by SIGPIPE nor blocked: init reads
    and discards its output until it closes the pipes."""
    out, _, st = sb.run(["sh", "-c", "setsid sh -c 'while :; do head -c 70000 /dev/zero; "
                         "echo e >&2; sleep 0.01; done' & echo $!"])
    bg = int(out.split(b"\n")[0])
    time.sleep(1.0)
    assert sb.alive(bg), "the background writer died"
    assert sb.nfds() == 7, "init holds its stdout and stderr pipes"
    sb.run(["kill", "-9", str(bg)])
    wait_for(lambda: sb.nfds() == 5, what="init to close the pipes at EOF")


def t_timeout_signal_reaches_background(sb):
    """K (what the daemon's timeout sends) reaches the whole group, background jobs too;
    a disconnect while the process runs kills the group."""
    c = sb.connect()
    c.spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"])
    f = c.recv()
    bg = int(f[1])
    c.send("K", struct.pack("<I", 9))
    _, _, st = c.collect()
    assert os.WTERMSIG(st) == 9
    wait_for(lambda: not sb.alive(bg), what="the background sleep to die of K")
    c = sb.connect()
    c.spawn(["sh", "-c", "sleep 100 & echo $!; sleep 100"])
    bg = int(c.recv()[1])
    c.close()
    wait_for(lambda: not sb.alive(bg), what="the background sleep to die with the call")
    wait_for(lambda: sb.nfds() == 5, what="init to drop the pipes")


def t_kept_process(sb):
    """k:1 -- a detached exec: status, tail and output survive detach and exit."""
    c = sb.connect()
    try:
        c.spawn(["true"], keep=True)
        raise AssertionError("a kept process without a name was accepted")
    except SpawnFailed as e:
        assert e.frame == ("F", b"errno=22 spawn: a kept process needs a name (n:)"), e.frame
    c = sb.connect()
    pid = c.spawn(["sh", "-c", "echo out; echo err >&2; read x; echo got $x; exit 3"],
                  session="exec/k1", keep=True)
    c.close()
    time.sleep(0.2)
    recs, out, err = sb.query("exec/k1", o=1)
    assert recs == {"p": str(pid), "c": "sh -c echo out; echo err >&2; read x; echo got $x; exit 3",
                    "o": "4", "e": "4"}, recs
    assert (out, err) == (b"out\n", b"err\n")
    assert sb.query("exec/k1", r=1) == b"errno=16 query exec/k1: still running"
    a = sb.connect()
    a.send("A", b"exec/k1")
    assert struct.unpack("<I", a.expect("P"))[0] == pid
    assert (a.expect("O"), a.expect("R")) == (b"out\n", b"err\n")   # the tail, replayed
    assert sb.query("exec/k1")[0]["p"] == str(pid)  # QUERY does not conflict with A
    a.send("I", b"v\n")
    out, _, st = a.collect()
    assert out == b"got v\n" and exit_code(st) == 3, (out, st)
    recs, out, err = sb.query("exec/k1", o=1, s=9)
    assert recs["x"] == str(st) and (out, err) == (b"out\ngot v\n", b"err\n"), (recs, out)
    l = sb.connect()
    l.send("L")
    assert b"exec/k1\0" in l.expect("l")
    for _ in range(2):   # an ended kept process replays its tail and E, every time
        a = sb.connect()
        a.send("A", b"exec/k1")
        a.expect("P")
        assert a.collect() == (b"out\ngot v\n", b"err\n", st)
    assert sb.query("exec/k1", r=1)[0]["x"] == str(st)
    assert sb.query("exec/k1") == b"errno=2 query exec/k1: no such process"
    # signal by QUERY, tail bounded to 1 MiB, counters complete
    c = sb.connect()
    pid = c.spawn(["sh", "-c", "cat /data/big; exec sleep 100"], session="exec/k2", keep=True)
    c.close()
    wait_for(lambda: sb.query("exec/k2")[0]["o"] == str(len(sb.big)), what="the output")
    recs, out, _ = sb.query("exec/k2", s=15, o=1)
    assert "x" not in recs and out == sb.big[-(1 << 20):]
    wait_for(lambda: "x" in sb.query("exec/k2")[0], what="SIGTERM to end it")
    assert os.WTERMSIG(int(sb.query("exec/k2", r=1)[0]["x"])) == 15
    assert sb.query("nosuch") == b"errno=2 query nosuch: no such process"
    wait_for(lambda: sb.nfds() == 5, what="init to drop the kept processes' pipes")


def t_kept_processes_are_bounded(sb):
    """At most 32 ended kept processes are remembered: the first to end goes first."""
    for i in range(34):
        c = sb.connect()
        c.spawn(["true"], session=f"exec/b{i}", keep=True)
        c.close()
        wait_for(lambda: "x" in sb.query(f"exec/b{i}")[0], what=f"b{i} to end")
    l = sb.connect()
    l.send("L")
    names = set(l.expect("l").split(b"\0")[0::2]) - {b""}
    assert names == {f"exec/b{i}".encode() for i in range(2, 34)}, sorted(names)
    for i in range(2, 34):
        assert "x" in sb.query(f"exec/b{i}", r=1)[0]


def t_session(sb):
    c = sb.connect()
    pid = c.spawn(["sh"], session="s1")
    c.send("I", b"X=5\n")
    c.send("I", b"sleep 0.3; echo while-detached\n")
    c.close()
    time.sleep(0.6)
    assert os.path.exists(sb.inside(f"/proc/{pid}")), "session died on detach"

    # LIST shows it
    l = sb.connect()
    l.send("L")
    recs = l.expect("l").split(b"\0")
    assert l.recv() is None
    assert recs[:-1][0::2].count(b"s1") == 1
    assert recs[recs.index(b"s1") + 1] == str(pid).encode(), recs

    # name in use
    d = sb.connect()
    try:
        d.spawn(["sh"], session="s1")
        raise AssertionError("duplicate session name accepted")
    except SpawnFailed as e:
        assert e.frame == ("F", b"errno=17 spawn s1: session already exists"), e.frame

    a = sb.connect()
    a.send("A", b"s1")
    assert struct.unpack("<I", a.expect("P"))[0] == pid
    assert a.expect("O") == b"while-detached\n"      # buffered while detached
    b = sb.connect()
    b.send("A", b"s1")
    assert b.expect("F") == b"errno=16 attach s1: session busy"
    a.send("I", b"echo $X\n")
    out, _, _ = a.collect(until_text=b"5\n")
    assert out == b"5\n", out
    a.send("I", b"exit 7\n")
    out, _, st = a.collect()
    assert exit_code(st) == 7, st

    n = sb.connect()
    n.send("A", b"s1")
    assert n.expect("F") == b"errno=2 attach s1: no such session"


def t_detached_output_is_bounded(sb):
    """A detached session never blocks; init keeps only the newest 1 MiB."""
    c = sb.connect()
    c.spawn(["sh"], session="loud")
    c.send("I", b"cat /data/big; echo END\n")
    c.close()
    time.sleep(1.0)
    a = sb.connect()
    a.send("A", b"loud")
    a.expect("P")
    held = a.expect("O")
    assert len(held) == 1 << 20, len(held)
    assert held == (sb.big + b"END\n")[-(1 << 20):]
    a.send("I", b"exit\n")
    _, _, st = a.collect()
    assert st == 0


def t_stdin_backpressure(sb):
    """A child that does not read stdin: init buffers a bounded amount and
    then stops reading the client, so the client's writes block."""
    c = sb.connect()
    c.spawn(["sh", "-c", "sleep 1; wc -c"])
    data = b"x" * (6 * 1000 * 1000)
    sent = threading.Event()

    def sender():
        for i in range(0, len(data), 100 * 1000):
            c.send("I", data[i:i + 100 * 1000])
        c.send("i")
        sent.set()
    t = threading.Thread(target=sender)
    t.start()
    time.sleep(0.5)
    rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{sb.pid}/status").read()).group(1))
    assert not sent.is_set(), "init swallowed 6 MB of stdin nobody reads"
    assert rss < 8 * 1024, f"init RSS {rss} kB"
    t.join()
    out, _, st = c.collect()
    assert out.strip() == b"6000000" and st == 0, out


def t_dump_barrier(sb):
    """After clients close, one LIST read to EOF proves init closed them all."""
    conns = []
    for _ in range(20):
        c = sb.connect()
        c.send("H")
        c.expect("h")
        conns.append(c)
    c = sb.connect()
    c.spawn(["sleep", "100"], session="bar")
    conns.append(c)
    for c in conns:
        c.close()
    quiesce(sb)
    fds = os.listdir(f"/proc/{sb.pid}/fd")
    # 0-2, listening socket, signalfd, and the session's 3 pipes
    assert len(fds) == 8, [os.readlink(f"/proc/{sb.pid}/fd/{f}") for f in fds]
    k = sb.connect()
    k.send("A", b"bar")
    k.expect("P")
    k.send("K", struct.pack("<I", 9))
    k.collect()


def t_session_exit_while_detached(sb):
    c = sb.connect()
    c.spawn(["sleep", "0.2"], session="s2")
    c.close()
    time.sleep(0.6)
    l = sb.connect()
    l.send("L")
    assert b"s2" not in l.expect("l")
    a = sb.connect()
    a.send("A", b"s2")
    assert a.expect("F").endswith(b"no such session")


def t_pty(sb):
    out, err, st = sb.run(["tty"], pty=True)
    assert out == b"/dev/pts/0\r\n" and st == 0 and err == b"", (out, err, st)
    out, _, st = sb.run(["stty", "size"], pty=True, winsize=(30, 100))
    assert out == b"30 100\r\n", out
    c = sb.connect()
    c.spawn(["sh"], pty=True)
    c.send("W", struct.pack("<HH", 40, 120))
    c.send("I", b"stty size; echo $((6*7))\n")
    out, _, _ = c.collect(until_text=b"42\r\n/ # ")
    assert b"40 120" in out, out
    # VEOF on an empty line: the shell exits.  Sent only once the shell is
    # back at its prompt, reading a new line (a ^D typed while a command
    # runs is not EOF for the next line).
    time.sleep(0.1)
    c.send("i")
    _, _, st = c.collect()
    assert st == 0, st


def t_isolation(sb):
    out, _, _ = sb.run(["ls", "/proc"])
    pids = [int(x) for x in out.split() if x.isdigit()]
    assert 1 in pids and len(pids) == 2, pids           # init + ls itself
    out, _, _ = sb.run(["ps", "-o", "pid,comm"])
    assert b"deltabox-init" in out and len(out.splitlines()) == 3, out
    out, _, _ = sb.run(["hostname"])
    assert out == HOSTNAME.encode() + b"\n", out
    status, _, _ = sb.run(["cat", "/proc/self/status"])
    fields = dict(l.split(":", 1) for l in status.decode().splitlines())
    want = sum(1 << c for c in ALLOWED_CAPS)
    for key in ("CapBnd", "CapEff", "CapPrm"):
        v = int(fields[key], 16)
        assert v == want and not v & (1 << CAP_SYS_ADMIN), (key, hex(v))
    assert int(fields["CapAmb"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    out, _, _ = sb.run(["cat", "/proc/net/dev"])
    ifaces = [l.split(":")[0].strip() for l in out.decode().splitlines()[2:]]
    assert ifaces == ["lo"], ifaces
    out, _, _ = sb.run(["ip", "link", "show", "lo"])
    assert b"UP" in out, out
    _, err, st = sb.run(["mount", "-t", "tmpfs", "none", "/mnt"])
    assert st != 0, "mount inside the sandbox succeeded"
    _, _, st = sb.run(["mknod", "/tmp/n", "c", "1", "3"])
    assert st != 0, "mknod inside the sandbox succeeded"
    _, _, st = sb.run(["sh", "-c", "echo 1 > /proc/sys/kernel/domainname"])
    assert st != 0, "/proc/sys is writable"
    out, _, _ = sb.run(["cat", "/proc/self/mountinfo"])
    for line in out.decode().splitlines():
        f = line.split()
        if f[4] in ("/proc/sys", "/proc/sysrq-trigger"):
            assert f[5].startswith("ro"), line
    assert b" / / " in out or True
    out, _, _ = sb.run(["ls", "-a", "/dev"])
    assert sorted(out.split()) == sorted(b". .. .deltabox fd full null ptmx pts random shm "
                                         b"stderr stdin stdout tty urandom zero".split()), out
    out, _, _ = sb.run(["stat", "-c", "%a %A", "/tmp", "/dev/shm", "/dev/null"])
    assert out.split(b"\n")[:3] == [b"1777 drwxrwxrwt", b"1777 drwxrwxrwt",
                                     b"666 crw-rw-rw-"], out
    # the host's root is not reachable
    out, _, _ = sb.run(["ls", "/"])
    assert b"merged" not in out and b"lower" not in out
    # pid 1 runs from its copy on the overlay (CRIU must find its exe there)
    assert os.readlink(f"/proc/{sb.pid}/exe") == "/.deltabox/deltabox-init"
    with open(sb.inside("/.deltabox/deltabox-init"), "rb") as f, open(sb.binary, "rb") as g:
        assert f.read() == g.read()
    out, _, _ = sb.run(["cat", "/proc/1/cmdline"])
    assert out.split(b"\0")[:2] == [b"deltabox-init", b"--serve-as-pid1"], out
    # cgroups were joined before the namespaces were made
    cg = open(f"/proc/{sb.pid}/cgroup").read()
    for path in sb.cgroups:
        assert "/" + os.path.basename(path) in cg, cg


def t_planted_symlinks(sb):
    """A tree whose /tmp, /proc, /dev and /.deltabox are symlinks to host paths
    (a hostile image, or root inside before a relaunch) must not make the
    launcher touch the host: everything is prepared after pivot_root, and
    those names are never followed."""
    host = tempfile.mkdtemp(prefix="dbx-init-host-")
    other = Sandbox(sb.binary)
    try:
        marker = os.path.join(host, "marker")
        with open(marker, "w") as f:
            f.write("host\n")
        os.chmod(marker, 0o600)
        os.chmod(host, 0o700)
        other.build()
        for name, target in (("tmp", marker), ("proc", host), ("dev", host),
                             (".deltabox", host)):
            path = os.path.join(other.rootfs, name)
            if os.path.isdir(path):
                os.rmdir(path)
            os.symlink(target, path)
        other.launch()
        out, _, st = other.run(["sh", "-c", "cat /proc/1/comm; ls -a /dev; ls -ld /tmp"])
        assert st == 0 and b"deltabox-init" in out and b"urandom" in out, out
        assert out.rstrip().endswith(marker.encode()), out  # /tmp left as the link it is
        assert sorted(os.listdir(host)) == ["marker"], os.listdir(host)
        assert os.stat(marker).st_mode & 0o7777 == 0o600
        assert os.stat(host).st_mode & 0o7777 == 0o700
        assert open(marker).read() == "host\n"

        # Junk where the init keeps its copy must not keep it from starting again.
        os.kill(other.pid, 9)
        wait_for(lambda: not os.path.exists(f"/proc/{other.pid}"), what="init exit")
        own = os.path.join(other.rootfs, ".deltabox")
        os.unlink(os.path.join(own, "deltabox-init"))
        os.makedirs(os.path.join(own, "deltabox-init", "x"))
        os.makedirs(os.path.join(own, ".deltabox-init.new", "x"))
        os.mkfifo(os.path.join(own, ".deltabox-init.new.0"))
        other.launch()
        out, _, st = other.run(["sh", "-c", "cat /proc/1/comm; ls -a /.deltabox"])
        assert st == 0 and out.startswith(b"deltabox-init\n"), out
        assert b"moved-aside" in out, out
    finally:
        other.destroy()
        shutil.rmtree(host, ignore_errors=True)


def t_proc_masks(sb):
    """Host-wide kernel state is masked as Docker masks it."""
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
                 "/proc/vmallocinfo", "/proc/slabinfo", "/proc/kpageflags"):
        if os.path.exists(path):
            out, _, st = sb.run(["sh", "-c", f"head -c 64 {path} | wc -c"])
            assert out.strip() == b"0", (path, out)


def t_zombies_reaped(sb):
    out, _, st = sb.run(["sh", "-c", "sleep 0 & exec sleep 1"])
    assert st == 0

    def no_zombies():
        for d in os.listdir(sb.inside("/proc")):
            if d.isdigit():
                try:
                    s = open(sb.inside(f"/proc/{d}/stat")).read()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if s.rsplit(")", 1)[1].split()[0] == "Z":
                    return False
        return True
    wait_for(no_zombies, what="zombies to be reaped")


def t_concurrent(sb):
    errors = []

    def one(i):
        try:
            out, _, st = sb.run(["sh", "-c", f"sleep 0.{i % 3}; echo n{i}"])
            assert out == f"n{i}\n".encode() and st == 0, (out, st)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def t_protocol_errors(sb):
    c = sb.connect()
    c.sock.sendall(b"I" + struct.pack("<I", 2 * 1024 * 1024))
    assert c.expect("F") == b"errno=71 protocol: frame too large"
    assert c.recv() is None
    c = sb.connect()
    c.send("Z")
    assert c.expect("F") == b"errno=71 protocol: unknown frame type"
    c = sb.connect()
    c.send("I", b"x")
    assert c.expect("F").startswith(b"errno=71 protocol:")
    c = sb.connect()
    c.send("S", b"a:echo")          # not NUL-terminated
    assert c.expect("F") == b"errno=22 spawn: records must be NUL-terminated"
    c = sb.connect()
    c.send("S", b"")
    assert c.expect("F").startswith(b"errno=22 spawn:")


def t_init_holds_nothing_from_host(sb):
    """What CRIU will see: only /dev/null, the listening socket, the signalfd."""
    wait_for(lambda: len(os.listdir(f"/proc/{sb.pid}/fd")) == 5, what="init fds to settle")
    links = sorted(os.readlink(f"/proc/{sb.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{sb.pid}/fd"))
    assert links[:3] == ["/dev/null"] * 3, links
    assert links[3] == "anon_inode:[signalfd]" and links[4].startswith("socket:"), links
    # and nothing left running or zombie in the sandbox
    procs = [d for d in os.listdir(sb.inside("/proc")) if d.isdigit()]
    assert procs == ["1"], procs


def find_criu():
    for c in (os.environ.get("CRIU"), "/opt/deltabox/criu/sbin/criu", shutil.which("criu")):
        if c and os.access(c, os.X_OK):
            return c
    return None


def quiesce(sb):
    """The dump barrier: a LIST read to EOF proves init has closed every
    connection whose client went away before it (see docs/init-protocol.md)."""
    c = sb.connect()
    c.send("L")
    c.expect("l")
    assert c.recv() is None


def t_criu_dump_restore(sb):
    """Dump the live sandbox with CRIU and restore a second copy on a new
    overlay branch while the first keeps running (a body double)."""
    criu = find_criu()
    if not criu:
        print("    SKIP: no criu (set CRIU=/path/to/criu)")
        return
    # state that must survive: a shell variable, a pty, a file, the hostname
    c = sb.connect()
    c.spawn(["sh"], session="ck")
    c.send("I", b"Y=9; echo ready\n")
    c.collect(until_text=b"ready\n")
    c.close()
    c = sb.connect()
    c.spawn(["cat"], pty=True, session="ckpty")
    c.close()
    sb.run(["sh", "-c", "echo kept > /tmp/file"])
    # what an exec left running (its group and session leader are gone: CRIU restores
    # them through helpers) and a kept process
    out, _, _ = sb.run(["sh", "-c", "sleep 1000 & echo $!"])
    left = int(out)
    c = sb.connect()
    kept = c.spawn(["sh", "-c", "echo kept-out; exec sleep 1000"], session="exec/ck", keep=True)
    c.close()
    wait_for(lambda: sb.query("exec/ck")[0]["o"] == "9", what="the kept process's output")
    quiesce(sb)

    img = os.path.join(sb.base, "img")
    os.mkdir(img)
    t0 = time.monotonic()
    r = subprocess.run([criu, "dump", "-t", str(sb.pid), "-D", img, "--leave-running",
                        "--root", sb.rootfs, "--external", "mnt[/]:root",
                        "--network-lock", "skip", "-o", "dump.log", "-v4"],
                       capture_output=True, text=True)
    dump_ms = (time.monotonic() - t0) * 1000
    assert r.returncode == 0, open(os.path.join(img, "dump.log")).read()[-3000:]

    # the branch: the upper as of the dump becomes an immutable layer
    layer = os.path.join(sb.base, "layer1")
    subprocess.run(["cp", "-a", os.path.join(sb.base, "upper"), layer], check=True)
    branch = os.path.join(sb.base, "branch")
    for d in ("branch", "upper2", "work2"):
        os.makedirs(os.path.join(sb.base, d))
    sb.mount("-t", "overlay", "overlay", "-o",
             f"lowerdir={layer}:{sb.base}/lower,upperdir={sb.base}/upper2,"
             f"workdir={sb.base}/work2", branch)
    pidfile = os.path.join(sb.base, "restored.pid")
    t0 = time.monotonic()
    r = subprocess.run([criu, "restore", "-D", img, "-d", "--pidfile", pidfile,
                        "--root", branch, "--external", f"mnt[root]:{branch}",
                        "-o", "restore.log", "-v4"], capture_output=True, text=True)
    restore_ms = (time.monotonic() - t0) * 1000
    assert r.returncode == 0, open(os.path.join(img, "restore.log")).read()[-3000:]
    print(f"    criu dump {dump_ms:.0f} ms, restore {restore_ms:.0f} ms")

    orig_pid = sb.pid
    twin = Sandbox(sb.binary, pid=int(open(pidfile).read()))
    sb.extra_pids.append(twin.pid)
    assert twin.pid != orig_pid
    for box in (sb, twin):
        a = box.connect()
        a.send("A", b"ck")
        a.expect("P")
        a.send("I", b"echo Y=$Y; exit 4\n")
        out, _, st = a.collect()
        assert out == b"Y=9\n" and exit_code(st) == 4, (out, st)
        a = box.connect()
        a.send("A", b"ckpty")
        a.expect("P")
        a.send("I", b"ping\n")
        out, _, _ = a.collect(until_text=b"ping\r\nping\r\n")
        a.send("K", struct.pack("<I", 9))
        _, _, st = a.collect()
        assert os.WTERMSIG(st) == 9
        out, _, st = box.run(["sh", "-c", "cat /tmp/file; hostname"])
        assert out == f"kept\n{HOSTNAME}\n".encode(), out
        assert box.alive(left), "the exec's background sleep was not restored"
        recs, out, _ = box.query("exec/ck", o=1, s=9)
        assert recs["p"] == str(kept) and "x" not in recs and out == b"kept-out\n", (recs, out)
        wait_for(lambda: "x" in box.query("exec/ck")[0], what="the kept process to end")
        assert os.WTERMSIG(int(box.query("exec/ck", r=1)[0]["x"])) == 9
        box.run(["kill", "-9", str(left)])
        wait_for(lambda: not box.alive(left), what="the background sleep to end")
        out, _, _ = box.run(["ls", "/proc"])
        assert sorted(int(x) for x in out.split() if x.isdigit())[0] == 1
    # the two copies are independent: a write in one is not seen in the other
    twin.run(["sh", "-c", "echo twin > /tmp/file"])
    assert sb.run(["cat", "/tmp/file"])[0] == b"kept\n"
    assert twin.run(["cat", "/tmp/file"])[0] == b"twin\n"
    t_init_holds_nothing_from_host(twin)


TESTS = [
    t_launcher_reports_errors, t_hello, t_echo, t_exit_code_and_stderr, t_exec_missing,
    t_bad_cwd, t_env, t_stdin_relay, t_big_output, t_slow_reader_backpressure, t_signal,
    t_disconnect_kills, t_background_grandchild, t_background_writer_is_drained,
    t_timeout_signal_reaches_background, t_kept_process, t_kept_processes_are_bounded,
    t_session, t_detached_output_is_bounded,
    t_stdin_backpressure, t_dump_barrier, t_session_exit_while_detached,
    t_pty, t_isolation, t_planted_symlinks, t_proc_masks, t_zombies_reaped, t_concurrent, t_protocol_errors,
    t_init_holds_nothing_from_host, t_criu_dump_restore, t_init_holds_nothing_from_host,
]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if os.geteuid() != 0:
        sys.exit("must run as root")
    if not os.path.exists(BUSYBOX):
        sys.exit(f"{BUSYBOX} missing: apt-get install -y busybox-static")
    sb = Sandbox(os.path.abspath(sys.argv[1]))
    base = sb.base
    failed = 0
    try:
        sb.build()
        sb.launch()
        print(f"sandbox init pid {sb.pid} (launch {sb.launch_ms:.1f} ms)")
        for t in TESTS:
            t0 = time.monotonic()
            try:
                t(sb)
                print(f"PASS {t.__name__} ({(time.monotonic() - t0) * 1000:.0f} ms)")
            except Exception:  # noqa: BLE001 - every failure is reported
                failed += 1
                print(f"FAIL {t.__name__}")
                traceback.print_exc()
        sb.destroy()
        for pid in [sb.pid] + sb.extra_pids:
            assert not os.path.exists(f"/proc/{pid}"), "init survived SIGKILL"
        assert not any(m for m in open("/proc/self/mountinfo") if base in m), "mounts left"
        assert not os.path.exists(base), "temp dir left"
        print("PASS sandbox killed and unmounted")
    finally:
        sb.destroy()
    print(f"{len(TESTS) - failed}/{len(TESTS)} passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
