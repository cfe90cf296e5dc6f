"""DeltaCR: full checkpoints (files + processes), rollback (body double or CRIU restore), fork.

Every test runs real processes in a `demo` sandbox, checkpoints them with `full=True`, mutates
memory, files and processes, rolls back and checks that each is exactly back -- through both
rollback paths where it matters:

- "double": the checkpoint restored ahead of time (stopped) is resumed; `double_ready()` waits
  until the daemon has it (a new stopped deltabox-init of the daemon's store);
- "restore": a checkpoint that is not the latest one is restored by CRIU from its images on the
  store (its body double was "evicted" when a newer checkpoint was taken).

`rollback()` checks the path on the processes, not only on the daemon's reply: the sandbox's
init after a "double" rollback was a frozen double before it, after a "restore" a new process
(tests/observing.py finds a sandbox's init by its pid namespace).

Background processes are started with `spawn()`: a python launcher that `setsid`s the child and
returns only once it has exec'd. (Background jobs survive their exec since issue 8; the
launcher predates that and still gives each process a session of its own.)
Processes report through files (logs of consecutive integers: a rollback must leave a log that is
a prefix of the checkpoint's plus new writes, with no gap and no line from the abandoned future) or
through signals that make them write a report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

import deltabox
from conftest import DEMO_TAR, TINY_TAR, freezer_state, leftovers, sandbox_inits
from observing import doubles, live_init
from waiting import stays, wait_for

# ---- helpers ---------------------------------------------------------------------------------

LAUNCH = textwrap.dedent("""
    import os, subprocess, sys
    log = open(sys.argv[1], "ab")
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         start_new_session=True, cwd=os.environ.get("SPAWN_CWD", "/work"))
    print(p.pid)
""")

PROCS = textwrap.dedent("""
    import json, os
    me, out = os.getpid(), {}
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
            rest = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if rest[0] != "Z":
            out[p] = [int(rest[1]), cmd]
    print(json.dumps(out))
""")


def put(sbx, path: str, code: str) -> None:
    sbx.write_file(path, textwrap.dedent(code).lstrip(), make_parents=True)


def spawn(sbx, *argv: str, log: str = "/dev/null", env: dict | None = None) -> int:
    """Start argv as a session leader that outlives the exec; its pid inside the sandbox."""
    r = sbx.exec(["python3", "-c", LAUNCH, log, *argv], env=env).check()
    return int(r.stdout)


def sh(sbx, cmd: str) -> str:
    return sbx.exec(cmd).check().stdout.decode()


def procs(sbx) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, cmdline) of every live process in the sandbox (but the probe)."""
    return {int(k): tuple(v) for k, v in json.loads(sbx.exec(["python3", "-c", PROCS])
                                                    .check().stdout).items()}


def status(sbx, pid: int) -> dict[str, str]:
    text = sbx.exec(["cat", f"/proc/{pid}/status"]).check().stdout.decode()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def cat(sbx, path: str) -> bytes:
    """A file as seen inside the sandbox (/proc is not on the branch ReadFile serves)."""
    return sbx.exec(["cat", path]).check().stdout


def state(sbx, pid: int) -> str:
    r = sbx.exec(["cat", f"/proc/{pid}/stat"])
    return r.stdout.decode().rsplit(")", 1)[1].split()[0] if r.exit_code == 0 else "gone"


def numbers(data: bytes) -> list[str]:
    """Complete lines of a log (a line being written may be cut short)."""
    return data.decode(errors="replace").split("\n")[:-1]


def counted(sbx, path: str) -> int:
    """The log must be 1, 2, ..., n exactly (no gap, no repeat, no stray line); returns n."""
    lines = numbers(_read_if(sbx, path))
    assert lines == [str(i) for i in range(1, len(lines) + 1)], \
        f"{path} is not a clean count: ...{lines[-20:]}"
    return len(lines)


def counted_floats(sbx) -> int:
    return len(numbers(_read_if(sbx, "/work/mono.log")))


def keeps_counting(sbx, path: str, at_least: int = 0) -> int:
    """A clean count that grows (its writer lives); returns the count seen first."""
    n = counted(sbx, path)
    assert n >= at_least, f"{path}: {n} lines, the checkpoint had at least {at_least}"
    wait_for(lambda: counted(sbx, path) > n + 2, f"{path} to keep growing past {n}")
    return n


def report(sbx, pid: int, sig: str, path: str) -> dict:
    """Signal `pid` to write a JSON report to `path`, and read it."""
    sh(sbx, f"rm -f {path}; kill -{sig} {pid}")
    return json.loads(wait_for(lambda: _read_if(sbx, path), f"report {path}"))


def _read_if(sbx, path: str) -> bytes:
    try:
        return sbx.read_file(path)
    except deltabox.NotFound:
        return b""


def _host_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def double_ready(state_dir: Path, before: set[int]) -> None:
    wait_for(lambda: doubles(state_dir) - before, "the body double to be prepared")


def double_settled(state_dir: Path) -> None:
    """Let the body double being built in the background come up (see
    test_destroy_right_after_a_checkpoint_leaves_nothing for why)."""
    try:
        wait_for(lambda: doubles(state_dir), "a body double", timeout=5)
    except AssertionError:
        pass  # e.g. its restore failed: nothing is left to leak
    time.sleep(0.2)


def rollback(sbx, ckpt, path: str, state_dir: Path, before: set[int] = frozenset()):
    """Roll back and check which path was taken -- on the processes, not only on the
    daemon's word: "double" makes a body double that was frozen before the call the
    sandbox's running init; "restore" starts an init that did not exist before it."""
    if path == "double":
        double_ready(state_dir, before)
        # ... and the daemon holds it (else the rollback reports "double-waited")
        cid = getattr(ckpt, "id", ckpt)
        wait_for(lambda: any(c.id == cid and c.ready for c in sbx.checkpoints()),
                 "the daemon to hold the body double")
    frozen, inits = doubles(state_dir), set(sandbox_inits(state_dir))
    res = sbx.rollback(ckpt)
    assert res.path == path, (res.path, res.timings_ms)
    init = live_init(state_dir, sbx)
    if path == "double":
        assert init in frozen, f"init {init} was not one of the frozen doubles {frozen}"
    else:
        assert init not in inits, f"init {init} existed before the restore"
    assert freezer_state(init) == "THAWED", init
    return res


def both_paths(daemon, sbx, ckpt, before, mutate, verify) -> None:
    """mutate -> rollback via the body double -> verify; mutate -> a newer checkpoint (the
    double for ckpt is dropped) -> rollback via a CRIU restore from the store -> verify."""
    mutate()
    rollback(sbx, ckpt, "double", daemon.state_dir, before)
    verify("double")
    mutate()
    _, before = full_checkpoint(daemon, sbx, "newer")
    double_ready(daemon.state_dir, before)          # ckpt's double is gone once newer's is up
    rollback(sbx, ckpt, "restore", daemon.state_dir)
    verify("restore")


def full_checkpoint(daemon, sbx, label: str):
    """(checkpoint, the doubles that existed before it)."""
    before = doubles(daemon.state_dir)
    return sbx.checkpoint(label, full=True), before


