"""Isolation: the sandbox is a security boundary.

Every test runs real commands in real sandboxes and checks the effect from
both sides: what the sandbox can see or do, and (where it matters) that the
host was not touched. A check that could pass on an unconfined process is
paired with a host-side sanity check that shows the probe would have seen a
leak had there been one.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR

# Capabilities that must never reach a sandbox (linux/capability.h numbers).
FORBIDDEN_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,   # open_by_handle_at: the "shocker" escape
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_ADMIN": 12,
    "CAP_IPC_LOCK": 14,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}


# ---- helpers ---------------------------------------------------------------------------

def sh(sbx, cmd, **kw) -> deltabox.ExecResult:
    return sbx.exec(cmd, **kw)


def ok(sbx, cmd, **kw) -> bytes:
    r = sbx.exec(cmd, **kw)
    assert r.exit_code == 0, (cmd, r)
    return r.stdout


def cgroup_dir(sbx, controller: str) -> Path:
    """The host directory of the sandbox's cgroup for `controller` (v1 or v2),
    found from its init's /proc/<pid>/cgroup, so it follows any layout."""
    pid = sbx.info.init_pid or sbx.refresh().info.init_pid
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            d = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
            if d.is_dir():
                return d
    for line in lines:
        hid, _, path = line.split(":", 2)
        if hid == "0":
            d = Path("/sys/fs/cgroup") / path.lstrip("/")
            if d.is_dir():
                return d
    raise AssertionError(f"no {controller} cgroup for {sbx}: {lines}")


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def host_pids_in(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def pid_in_cgroup(pid: int, sandbox_id: str) -> bool:
    try:
        return sandbox_id in Path(f"/proc/{pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def fresh_client(daemon, timeout: float) -> deltabox.Client:
    return deltabox.Client(daemon.socket, timeout=timeout)


@pytest.fixture
def host_markers():
    """Unique marker files on the host, in /root and /tmp."""
    tag = uuid.uuid4().hex
    paths = [Path("/root") / f"deltabox-marker-{tag}", Path("/tmp") / f"deltabox-marker-{tag}"]
    for p in paths:
        p.write_text(f"host secret {tag}\n")
    yield tag, paths
    for p in paths:
        p.unlink(missing_ok=True)


@pytest.fixture
def make_sandbox(client):
    made = []

    def make(image="tiny", **kw):
        sbx = client.create(image, **kw)
        made.append(sbx)
        return sbx
    yield make
    for sbx in made:
        try:
            sbx.destroy()
        except deltabox.NotFound:
            pass


# ---- pid / uts namespaces --------------------------------------------------------------

def test_only_own_processes_visible(tiny, daemon):
    out = ok(tiny, ["ps", "-o", "pid,comm"]).decode().splitlines()[1:]
    procs = {int(line.split()[0]): line.split()[1] for line in out}
    assert procs[1].startswith("deltabox-init"), procs
    assert len(procs) <= 4, procs   # init, sh/ps: nothing else
    numeric = [n for n in ok(tiny, "ls /proc").decode().split() if n.isdigit()]
    assert "1" in numeric and len(numeric) <= 4, numeric

    # the host's processes (the daemon, pytest) are not there by pid or by name
    assert daemon.proc.pid > 10 and os.getpid() > 10
    for host_pid in (daemon.proc.pid, os.getpid()):
        r = sh(tiny, f"kill -0 {host_pid}")
        assert r.exit_code != 0, f"host pid {host_pid} is signalable from the sandbox"
    cmdlines = ok(tiny, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert b"deltabox.cli" not in cmdlines and b"pytest" not in cmdlines, cmdlines
    # pid 1 inside is the sandbox's own init, which the host knows by its host pid
    host_init = tiny.refresh().info.init_pid
    assert "deltabox-init" in Path(f"/proc/{host_init}/cmdline").read_text()
    assert ok(tiny, "cat /proc/1/cmdline").startswith(b"deltabox-init")


def test_hostname_is_the_sandboxes(make_sandbox):
    host_name = socket.gethostname()
    name = f"iso-{uuid.uuid4().hex[:8]}"
    sbx = make_sandbox("tiny", hostname=name)
    assert ok(sbx, "hostname").decode().strip() == name
    assert ok(sbx, "cat /proc/sys/kernel/hostname").decode().strip() == name
    r = sh(sbx, "hostname evil-rename")
    assert r.exit_code != 0
    assert ok(sbx, "hostname").decode().strip() == name
    assert socket.gethostname() == host_name
    # default: the sandbox's name
    other = make_sandbox("tiny", name=f"n-{uuid.uuid4().hex[:8]}")
    assert ok(other, "hostname").decode().strip() == other.name


# ---- mount namespace / root ------------------------------------------------------------

def test_host_files_not_visible(tiny, host_markers):
    tag, paths = host_markers
    assert all(p.exists() for p in paths)
    for p in paths:
        assert sh(tiny, f"test -e {p}").exit_code == 1, p
        assert sh(tiny, f"cat {p}").exit_code != 0
        assert sh(tiny, f"cat /proc/1/root{p}").exit_code != 0
        with pytest.raises(deltabox.NotFound):
            tiny.read_file(str(p))
    found = ok(tiny, f"find / -xdev -name 'deltabox-marker-{tag}*' 2>/dev/null; true")
    assert found == b""
    # sanity: the same probe finds a file that is inside
    ok(tiny, f"touch /tmp/deltabox-marker-{tag}-inside")
    assert ok(tiny, f"find / -xdev -name 'deltabox-marker-{tag}*'").strip() == \
        f"/tmp/deltabox-marker-{tag}-inside".encode()


def test_root_is_the_image(tiny):
    with tarfile.open(TINY_TAR) as tar:
        image_top = {m.name.lstrip("./").split("/")[0] for m in tar.getmembers()} - {""}
        image_passwd = tar.extractfile("./etc/passwd").read()
    inside = set(ok(tiny, "ls -a /").decode().split()) - {".", ".."}
    assert image_top <= inside, image_top - inside
    extra = {e for e in inside - image_top if not e.startswith(".")}
    assert extra <= {"dev", "proc", "sys", "tmp"}, extra
    host_only = set(os.listdir("/")) - image_top - {"dev", "proc", "sys", "tmp"}
    assert host_only, "test needs host-only top-level entries to be meaningful"
    assert not (host_only & inside), host_only & inside
    assert ok(tiny, "cat /etc/passwd") == image_passwd
    assert image_passwd != Path("/etc/passwd").read_bytes()
    assert Path("/etc/debian_version").exists()
    assert sh(tiny, "test -e /etc/debian_version").exit_code == 1

    # A process's /proc/<pid>/root is the sandbox's root, not the host's...
    assert ok(tiny, "readlink /proc/self/root").strip() == b"/"
    assert ok(tiny, "ls -a /proc/self/root") == ok(tiny, "ls -a /")
    assert ok(tiny, "stat -c %d:%i /proc/self/root/") == ok(tiny, "stat -c %d:%i /")
    assert ok(tiny, "cat /proc/self/root/etc/passwd") == image_passwd
    # ...and the init's is closed to the sandbox altogether (it is not dumpable)
    assert sh(tiny, "readlink /proc/1/root").exit_code != 0


# ---- network namespace -----------------------------------------------------------------

def test_only_loopback_interface(tiny):
    lines = ok(tiny, "cat /proc/net/dev").decode().splitlines()[2:]
    ifaces = sorted(line.split(":")[0].strip() for line in lines)
    assert ifaces == ["lo"], ifaces
    # sanity: the host has more than lo, so the probe is meaningful
    host = [line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text()
            .splitlines()[2:]]
    assert set(host) - {"lo"}
    link = ok(tiny, "ip -o link").decode()
    assert re.findall(r"^\d+: (\S+?):", link, re.M) == ["lo"], link
    assert "UP" in ok(tiny, "ip link show lo").decode()


def _host_ipv4_addresses() -> list[str]:
    addrs = set()
    try:
        import subprocess
        out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        addrs = {m for m in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", out)}
    except FileNotFoundError:
        pass
    return sorted(a for a in addrs if not a.startswith("127."))


CONNECT_PROBE = r"""
import socket, sys
for host in sys.argv[2:]:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(sys.argv[1])))
        print(host, "CONNECTED")
    except OSError as e:
        print(host, "FAILED", e.errno)
    finally:
        s.close()
"""


def test_cannot_reach_host_tcp(demo):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        targets = ["127.0.0.1"] + _host_ipv4_addresses()
        # sanity: the listener is reachable from the host itself
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass
        server.accept()[0].close()

        r = demo.exec(["python3", "-c", CONNECT_PROBE, str(port), *targets], timeout=30)
        assert r.exit_code == 0, r
        lines = r.stdout.decode().splitlines()
        assert len(lines) == len(targets), lines
        assert all(" FAILED " in line for line in lines), lines
        with pytest.raises(BlockingIOError):
            server.accept()     # nothing from the sandbox arrived
    finally:
        server.close()


LOOPBACK_PROBE = r"""
import socket, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
port = srv.getsockname()[1]
def serve():
    c, _ = srv.accept()
    c.sendall(b"echo:" + c.recv(100))
    c.close()
t = threading.Thread(target=serve); t.start()
cli = socket.create_connection(("127.0.0.1", port), timeout=5)
cli.sendall(b"ping")
print(cli.recv(100).decode())
t.join()
"""


def test_loopback_works_inside(demo):
    r = demo.exec(["python3", "-c", LOOPBACK_PROBE], timeout=30)
    assert (r.exit_code, r.stdout) == (0, b"echo:ping\n"), r


# ---- privileges ------------------------------------------------------------------------

def test_capabilities_dropped_and_no_new_privs(tiny):
    for who in ("self", "1"):
        status = parse_status(ok(tiny, f"cat /proc/{who}/status").decode())
        for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            bits = int(status[field], 16)
            leaked = sorted(n for n, b in FORBIDDEN_CAPS.items() if bits >> b & 1)
            assert not leaked, f"/proc/{who} {field}={status[field]} has {leaked}"
        assert status["NoNewPrivs"] == "1", (who, status["NoNewPrivs"])
    # sanity: the host-side test process does have them (the parse is right)
    host = parse_status(Path("/proc/self/status").read_text())
    assert int(host["CapEff"], 16) >> FORBIDDEN_CAPS["CAP_SYS_ADMIN"] & 1


def test_cannot_mount(tiny):
    before = ok(tiny, "cat /proc/self/mountinfo")
    for cmd in ("mount -t tmpfs none /tmp", "mount -t proc proc /tmp",
                "mount --bind /etc /tmp", "umount /proc/sys", "umount -l /proc/sys",
                "mount -o remount,rw /proc/sys", "mount -o remount,rw /"):
        r = sh(tiny, cmd)
        assert r.exit_code != 0, (cmd, r)
    assert ok(tiny, "cat /proc/self/mountinfo") == before
    assert b" /proc/sys ro," in before


def test_user_namespace_cannot_regain_capabilities(demo):
    """A sandbox that may unshare a user namespace gets every capability there
    (and can mount tmpfs/proc/overlay, create netns, ...): the capability drop
    and 'cannot mount' must not be undone that way."""
    r = demo.exec(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                   "mount -t tmpfs none /mnt && echo MOUNTED; grep CapEff /proc/self/status"])
    assert b"MOUNTED" not in r.stdout, r
    assert r.exit_code != 0, f"user namespace created inside the sandbox: {r}"


def test_cannot_load_kernel_modules(demo, tiny):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    host_ret = libc.syscall(175, None, 0, b"")   # init_module on the host, as root
    host_errno = ctypes.get_errno()
    assert host_ret == -1
    probe = ("import ctypes; l = ctypes.CDLL(None, use_errno=True); "
             "r1 = l.syscall(175, None, 0, b''); e1 = ctypes.get_errno(); "
             "r2 = l.syscall(313, -1, b'', 0); e2 = ctypes.get_errno(); "
             "print(r1, e1, r2, e2)")
    r1, e1, r2, e2 = map(int, ok(demo, ["python3", "-c", probe]).split())
    assert r1 == -1 and r2 == -1
    if host_errno == errno.ENOSYS:     # kernel built without module support
        assert {e1, e2} <= {errno.EPERM, errno.ENOSYS}
    else:                             # host root gets past the capability check
        assert (e1, e2) == (errno.EPERM, errno.EPERM), (e1, e2)
    cap_bnd = int(parse_status(ok(tiny, "cat /proc/self/status").decode())["CapBnd"], 16)
    assert not cap_bnd >> FORBIDDEN_CAPS["CAP_SYS_MODULE"] & 1
    assert sh(tiny, "modprobe -q dummy || insmod /dummy.ko").exit_code != 0


def test_cannot_mknod_devices(tiny):
    for cmd, path in (("mknod /tmp/blk b 7 0", "/tmp/blk"), ("mknod /tmp/mem c 1 1", "/tmp/mem"),
                      ("mknod /tmp/kmsg c 1 11", "/tmp/kmsg")):
        r = sh(tiny, cmd)
        assert r.exit_code != 0 and b"not permitted" in r.stderr, (cmd, r)
        assert sh(tiny, f"test -e {path}").exit_code == 1
    # sanity: mknod works for what needs no privilege
    ok(tiny, "mknod /tmp/fifo p && test -p /tmp/fifo")


def test_proc_sys_and_sysrq_are_read_only(tiny):
    for knob in ("/proc/sys/vm/swappiness", "/proc/sys/kernel/core_pattern",
                 "/proc/sys/kernel/panic"):
        host_value = Path(knob).read_text()
        # writing back the current value: harmless if (wrongly) allowed
        r = sh(tiny, f"cat {knob} > /tmp/v && cat /tmp/v > {knob}")
        assert r.exit_code != 0 and b"Read-only" in r.stderr, (knob, r)
        assert Path(knob).read_text() == host_value
    # 'h' only prints help to the kernel log, were it ever accepted
    r = sh(tiny, "echo h > /proc/sysrq-trigger")
    assert r.exit_code != 0, r
    if Path("/proc/sysrq-trigger").exists():
        assert b"Read-only" in r.stderr, r


WRITABLE_PROBE = r"""
import glob, os, sys
paths = ["/proc/irq/default_smp_affinity"] + sorted(glob.glob("/proc/irq/*/smp_affinity"))[:3]
paths += sorted(glob.glob("/proc/bus/pci/*/*"))[:2]
for p in paths:
    if not os.path.exists(p):
        continue
    try:
        os.close(os.open(p, os.O_WRONLY))   # opening writes nothing
        print(p, "WRITABLE")
    except OSError as e:
        print(p, "refused", e.errno)
"""


def test_host_wide_proc_knobs_are_read_only(demo):
    """Besides /proc/sys, procfs has host-global knobs that root may write with no
    capability at all: IRQ affinity (/proc/irq) and PCI config space (/proc/bus).
    Only opened for writing here, never written."""
    r = demo.exec(["python3", "-c", WRITABLE_PROBE])
    assert r.exit_code == 0, r
    lines = r.stdout.decode().splitlines()
    if not lines:
        pytest.skip("this kernel has neither /proc/irq nor /proc/bus/pci")
    writable = [line for line in lines if line.endswith("WRITABLE")]
    assert not writable, f"host-wide /proc files writable from the sandbox: {writable}"


# ---- sandboxes versus each other ---------------------------------------------------------

def test_sandboxes_cannot_see_each_other(make_sandbox):
    a, b = make_sandbox("tiny"), make_sandbox("tiny")
    tag = uuid.uuid4().hex[:12]
    marker_secs = str(4_000_000 + int(tag[:5], 16))
    with a.open_session("sh") as s:
        s.run(f"sleep {marker_secs} &")
        s.run("nc -l -p 5555 -e echo pong >/dev/null 2>&1 &")
        a.write_file(f"/tmp/secret-{tag}", "a's file")
        ok(a, f"echo a-shm > /dev/shm/secret-{tag}")
        time.sleep(0.2)
        # sanity: A sees its own
        assert marker_secs.encode() in ok(a, "ps -o args")
        assert ok(a, f"cat /tmp/secret-{tag} /dev/shm/secret-{tag}") == b"a's filea-shm\n"

        assert marker_secs.encode() not in ok(b, "ps -o args")
        assert marker_secs.encode() not in ok(b, "cat /proc/[0-9]*/cmdline")
        assert sh(b, f"test -e /tmp/secret-{tag}").exit_code == 1
        assert sh(b, f"test -e /dev/shm/secret-{tag}").exit_code == 1
        with pytest.raises(deltabox.NotFound):
            b.read_file(f"/tmp/secret-{tag}")
        r = sh(b, "nc -w 2 127.0.0.1 5555 </dev/null", timeout=10)
        assert r.exit_code != 0 and r.stdout == b"", r
        # A's listener is real: A itself reaches it
        assert ok(a, "nc -w 2 127.0.0.1 5555 </dev/null", timeout=10) == b"pong\n"
    # different pid namespaces; their inits differ on the host
    assert a.refresh().info.init_pid != b.refresh().info.init_pid
    assert ok(a, "readlink /proc/self/ns/pid") != ok(b, "readlink /proc/self/ns/pid")


# ---- resource limits ---------------------------------------------------------------------

FORK_BOMB = r"""
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


def test_fork_bomb_is_contained(make_sandbox, client, daemon):
    other = make_sandbox("tiny")
    bomb = make_sandbox("demo", pids=64)
    pids_cg = cgroup_dir(bomb, "pids")
    freezer_cg = cgroup_dir(bomb, "freezer")
    assert (pids_cg / "pids.max").read_text().strip() == "64"

    outcome = {}

    def run():
        try:
            outcome["result"] = bomb.exec(["python3", "-c", FORK_BOMB], timeout=60)
        except deltabox.DeltaboxError as e:
            outcome["error"] = e
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        samples = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            samples.append(int((pids_cg / "pids.current").read_text()))
            time.sleep(0.02)
        assert max(samples) <= 64, max(samples)
        assert max(samples) >= 60, f"the bomb never reached the limit: {samples[-20:]}"

        # the daemon and other sandboxes are unaffected
        t0 = time.monotonic()
        client.status()
        assert ok(other, "echo ok") == b"ok\n"
        assert time.monotonic() - t0 < 5.0

        # exec into the bombed sandbox answers (fails clearly or runs), no hang
        with fresh_client(daemon, 15) as c2:
            t0 = time.monotonic()
            try:
                r = c2.get(bomb.id).exec("echo hi")
                assert r.stdout == b"hi\n"
            except deltabox.ResourceExhausted as e:
                assert "limit" in str(e), e
            assert time.monotonic() - t0 < 10
        assert int((pids_cg / "pids.current").read_text()) <= 64

        members = host_pids_in(freezer_cg)
        assert len(members) >= 60
    finally:
        t0 = time.monotonic()
        bomb.destroy()
        destroy_s = time.monotonic() - t0
    runner.join(15)
    assert not runner.is_alive()
    assert destroy_s < 15, destroy_s
    assert not pids_cg.exists() and not freezer_cg.exists()
    leftover = [p for p in members if pid_in_cgroup(p, bomb.id)]
    assert leftover == []
    assert bomb.id not in {s.id for s in client.list()}
    assert ok(other, "echo still ok") == b"still ok\n"


PID_FILLER = r"""
import os, sys, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(1000)
        os._exit(0)
    n += 1
print(n, flush=True)
time.sleep(1000)
"""


def test_exec_at_pid_limit_fails_clearly(make_sandbox, daemon):
    sbx = make_sandbox("demo", pids=16)
    pids_cg = cgroup_dir(sbx, "pids")
    started = threading.Event()

    def run():
        try:
            for ev in sbx.exec_stream(["python3", "-c", PID_FILLER], timeout=60):
                if ev.kind == "stdout":
                    started.set()
        except deltabox.DeltaboxError:
            pass
    threading.Thread(target=run, daemon=True).start()
    assert started.wait(20), "the filler never reached the limit"
    assert int((pids_cg / "pids.current").read_text()) == 16

    with fresh_client(daemon, 15) as c2:
        s2 = c2.get(sbx.id)
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(deltabox.ResourceExhausted, match="pids"):
                s2.exec(["echo", "hi"])
            assert time.monotonic() - t0 < 5
        with pytest.raises(deltabox.ResourceExhausted, match="pids"):
            s2.open_session("sh")
        # still a sandbox: destroy takes everything down
        sbx.destroy()
    assert not pids_cg.exists()


def _oom_kills(memcg: Path) -> int:
    events = memcg / "memory.events"
    text = events.read_text() if events.exists() else (memcg / "memory.oom_control").read_text()
    return int(re.search(r"oom_kill (\d+)", text).group(1))


def test_memory_hog_is_oom_killed(make_sandbox, client):
    sbx = make_sandbox("demo", memory=64 << 20)
    memcg = cgroup_dir(sbx, "memory")
    init_pid = sbx.refresh().info.init_pid
    kills = _oom_kills(memcg)

    t0 = time.monotonic()
    r = sbx.exec(["python3", "-c", "b = b'x' * (200 << 20); print(len(b))"], timeout=60)
    assert not r.timed_out and time.monotonic() - t0 < 30
    assert (r.exit_code, r.signal) == (-1, 9), r
    assert r.stdout == b""
    assert _oom_kills(memcg) > kills

    r = sbx.exec("head -c 300M /dev/zero | tail > /dev/null; echo rc=$?", timeout=60)
    assert r.stdout == b"rc=137\n", r

    # the sandbox lives on: same init, still running, execs work
    info = sbx.refresh().info
    assert info.init_pid == init_pid and info.state == deltabox.SandboxState.RUNNING
    assert Path(f"/proc/{init_pid}").exists()
    assert ok(sbx, "echo alive") == b"alive\n"
    assert ok(sbx, ["python3", "-c", "b = b'x' * (8 << 20); print(len(b))"]) == b"8388608\n"
    client.status()


def test_mount_table_names_no_host_paths(tiny, daemon):
    """Overlay layers are mounted through fds: the sandbox's mount table does not
    reveal where the store lives on the host."""
    table = ok(tiny, "cat /proc/self/mountinfo").decode()
    assert "lowerdir+=/proc/self/fd/" in table, table  # the overlay is there...
    assert str(daemon.state_dir) not in table and "/store/" not in table, table  # ...anonymous