@pytest.fixture(autouse=True)
def _double_settled(request):
    """Before `demo` is destroyed, let the body double the daemon builds after a full
    checkpoint or rollback come up: a destroy racing its build leaks it (see
    test_destroy_right_after_a_checkpoint_leaves_nothing), which would fail the shared
    daemon's clean-stop check at the end of the session instead of the test that caused it."""
    if "demo" not in request.fixturenames:
        yield
        return
    demo, daemon = request.getfixturevalue("demo"), request.getfixturevalue("daemon")
    yield
    try:
        full = any(c.mode == deltabox.CheckpointMode.FULL for c in demo.checkpoints())
    except deltabox.DeltaboxError:
        return
    if full:
        double_settled(daemon.state_dir)


# ---- programs run inside the sandbox ---------------------------------------------------------

MEM = """
    import hashlib, os, signal, time
    buf = bytearray(os.urandom(100 << 20))
    count = 0
    def report(*_):
        with open("/work/mem.json.tmp", "w") as f:
            f.write('{"sha": "%s", "count": %d}' % (hashlib.sha256(buf).hexdigest(), count))
        os.rename("/work/mem.json.tmp", "/work/mem.json")
    def scribble(*_):
        global count
        buf[0:1 << 20] = bytes(1 << 20)
        count += 1000
    signal.signal(signal.SIGUSR1, scribble)
    signal.signal(signal.SIGUSR2, report)
    report()
    log = open("/work/mem.log", "w", buffering=1)
    while True:
        count += 1
        log.write(f"{count}\\n")
        time.sleep(0.02)
"""

THREADS = """
    import queue, threading, time
    def worker(i):
        with open(f"/work/t{i}.log", "w", buffering=1) as f:
            n = 0
            while True:
                n += 1
                f.write(f"{n}\\n")
                time.sleep(0.02 + 0.005 * i)
    q = queue.Queue(maxsize=1)
    def put():
        n = 0
        while True:
            n += 1
            q.put(n)
            time.sleep(0.02)
    def get():                       # blocked on a futex most of the time
        with open("/work/q.log", "w", buffering=1) as f:
            while True:
                f.write(f"{q.get()}\\n")
    for i in range(4):
        threading.Thread(target=worker, args=(i,), daemon=True).start()
    threading.Thread(target=put, daemon=True).start()
    threading.Thread(target=get, daemon=True).start()
    while True:
        time.sleep(1)
"""

PRODUCER = """
    import time
    n = 0
    while True:
        n += 1
        print(n, flush=True)
        time.sleep(0.02)
"""

CONSUMER = """
    import sys
    expect = 1
    with open(sys.argv[1], "w", buffering=1) as log:
        for line in sys.stdin:
            n = int(line)
            if n != expect:
                log.write(f"BAD got {n} expected {expect}\\n")
            log.write(f"{n}\\n")
            expect = n + 1
        log.write("EOF\\n")
"""

PAIR = """
    import os, socket, time
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:               # the child doubles what it receives
        a.close()
        while True:
            m = b.recv(64)
            if not m:
                os._exit(0)
            b.send(str(2 * int(m)).encode())
    b.close()
    with open("/work/pair.log", "w", buffering=1) as log:
        n = 0
        while True:
            n += 1
            a.send(str(n).encode())
            r = a.recv(64)
            if r != str(2 * n).encode():
                log.write(f"BAD {r!r} for {n}\\n")
            log.write(f"{n}\\n")
            time.sleep(0.02)
"""

SERVER = """
    import os, socket, sys, threading
    family, addr = sys.argv[1], sys.argv[2]
    if family == "tcp":
        host, port = addr.rsplit(":", 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)
    s.listen(8)
    stats = {"accepted": 0, "live": 0}
    def serve(c):
        f = c.makefile("rw", buffering=1)
        for line in f:
            if line.strip() == "stats":
                f.write("accepted=%(accepted)d live=%(live)d\\n" % stats)
            else:
                f.write("echo " + line)
            f.flush()
        stats["live"] -= 1
    while True:
        c, _ = s.accept()
        stats["accepted"] += 1
        stats["live"] += 1
        threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = """
    import socket, sys, time
    family, addr, logpath = sys.argv[1:4]
    log = open(logpath, "w", buffering=1)
    if family == "tcp":
        host, port = addr.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
        open(logpath + ".conn", "w").write(str(s.getsockname()))
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(addr)
    f = s.makefile("rw", buffering=1)
    n = 0
    try:
        while True:
            n += 1
            f.write(f"{n}\\n")
            f.flush()
            reply = f.readline()
            if reply != f"echo {n}\\n":
                log.write(f"BAD {reply!r} for {n}\\n")
                break
            log.write(f"{n}\\n")
            time.sleep(0.02)
    except OSError as e:
        log.write(f"ERR {e}\\n")
"""

FILES = """
    import fcntl, json, os, signal, tempfile, time
    out = open("/work/out.txt", "w", buffering=1)          # offset-based writes
    app = open("/work/app.log", "a", buffering=1)          # O_APPEND
    src = open("/work/in.txt", "rb", buffering=0)           # held open for reading
    src.read(5)
    ghost = tempfile.TemporaryFile(dir="/work")             # open but unlinked
    ghost.write(b"ghost-at-start")
    ghost.flush()
    lock = open("/work/lockfile", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    open("/work/files.fds", "w").write(json.dumps({"ghost": ghost.fileno()}))
    def report(*_):
        data = {"in": os.pread(src.fileno(), 100, 0).decode(), "in_pos": os.lseek(src.fileno(), 0, os.SEEK_CUR),
                "ghost": os.pread(ghost.fileno(), 100, 0).decode()}
        with open("/work/files.json.tmp", "w") as f:
            json.dump(data, f)
        os.rename("/work/files.json.tmp", "/work/files.json")
    signal.signal(signal.SIGUSR2, report)
    n = 0
    while True:
        n += 1
        out.write(f"{n}\\n")
        app.write(f"{n}\\n")
        time.sleep(0.02)
"""

ATTRS = """
    import json, os, resource, signal
    os.makedirs("/work/wd", exist_ok=True)
    os.chdir("/work/wd")
    os.environ["DYN"] = "set-at-start"
    os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (123, 456))
    ticks, hups = 0, 0
    log = open("/work/ticks.log", "w", buffering=1)
    def tick(*_):
        global ticks
        ticks += 1
        log.write(f"{ticks}\\n")
    def hup(*_):                     # the mutation: every attribute changes
        global hups
        hups += 1
        os.chdir("/")
        os.environ["DYN"] = "mutated"
        os.umask(0o002)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 456))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    def report(*_):
        um = os.umask(0)
        os.umask(um)
        data = {"cwd": os.getcwd(), "DYN": os.environ.get("DYN"), "FOO": os.environ.get("FOO"),
                "umask": um, "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
                "interval": round(signal.getitimer(signal.ITIMER_REAL)[1], 3),
                "usr2": {signal.SIG_IGN: "ign", signal.SIG_DFL: "dfl"}.get(
                    signal.getsignal(signal.SIGUSR2), "handler"), "hups": hups,
                "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))}
        with open("/work/attrs.json.tmp", "w") as f:
            json.dump(data, f)
        os.rename("/work/attrs.json.tmp", "/work/attrs.json")
    signal.signal(signal.SIGALRM, tick)
    signal.signal(signal.SIGHUP, hup)
    signal.signal(signal.SIGUSR1, report)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
    while True:
        signal.pause()
"""

CONTS = """
    import signal, time
    n = 0
    def cont(*_):
        global n
        n += 1
        open("/work/conts", "w").write(str(n))
    signal.signal(signal.SIGCONT, cont)
    open("/work/conts", "w").write("0")
    while True:
        time.sleep(0.05)
"""

PTY = """
    import os, pty, select
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("bash", ["bash", "--norc", "--noprofile", "-i"], {**os.environ, "PS1": "$ "})
    out = open("/work/pty.out", "ab", buffering=0)
    while True:
        if select.select([fd], [], [], 0.03)[0]:
            try:
                out.write(os.read(fd, 4096))
            except OSError:
                break
        try:
            cmd = open("/work/pty.cmd", "rb").read()
            os.unlink("/work/pty.cmd")
            os.write(fd, cmd)
        except FileNotFoundError:
            pass
"""

COUNTER = """
    import time
    with open("/work/bg.log", "w", buffering=1) as log:
        n = 0
        while True:
            n += 1
            log.write(f"{n}\\n")
            time.sleep(0.02)
"""

INOTIFY = """
    import ctypes, time
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    assert libc.inotify_add_watch(fd, b"/work", 0x100) >= 0       # IN_CREATE on a directory
    with open("/work/bad.log", "w", buffering=1) as log:
        n = 0
        while True:
            n += 1
            log.write(f"{n}\\n")
            time.sleep(0.02)
"""

KITCHEN = """
    import ctypes, json, os, select, signal, time
    from multiprocessing import shared_memory
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    open("/dev/shm/plain", "w").write("shm-at-start")          # tmpfs inside the sandbox
    seg = shared_memory.SharedMemory(name="seg", create=True, size=4096)   # POSIX shm, mmap'd
    seg.buf[:5] = b"start"
    addr = libc.shmat(libc.shmget(0x1234, 4096, 0o1666), None, 0)         # SysV shm
    ctypes.memmove(addr, b"sysv-start", 10)
    efd = os.eventfd(5)
    mfd = os.memfd_create("m")
    os.write(mfd, b"memfd-start")
    ep = select.epoll()
    r, w = os.pipe()
    ep.register(r, select.EPOLLIN)
    tfd = libc.timerfd_create(1, 0)
    assert tfd >= 0
    def report(*_):
        data = {"seg": bytes(seg.buf[:5]).decode(), "eventfd": os.eventfd_read(efd),
                "memfd": os.pread(mfd, 100, 0).decode(), "sysv": ctypes.string_at(addr, 10).decode(),
                "shm": open("/dev/shm/plain").read()}
        os.eventfd_write(efd, data["eventfd"])
        with open("/work/kitchen.json.tmp", "w") as f:
            json.dump(data, f)
        os.rename("/work/kitchen.json.tmp", "/work/kitchen.json")
    signal.signal(signal.SIGUSR2, report)
    report()
    while True:
        time.sleep(0.05)
"""

MONO = """
    import time
    with open("/work/mono.log", "w", buffering=1) as log:
        while True:
            log.write(f"{time.monotonic():.3f}\\n")
            time.sleep(0.02)
"""


# ---- memory and a counter ----------------------------------------------------------------------

def test_100mb_process_and_counter_come_back_exactly(daemon, demo):
    put(demo, "/work/mem.py", MEM)
    pid = spawn(demo, "python3", "/work/mem.py")
    start = json.loads(wait_for(lambda: _read_if(demo, "/work/mem.json"), "mem.py to start"))
    wait_for(lambda: counted(demo, "/work/mem.log") > 5, "the counter")
    demo.write_file("/work/data.txt", "at checkpoint")
    ckpt, before = full_checkpoint(daemon, demo, "mem")
    assert ckpt.mode == deltabox.CheckpointMode.FULL
    at_ckpt = counted(demo, "/work/mem.log")          # >= the checkpoint's count
    tree = procs(demo)
    assert (daemon.state_dir / "store" / "images" / ckpt.id).is_dir()
    assert ckpt.image_bytes >= 100 << 20, ckpt

    def mutate():
        sh(demo, f"kill -USR1 {pid}")                 # memory: 1 MiB zeroed, count += 1000
        mutated = report(demo, pid, "USR2", "/work/mem.json")
        assert mutated["sha"] != start["sha"] and mutated["count"] > 1000
        demo.write_file("/work/data.txt", "mutated")
        spawn(demo, "sleep", "1000")                  # a process that must go away

    def verify(path):
        assert procs(demo) == tree, path
        now = report(demo, pid, "USR2", "/work/mem.json")
        assert now["sha"] == start["sha"], f"{path}: memory differs from the checkpoint's"
        assert now["count"] < 1000, f"{path}: the counter did not go back: {now}"
        assert demo.read_file("/work/data.txt") == b"at checkpoint"
        keeps_counting(demo, "/work/mem.log", at_least=min(at_ckpt, now["count"]) - 1)
        rss_kb = int(status(demo, pid)["VmRSS"].split()[0])
        assert rss_kb >= 100 << 10, f"{path}: VmRSS {rss_kb} kB"

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- sessions ----------------------------------------------------------------------------------

def test_bash_and_python_sessions_continue_in_the_checkpoints_state(daemon, demo):
    bash = demo.open_session("bash", name="sh1")
    py = demo.open_session("python", name="py1")
    gone = demo.open_session("bash", name="closed-after")
    r = bash.run("mkdir -p /work/wd; cd /work/wd; X=41; export E=env-at-ckpt\n"
                 "inc() { X=$((X+1)); }; arr=(a b c); ulimit -n 321\n"
                 "sleep 1000 & BG=$!")
    assert r.exit_code == 0, r
    py.run("import random, collections\nrandom.seed(7)\n"
           "data = collections.Counter('hello')\ngen = iter(range(100))\nnext(gen)\n"
           "class Box:\n    def __init__(self): self.items = [1, 2]\nbox = Box()")
    ckpt, before = full_checkpoint(daemon, demo, "sessions")
    expected_random = py.run("print(random.random())").stdout   # the RNG's next draw

    def mutate():
        bash.run("cd / && X=999 && unset -f inc && export E=mutated && arr=() && kill $BG")
        py.run("data.clear(); del box; [next(gen) for _ in range(10)]; random.random()")
        demo.open_session("python", name="opened-after")
        gone.close()

    def verify(path):
        names = {s.name for s in demo.list_sessions()}
        assert names == {"sh1", "py1", "closed-after"}, (path, names)
        r = bash.run("inc; echo $X $E $(pwd) ${arr[1]} $(ulimit -n); kill -0 $BG && echo bg-alive;"
                     " type inc | head -1")
        assert r.stdout.decode().splitlines() == ["42 env-at-ckpt /work/wd b 321", "bg-alive",
                                                  "inc is a function"], (path, r)
        r = py.run("print(next(gen), data['l'], box.items, random.random())")
        assert r.stdout == b"1 2 [1, 2] " + expected_random, (path, r)
        # the client keeps using the sessions: state moves on from the checkpoint's
        bash.run("inc")
        assert bash.run("echo $X").stdout == b"43\n"
        assert py.run("print(next(gen))").stdout == b"2\n"
        assert demo.session("closed-after").run("echo $((6*7))").stdout == b"42\n"

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- threads -----------------------------------------------------------------------------------

def test_multithreaded_process(daemon, demo):
    put(demo, "/work/threads.py", THREADS)
    pid = spawn(demo, "python3", "/work/threads.py")
    logs = [f"/work/t{i}.log" for i in range(4)] + ["/work/q.log"]
    wait_for(lambda: all(counted(demo, p) > 3 for p in logs), "the threads")
    threads = status(demo, pid)["Threads"]
    assert threads == "7"
    ckpt, before = full_checkpoint(daemon, demo, "threads")
    at_ckpt = {p: counted(demo, p) for p in logs}
    tree = procs(demo)

    def mutate():
        # the logs move past the checkpoint first: a rollback must take them back
        wait_for(lambda: all(counted(demo, p) > at_ckpt[p] + 3 for p in logs), "the threads")
        sh(demo, f"kill -9 {pid}")
        for p in logs:
            demo.write_file(p, "garbage\n")

    def verify(path):
        assert procs(demo) == tree, path
        assert status(demo, pid)["Threads"] == threads, path
        for p in logs:
            # restored near the checkpoint: not much further than what we read after it
            n = keeps_counting(demo, p)
            assert n < at_ckpt[p] + 40, (path, p, n, at_ckpt[p])

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- parent/child trees, pipes, fifos, unix sockets ------------------------------------------

def test_pipeline_fifo_socketpair_and_unix_socket(daemon, demo):
    put(demo, "/work/producer.py", PRODUCER)
    put(demo, "/work/consumer.py", CONSUMER)
    put(demo, "/work/pair.py", PAIR)
    put(demo, "/work/server.py", SERVER)
    put(demo, "/work/client.py", CLIENT)
    spawn(demo, "sh", "-c", "python3 producer.py | python3 consumer.py /work/pipe.log")
    sh(demo, "mkfifo /work/fifo")
    spawn(demo, "sh", "-c", "python3 producer.py > /work/fifo & "
                            "exec python3 consumer.py /work/fifo.log < /work/fifo")
    spawn(demo, "python3", "/work/pair.py")
    spawn(demo, "python3", "/work/server.py", "unix", "/work/u.sock")
    wait_for(lambda: "u.sock" in sh(demo, "ls /work"), "the unix server")
    spawn(demo, "python3", "/work/client.py", "unix", "/work/u.sock", "/work/unix.log")
    logs = ["/work/pipe.log", "/work/fifo.log", "/work/pair.log", "/work/unix.log"]
    wait_for(lambda: all(counted(demo, p) > 3 for p in logs), "all four to flow")
    ckpt, before = full_checkpoint(daemon, demo, "ipc")
    at_ckpt = {p: counted(demo, p) for p in logs}
    tree = procs(demo)
    assert len(tree) == 1 + 3 + 2 + 2 + 2     # init, sh+2 pipeline, fifo pair, pair, srv+client

    def mutate():
        wait_for(lambda: all(counted(demo, p) > at_ckpt[p] + 3 for p in logs), "the flows")
        # (a pair's child exits by itself once its parent is killed: kill may miss it)
        sh(demo, "kill -9 " + " ".join(str(p) for p in tree if p != 1) + " 2>/dev/null; true")
        wait_for(lambda: not (set(procs(demo)) & set(tree)) - {1}, "the tree to be killed")
        sh(demo, "rm -f /work/fifo /work/u.sock")

    def verify(path):
        assert procs(demo) == tree, path
        for p in logs:
            # the counter resumes from the checkpoint's value: one clean count, no EOF/BAD
            n = keeps_counting(demo, p)
            assert n < at_ckpt[p] + 40, (path, p, n, at_ckpt[p])
        # the listening unix socket accepts new connections
        r = demo.exec(["python3", "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
                       "s.connect('/work/u.sock'); s.sendall(b'stats\\n'); "
                       "print(s.makefile().readline().strip())"]).check()
        assert r.stdout.decode().strip() == "accepted=2 live=2", (path, r)

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- TCP on loopback -----------------------------------------------------------------------------

def test_tcp_server_and_established_connection(daemon, demo):
    put(demo, "/work/server.py", SERVER)
    put(demo, "/work/client.py", CLIENT)
    server = spawn(demo, "python3", "/work/server.py", "tcp", "127.0.0.1:7000")
    probe = ["python3", "-c", "import socket, sys\n"
             "s = socket.create_connection(('127.0.0.1', 7000), timeout=5)\n"
             "s.sendall(b'stats\\n'); print(s.makefile().readline().strip())"]
    wait_for(lambda: demo.exec(probe).exit_code == 0, "the server to listen")
    client = spawn(demo, "python3", "/work/client.py", "tcp", "127.0.0.1:7000", "/work/tcp.log")
    wait_for(lambda: counted(demo, "/work/tcp.log") > 3, "the client to talk")
    conn = demo.read_file("/work/tcp.log.conn")
    ckpt, before = full_checkpoint(daemon, demo, "tcp")
    at_ckpt = counted(demo, "/work/tcp.log")
    tree = procs(demo)

    def mutate():
        wait_for(lambda: counted(demo, "/work/tcp.log") > at_ckpt + 3, "the client")
        sh(demo, f"kill -9 {server}")
        wait_for(lambda: state(demo, client) == "gone", "the client to notice")

    def verify(path):
        assert procs(demo) == tree, path
        # the same connection (same local port) carries on, and the count resumes
        assert demo.read_file("/work/tcp.log.conn") == conn
        n = keeps_counting(demo, "/work/tcp.log")
        assert n < at_ckpt + 40, (path, n, at_ckpt)
        # the listener is back too: one restored connection + this probe
        r = demo.exec(probe).check()
        assert r.stdout.decode().strip() == "accepted=3 live=2", (path, r)
        ss = cat(demo, "/proc/net/tcp").decode()
        assert ":1B58 00000000:0000 0A" in ss, ss          # 7000 LISTEN

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- files open across the checkpoint -----------------------------------------------------------

def test_files_open_for_writing_and_reading(daemon, demo):
    put(demo, "/work/files.py", FILES)
    demo.write_file("/work/in.txt", "original-content")
    pid = spawn(demo, "python3", "/work/files.py")
    wait_for(lambda: counted(demo, "/work/out.txt") > 3, "the writer")
    ghost_fd = json.loads(demo.read_file("/work/files.fds"))["ghost"]
    ckpt, before = full_checkpoint(daemon, demo, "files")
    at_ckpt = counted(demo, "/work/out.txt")
    lock_probe = ["python3", "-c", "import fcntl\nf = open('/work/lockfile')\n"
                  "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
                  "except BlockingIOError:\n    print('locked')"]

    def mutate():
        # in place (same inodes): the process sees these through its open fds
        sh(demo, f"printf mutated-content > /work/in.txt; : > /work/out.txt; echo junk >> "
                 f"/work/app.log; printf ghost-mutated > /proc/{pid}/fd/{ghost_fd}")
        seen = report(demo, pid, "USR2", "/work/files.json")
        assert seen["in"] == "mutated-content" and seen["ghost"] == "ghost-mutated", seen

    def verify(path):
        seen = report(demo, pid, "USR2", "/work/files.json")
        assert seen == {"in": "original-content", "in_pos": 5, "ghost": "ghost-at-start"}, \
            (path, seen)
        # the checkpoint's prefix plus new writes: a clean count, no hole, no junk
        for p in ("/work/out.txt", "/work/app.log"):
            n = keeps_counting(demo, p)
            assert n < at_ckpt + 40, (path, p, n, at_ckpt)
        assert demo.exec(lock_probe).stdout == b"locked\n", path

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- shared memory, SysV IPC, eventfd, memfd, epoll, timerfd -----------------------------------

def test_shm_sysv_eventfd_memfd_epoll_timerfd(daemon, demo):
    put(demo, "/work/kitchen.py", KITCHEN)
    pid = spawn(demo, "python3", "/work/kitchen.py", log="/work/kitchen.err")
    start = json.loads(wait_for(lambda: _read_if(demo, "/work/kitchen.json"), "kitchen.py"))
    assert start == {"seg": "start", "eventfd": 5, "memfd": "memfd-start", "sysv": "sysv-start",
                     "shm": "shm-at-start"}, start
    ckpt, before = full_checkpoint(daemon, demo, "ipc-objects")
    fds = sh(demo, f"ls -l /proc/{pid}/fd | grep -o 'anon_inode:.*' | sort")

    def mutate():
        demo.exec(["python3", "-c", "from multiprocessing import shared_memory as s\n"
                   "m = s.SharedMemory(name='seg'); m.buf[:5] = b'MUTAT'\n"
                   "open('/dev/shm/plain', 'w').write('mutated')\n"
                   "import ctypes; libc = ctypes.CDLL(None); libc.shmat.restype = ctypes.c_void_p\n"
                   "a = libc.shmat(libc.shmget(0x1234, 4096, 0), None, 0)\n"
                   "ctypes.memmove(a, b'MUTATED!!!', 10)"]).check()
        assert report(demo, pid, "USR2", "/work/kitchen.json")["sysv"] == "MUTATED!!!"

    def verify(path):
        assert report(demo, pid, "USR2", "/work/kitchen.json") == start, path
        assert sh(demo, f"ls -l /proc/{pid}/fd | grep -o 'anon_inode:.*' | sort") == fds, path

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- cwd, env, umask, rlimits, timers, signal dispositions and masks ---------------------------

def test_cwd_env_rlimits_timer_and_signal_state(daemon, demo):
    put(demo, "/work/attrs.py", ATTRS)
    pid = spawn(demo, "python3", "/work/attrs.py", env={"FOO": "bar"})
    wait_for(lambda: counted(demo, "/work/ticks.log") > 3, "the interval timer")
    original = report(demo, pid, "USR1", "/work/attrs.json")
    assert original == {"cwd": "/work/wd", "DYN": "set-at-start", "FOO": "bar", "umask": 0o027,
                        "nofile": [123, 456], "interval": 0.02, "usr2": "ign",
                        "hups": 0, "blocked": [signal.SIGTERM]}, original
    masks = {k: status(demo, pid)[k] for k in ("SigBlk", "SigIgn", "SigCgt")}
    ckpt, before = full_checkpoint(daemon, demo, "attrs")
    at_ckpt = counted(demo, "/work/ticks.log")

    def mutate():
        sh(demo, f"kill -HUP {pid}")
        changed = report(demo, pid, "USR1", "/work/attrs.json")
        assert changed["hups"] == 1 and changed["interval"] == 0 and changed["cwd"] == "/"
        demo.exec(["python3", "-c", f"import resource; resource.prlimit({pid}, "
                   "resource.RLIMIT_NOFILE, (50, 60))"]).check()
        assert re.search(r"Max open files\s+50\s+60", cat(demo, f"/proc/{pid}/limits").decode())

    def verify(path):
        now = report(demo, pid, "USR1", "/work/attrs.json")
        assert now == original, path
        assert {k: status(demo, pid)[k] for k in masks} == masks, path
        limits = cat(demo, f"/proc/{pid}/limits").decode()
        assert re.search(r"Max open files\s+123\s+456", limits), (path, limits)
        assert sh(demo, f"readlink /proc/{pid}/cwd") == "/work/wd\n"
        assert b"FOO=bar" in cat(demo, f"/proc/{pid}/environ").split(b"\0")
        n = keeps_counting(demo, "/work/ticks.log")           # the timer ticks again
        assert n < at_ckpt + 40, (path, n, at_ckpt)

    both_paths(daemon, demo, ckpt, before, mutate, verify)


@pytest.mark.parametrize("path", ["restore", "double"])
def test_rollback_delivers_no_signal_the_checkpoint_did_not_have(daemon, demo, path):
    """A process with a SIGCONT handler must not see a SIGCONT because of a rollback."""
    put(demo, "/work/conts.py", CONTS)
    pid = spawn(demo, "python3", "/work/conts.py")
    wait_for(lambda: _read_if(demo, "/work/conts") == b"0", "conts.py")
    ckpt, before = full_checkpoint(daemon, demo, "conts")
    demo.write_file("/work/other", "x")
    if path == "restore":
        _, newer = full_checkpoint(daemon, demo, "newer")
        double_ready(daemon.state_dir, newer)
    rollback(demo, ckpt, path, daemon.state_dir, before)
    assert state(demo, pid) in ("S", "R")
    # a signal sent by the rollback is handled within a loop turn (50 ms) of conts.py
    stays(lambda: demo.read_file("/work/conts") == b"0",
          f"no SIGCONT to pid {pid} after the rollback via {path}", duration=0.5)


@pytest.mark.parametrize("path", ["restore", "double"])
def test_monotonic_clock_does_not_jump_by_the_time_since_the_checkpoint(daemon, demo, path):
    """A restore puts the tree in a time namespace whose CLOCK_MONOTONIC carries on from the
    checkpoint's: deadlines and sleeps pending at the checkpoint keep their meaning.
    A body double is restored ahead of time; a time namespace's offsets cannot change
    once a task lives in it, so the double's clock also counts the time it waited
    (docs/deltacr.md, "Clocks"). That much, and no more, is allowed on that path."""
    put(demo, "/work/mono.py", MONO)
    spawn(demo, "python3", "/work/mono.py")
    wait_for(lambda: counted_floats(demo) > 5, "mono.py")
    ckpt, before = full_checkpoint(daemon, demo, "mono")
    if path == "restore":
        _, newer = full_checkpoint(daemon, demo, "newer")
        double_ready(daemon.state_dir, newer)
    else:
        double_ready(daemon.state_dir, before)
    double_built = time.monotonic()
    time.sleep(1.5)                                     # the episode between checkpoint and rollback
    rollback(demo, ckpt, path, daemon.state_dir, before)
    waited = time.monotonic() - double_built
    wait_for(lambda: counted_floats(demo) > 5, "mono.py after the rollback")
    stamps = [float(x) for x in numbers(demo.read_file("/work/mono.log"))]
    jump = max(b - a for a, b in zip(stamps, stamps[1:]))
    assert min(b - a for a, b in zip(stamps, stamps[1:])) >= 0, "CLOCK_MONOTONIC went back"
    if path == "restore":
        assert jump < 1.0, f"via restore, CLOCK_MONOTONIC jumped {jump:.2f} s across the rollback"
    else:
        assert jump < waited + 1.0, \
            f"via the double, CLOCK_MONOTONIC jumped {jump:.2f} s, more than the {waited:.2f} s " \
            "the double waited"


def test_stopped_process_refuses_a_full_checkpoint_naming_it_and_leaves_nothing(new_daemon):
    """CRIU cannot seize a job-control-stopped task in a frozen cgroup (it hangs in the
    kernel), so the daemon refuses a full checkpoint while one is stopped (kill -STOP,
    ^Z): at once, naming the process, and leaving no trace -- no checkpoint, no images,
    no body double, the sandbox thawed and the process still stopped. Once it is
    continued, the checkpoint works. A separate daemon: a hang here would otherwise take
    the shared one down with it."""
    d = new_daemon().start()
    c = d.client()
    c.import_image("tiny", TINY_TAR)
    sbx = c.create("tiny")
    sh(sbx, "setsid sh -c 'echo $$ > /tmp/pid; exec sleep 1000' </dev/null >/dev/null 2>&1 & "
            "while [ ! -s /tmp/pid ]; do sleep 0.01; done")
    pid = int(sbx.read_file("/tmp/pid"))
    sh(sbx, f"kill -STOP {pid}")
    assert state(sbx, pid) == "T"
    init = live_init(d.state_dir, sbx)
    store = d.state_dir / "store"
    images_before = set(os.listdir(store / "images"))
    result: dict = {}

    def checkpoint():
        try:
            result["ckpt"] = sbx.checkpoint("stopped", full=True)
        except deltabox.DeltaboxError as e:
            result["error"] = e
    t = threading.Thread(target=checkpoint)
    t.start()
    t.join(8)
    if t.is_alive():  # unwedge: thaw the sandbox's freezer cgroup until the call returns
        while t.is_alive():
            for f in Path("/sys/fs/cgroup/freezer/deltabox").glob(
                    f"*/{sbx.info.branch_id}/freezer.state"):
                f.write_text("THAWED")
            t.join(1)
        double_settled(d.state_dir)
        pytest.fail(f"a full checkpoint with a stopped process (pid {pid}) hung for > 8 s "
                    f"(returned after a manual thaw: {result})")
    assert "error" in result, f"a stopped process was checkpointed: {result}"
    err = result["error"]
    assert isinstance(err, deltabox.FailedPrecondition), repr(err)
    assert "stopped" in str(err) and re.search(rf"\b{pid}\b", str(err)), str(err)
    # nothing left behind: no checkpoint record, no images, no temporary dirs, no double;
    # the sandbox runs (thawed) and the process is still stopped
    assert sbx.checkpoints() == []
    assert set(os.listdir(store / "images")) == images_before
    assert not list((store / "tmp").iterdir())
    assert set(sandbox_inits(d.state_dir)) == {init}, "a double or a stray init was started"
    assert freezer_state(init) == "THAWED"
    assert state(sbx, pid) == "T" and sh(sbx, "echo ok") == "ok\n"
    # continued, it is an ordinary process: the checkpoint is taken and restores
    sh(sbx, f"kill -CONT {pid}")
    ckpt = sbx.checkpoint("continued", full=True)
    sh(sbx, f"kill -9 {pid}")
    double_ready(d.state_dir, set())
    rollback(sbx, ckpt, "double", d.state_dir)
    assert state(sbx, pid) in ("S", "R")
    double_settled(d.state_dir)
    sbx.destroy()
    assert d.stop() == 0


# ---- pty -----------------------------------------------------------------------------------------

def test_pty_driven_bash_keeps_its_state(daemon, demo):
    """API sessions are pipes; a pty pair made inside the sandbox (bash on the slave, python
    on the master) is dumped and restored with its terminal state."""
    put(demo, "/work/ptydriver.py", PTY)
    spawn(demo, "python3", "/work/ptydriver.py", log="/work/pty.err")

    def send(cmd: str, expect: str) -> None:
        wait_for(lambda: _read_if(demo, "/work/pty.cmd") == b"", "the previous command")
        demo.write_file("/work/pty.cmd", cmd + "\n")
        try:
            wait_for(lambda: re.search(expect, _read_if(demo, "/work/pty.out").decode(
                errors="replace")), f"{expect!r} on the pty")
        except AssertionError as e:
            raise AssertionError(f"{e}: {_read_if(demo, '/work/pty.out')!r} "
                                 f"{_read_if(demo, '/work/pty.err')!r}") from None

    send("X=5; cd /tmp; echo set-$X", r"set-5\r?\n")
    ckpt, before = full_checkpoint(daemon, demo, "pty")
    tree = procs(demo)

    def mutate():
        send("X=99; cd /; echo set-$X", r"set-99\r?\n")

    def verify(path):
        assert procs(demo) == tree, path
        out = demo.read_file("/work/pty.out").decode(errors="replace")
        assert "X=99" not in out, path
        send("echo got-$X-$PWD-$(tty)", r"got-5-/tmp-/dev/pts/\d+")
        send("echo ok-$X", r"ok-5\r?\n")                    # and it keeps going

    both_paths(daemon, demo, ckpt, before, mutate, verify)


# ---- the checkpoint tree: ancestors and siblings ------------------------------------------------

def test_ancestor_two_levels_up_and_sibling_branch(daemon, demo, client):
    bash = demo.open_session("bash", name="b")
    py = demo.open_session("python", name="p")
    put(demo, "/work/counter.py", COUNTER)
    snaps = {}

    def set_state(tag: str) -> None:
        bash.run(f"S={tag}")
        py.run(f"s = {tag!r}")
        demo.write_file("/work/state", tag)
        spawn(demo, "sleep", f"{len(snaps) + 100}")      # one more process per state

    def check_state(tag: str, how: str) -> None:
        assert bash.run("echo $S").stdout.decode().strip() == tag, how
        assert py.run("print(s)").stdout.decode().strip() == tag, how
        assert demo.read_file("/work/state").decode() == tag, how
        assert procs(demo) == snaps[tag][1], how
        keeps_counting(demo, "/work/bg.log")

    spawn(demo, "python3", "/work/counter.py")
    ckpts = {}
    for tag in "ABC":
        set_state(tag)
        ckpts[tag] = demo.checkpoint(tag, full=True)
        snaps[tag] = (ckpts[tag], procs(demo))
    rollback(demo, ckpts["A"], "restore", daemon.state_dir)    # two levels up
    check_state("A", "ancestor")
    set_state("D")
    before = doubles(daemon.state_dir)
    ckpts["D"] = demo.checkpoint("D", full=True)
    snaps["D"] = (ckpts["D"], procs(demo))
    assert ckpts["D"].parent_id == ckpts["B"].parent_id == ckpts["A"].id
    rollback(demo, ckpts["B"], "restore", daemon.state_dir)    # the sibling branch
    check_state("B", "sibling")
    before = doubles(daemon.state_dir)
    rollback(demo, ckpts["D"], "restore", daemon.state_dir)    # and back to the other one
    check_state("D", "sibling D")
    bash.run("S=mutated")
    rollback(demo, ckpts["D"], "double", daemon.state_dir, before)
    check_state("D", "double of D")
    tree = {c.id: c.parent_id for c in demo.checkpoints()}
    assert tree[ckpts["C"].id] == ckpts["B"].id and tree[ckpts["B"].id] == ckpts["A"].id


# ---- fork ----------------------------------------------------------------------------------------

def test_fork_four_children_diverge_independently(daemon, demo, client):
    put(demo, "/work/counter.py", COUNTER)
    bg = spawn(demo, "python3", "/work/counter.py")
    py = demo.open_session("python", name="py")
    py.run("import random\nrandom.seed(1234)\ncounter = 0\n_r = 'a user variable'")
    bash = demo.open_session("bash", name="sh")
    bash.run("V=parent")
    wait_for(lambda: counted(demo, "/work/bg.log") > 3, "the counter")
    ckpt = demo.checkpoint("fork-me", full=True, wait_ready=True)   # its own double is up
    before = doubles(daemon.state_dir)
    assert client.warm(ckpt, 2, wait=True) == 2          # two warm children, two cold ones
    warmed = doubles(daemon.state_dir) - before
    assert len(warmed) == 2, f"warm reported 2 but {len(warmed)} frozen incarnations appeared"
    children = client.fork(ckpt, 4)
    try:
        assert [c.error for c in children] == [None] * 4
        kids = [c.sandbox for c in children]
        assert len({k.id for k in kids} | {demo.id}) == 5
        # the two warm incarnations woke up as two of the children, the others were restored
        inits = {live_init(daemon.state_dir, k) for k in kids}
        assert len(inits) == 4 and len(inits & warmed) == 2, (inits, warmed)
        assert all(freezer_state(p) == "THAWED" for p in inits)
        indexes = sorted(int(k.read_file("/.deltabox/fork-index")) for k in kids)
        assert indexes == [0, 1, 2, 3]
        draws = set()
        for k in kids:
            i = int(k.read_file("/.deltabox/fork-index"))
            assert sh(k, "echo $DELTABOX_FORK_INDEX") == f"{i}\n"
            s = k.session("py")
            draws.add(s.run("print(random.random())").stdout)
            for _ in range(i + 1):
                s.run("counter += 1")
            k.write_file("/work/mine", str(i))
            assert k.session("sh").run("echo $V").stdout == b"parent\n"
            assert status(k, bg)["Name"] == "python3"        # the counter process is there
        assert len(draws) == 4, f"children drew the same random numbers: {draws}"
        parent_draw = py.run("print(random.random())").stdout
        assert parent_draw not in draws
        for k in kids:
            i = int(k.read_file("/.deltabox/fork-index"))
            assert k.session("py").run("print(counter)").stdout == f"{i + 1}\n".encode()
            assert k.read_file("/work/mine") == str(i).encode()
            keeps_counting(k, "/work/bg.log")
        assert py.run("print(counter)").stdout == b"0\n"
        assert _read_if(demo, "/work/mine") == b""
        keeps_counting(demo, "/work/bg.log")
        for k in kids:  # re-seeding must not touch the session's own names
            r = k.session("py").run("print(_r)")
            assert r.stdout == b"a user variable\n", r
    finally:
        for c in children:
            if c.sandbox is not None:
                c.sandbox.destroy()


# ---- daemon restart and crash between checkpoint and rollback ----------------------------------

@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_daemon_restart_between_checkpoint_and_rollback(new_daemon, how):
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("demo", DEMO_TAR)
        sbx = c.create("demo", name="survivor")
        put(sbx, "/work/counter.py", COUNTER)
        spawn(sbx, "python3", "/work/counter.py")
        sbx.open_session("bash", name="sh").run("X=before-restart; cd /tmp")
        wait_for(lambda: counted(sbx, "/work/bg.log") > 3, "the counter")
        ckpt = sbx.checkpoint("durable", full=True)
        tree = procs(sbx)
        sbx.write_file("/work/after", "after the checkpoint")
        double_settled(d.state_dir)   # a stop racing its build is another test's business
    if how == "sigterm":
        assert d.stop() == 0, d.log()
    else:
        d.kill()
    d.start()
    try:
        with d.client() as c:
            sbx = c.get("survivor")
            before = doubles(d.state_dir)
            res = sbx.rollback(ckpt.id)
            assert res.path == "restore", res
            assert procs(sbx) == tree
            assert sbx.session("sh").run("echo $X $(pwd)").stdout == b"before-restart /tmp\n"
            assert _read_if(sbx, "/work/after") == b""
            keeps_counting(sbx, "/work/bg.log")
            # the daemon prepares a body double again
            sbx.session("sh").run("X=changed")
            rollback(sbx, ckpt.id, "double", d.state_dir, before)
            assert sbx.session("sh").run("echo $X").stdout == b"before-restart\n"
            double_settled(d.state_dir)
            sbx.destroy()
    finally:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.log()
    assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}


# ---- what cannot be checkpointed ----------------------------------------------------------------

def test_uncheckpointable_resource_is_refused_and_sandbox_unharmed(daemon, demo):
    put(demo, "/work/bad.py", INOTIFY)
    put(demo, "/work/counter.py", COUNTER)
    bash = demo.open_session("bash", name="sh")
    bash.run("X=intact")
    spawn(demo, "python3", "/work/counter.py")
    watcher = spawn(demo, "python3", "/work/bad.py")
    wait_for(lambda: counted(demo, "/work/bad.log") > 3, "the inotify process")
    ckpts_before = [c.id for c in demo.checkpoints()]
    tree = procs(demo)
    with pytest.raises(deltabox.FailedPrecondition) as err:
        demo.checkpoint("nope", full=True)
    print(err.value)
    # unharmed: thawed (both keep counting), same processes, same session state
    keeps_counting(demo, "/work/bad.log")
    keeps_counting(demo, "/work/bg.log")
    assert procs(demo) == tree
    assert bash.run("echo $X").stdout == b"intact\n"
    assert sh(demo, "echo ok") == "ok\n"
    assert [c.id for c in demo.checkpoints()] == ckpts_before
    wait_for(lambda: not list((daemon.state_dir / "store" / "tmp").iterdir()),
             "the failed dump's temporary dirs to go")
    # without the offending process, full checkpoints work again
    sh(demo, f"kill -9 {watcher}")
    ckpt, before = full_checkpoint(daemon, demo, "fine")
    bash.run("X=changed")
    rollback(demo, ckpt, "double", daemon.state_dir, before)
    assert bash.run("echo $X").stdout == b"intact\n"


@pytest.mark.parametrize("case", ["inotify"])
def test_uncheckpointable_error_names_process_and_resource(demo, case):
    """An inotify watch on the overlay cannot be dumped (CRIU wants a file handle,
    overlayfs without nfs_export has none) -- so file watchers and dev servers with
    auto-reload refuse a full checkpoint. The refusal must say which process holds
    what. (io_uring and AF_VSOCK, which CRIU cannot dump either, are refused by the
    sandbox's seccomp filter: tests/test_escapes.py.)"""
    put(demo, "/work/bad.py", {"inotify": INOTIFY}[case])
    pid = spawn(demo, "python3", "/work/bad.py")
    wait_for(lambda: counted(demo, "/work/bad.log") > 0, "bad.py")
    with pytest.raises(deltabox.FailedPrecondition) as err:
        demo.checkpoint("nope", full=True)
    msg = str(err.value)
    assert case in msg.lower(), f"the resource ({case}) is not named: {msg}"
    assert re.search(rf"python3|\bpid:? {pid}\b", msg), \
        f"the process (python3, pid {pid} in the sandbox) is not named: {msg}"


# ---- leaks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("full", [True, False], ids=["full", "fs"])
def test_destroy_right_after_a_checkpoint_leaves_nothing(new_daemon, full):
    """RL loops checkpoint and then throw sandboxes away at once: the standby being prepared
    in the background (full: a body double, a stopped copy of the whole sandbox; fs: a fresh
    init on the checkpoint) must not survive the destroy with its mount and cgroup -- else
    the daemon can no longer unmount its store when it stops."""
    d = new_daemon().start()
    leaked = []
    try:
        with d.client() as c:
            c.import_image("tiny", TINY_TAR)
            # how long the standby takes to come up after a checkpoint returns ...
            sbx = c.create("tiny")
            sbx.checkpoint("calibrate", full=full)
            t0 = time.monotonic()
            wait_for(lambda: len(sandbox_inits(d.state_dir)) >= 2, "the standby", interval=0.005)
            build = time.monotonic() - t0
            time.sleep(0.2)
            sbx.destroy()
            # ... then destroy while it is about to come up (the destroy itself takes a while)
            for k in range(10):
                sbx = c.create("tiny")
                sbx.checkpoint("then-destroy", full=full)
                time.sleep(max(0.0, build - 0.03 * k))
                sbx.destroy()
            assert c.list() == []
            # every background restore ends within a few seconds; what is still there
            # after that has outlived its sandbox
            try:
                wait_for(lambda: not sandbox_inits(d.state_dir), "the standbys to go",
                         timeout=10)
            except AssertionError:
                pass
        leaked = sandbox_inits(d.state_dir)
        assert leaked == [], f"standbys (body doubles) outlived their sandbox: host pids {leaked}"
        assert d.stop() == 0, d.log()
        assert leftovers(d.state_dir) == {"mounts": [], "loops": [], "inits": []}
    finally:
        if leaked:  # clean up after the leak: kill it, then let a restart reconcile it away
            for pid in leaked:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if d.proc.poll() is None:
                d.stop()
            d.start()


def test_sigterm_right_after_a_full_checkpoint_stops_cleanly(new_daemon):
    """A graceful stop while the body double is being built (shutdown cancels the task, but
    the CRIU restore goes on in its worker thread) must still leave nothing behind."""
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        c.create("tiny").checkpoint("then-stop", full=True)
    time.sleep(0.05)
    rc = d.stop()
    left = leftovers(d.state_dir)
    if rc != 0 or left["inits"]:  # clean up: kill what leaked, let a restart reconcile
        for pid in left["inits"]:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        for m in sorted(left["mounts"], key=len, reverse=True)[:-1]:
            subprocess.run(["umount", "-l", m])
        d.start()
    assert (rc, left) == (0, {"mounts": [], "loops": [], "inits": []}), \
        f"exit {rc}, left behind {left}; daemon log: ...{d.log()[-600:]}"


def test_nat_sandbox_full_checkpoint_rolls_back_with_its_network(daemon, client):
    """The network namespace is dumped empty; each incarnation gets the veth again (outbound
    traffic after rollback and fork: tests/test_dump_side.py, with a peer to reach)."""
    from test_network import nat_unavailable
    if (missing := nat_unavailable()):
        pytest.skip(f"the host cannot do NAT: {missing}")
    sbx = client.create("demo", network="nat")
    try:
        bash = sbx.open_session("bash", name="sh")
        bash.run("X=kept")
        ckpt = sbx.checkpoint("nat", full=True)
        bash.run("X=changed")
        sbx.rollback(ckpt)
        assert bash.run("echo $X").stdout == b"kept\n"
        # the default route, via the veth (added only once eth0 is up with its address)
        route = bash.run("grep -c '^eth0\t00000000' /proc/net/route").stdout
        assert route == b"1\n"
    finally:
        sbx.destroy()


# ---- calls in flight ---------------------------------------------------------------------------

def test_full_checkpoint_refused_while_exec_or_session_call_in_flight(demo):
    bash = demo.open_session("bash", name="sh")
    for what in ("exec", "session"):
        started = threading.Event()
        out: dict = {}

        def call():
            if what == "exec":
                events = demo.exec_stream(["sh", "-c", "echo begin; sleep 1.2; echo end"])
                chunks = []
                for ev in events:
                    if ev.kind == "stdout":
                        chunks.append(ev.stdout)
                        started.set()
                    elif ev.kind == "exit":
                        out["exit"] = ev.exit.exit_code
                out["stdout"] = b"".join(chunks)
            else:
                started.set()
                r = bash.run("echo begin; sleep 1.2; echo end")
                out["exit"], out["stdout"] = r.exit_code, r.stdout
        t = threading.Thread(target=call)
        t.start()
        assert started.wait(5)
        wait_for(lambda: any(cmd == "sleep 1.2" for _, cmd in procs(demo).values()),
                 f"the {what} call's sleep to run")
        with pytest.raises(deltabox.FailedPrecondition, match="running"):
            demo.checkpoint("busy", full=True)
        demo.checkpoint("fs-is-fine", full=False)          # filesystem-only is allowed
        t.join(10)
        assert out == {"exit": 0, "stdout": b"begin\nend\n"}, (what, out)
    ckpt = demo.checkpoint("idle", full=True)
    assert ckpt.mode == deltabox.CheckpointMode.FULL           # once the calls have ended


def test_exec_abandoned_by_its_client_does_not_block_checkpoints(daemon, demo):
    """A client deadline (or a crashed trainer) ends the exec's stream: it must not count as
    a call in flight for ever."""
    with deltabox.Client(daemon.socket, timeout=0.5) as impatient:
        with pytest.raises(deltabox.DeadlineExceeded):
            deltabox.Sandbox(impatient, demo.info).exec(["sleep", "30"], deadline=0.5)

    def try_checkpoint():
        try:
            return demo.checkpoint("after-cancel", full=True)
        except deltabox.FailedPrecondition:
            return None
    wait_for(try_checkpoint, "a full checkpoint after the exec was cancelled", timeout=5,
             interval=0.2)


def test_execs_racing_checkpoints(daemon, demo):
    """Execs started while a full checkpoint runs must not break it (nor be broken): a
    checkpoint either succeeds -- and then restores to its own state -- or is refused,
    clearly, because an exec is in flight. Two threads keep execs in flight most of the
    time, so many attempts are refused; but the gaps between execs must let checkpoints
    through (10 within 200 attempts), else they starve behind the execs."""
    stop = threading.Event()
    failures, done = [], [0]

    def loop():
        while not stop.is_set():
            try:
                r = demo.exec(["true"])
                if r.exit_code != 0:
                    failures.append(r)
                done[0] += 1
            except deltabox.DeltaboxError as e:
                failures.append(e)
            time.sleep(0.01)
    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    outcomes, taken = [], []
    try:
        for i in range(200):
            demo.write_file("/work/mark", str(i), make_parents=True)  # a file call, not an exec
            try:
                taken.append((i, demo.checkpoint(f"race-{i}", full=True)))
                outcomes.append("ok")
            except deltabox.FailedPrecondition as e:
                outcomes.append(str(e))
            if len(taken) == 10:
                break
            time.sleep(0.03)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    unclear = [o for o in outcomes if o != "ok" and "call(s) are running" not in o]
    assert not unclear, "\n".join(unclear)
    assert done[0] > 0
    assert len(taken) == 10, f"{len(taken)} of {len(outcomes)} checkpoints succeeded"
    # each success holds its own instant: its mark, and a live (thawed) init that runs
    for i, ckpt in reversed(taken):
        demo.rollback(ckpt)
        assert demo.read_file("/work/mark") == str(i).encode(), (i, ckpt.id)
        assert freezer_state(live_init(daemon.state_dir, demo)) == "THAWED"
        assert sh(demo, "echo restored") == "restored\n"
