"""Device allow-list: a sandbox opens only Docker's default devices.

Two layers keep host devices out: branch overlays are mounted nodev and the
sandbox has no CAP_MKNOD; these tests check the third, the cgroup's device
list (deltabox.host.cgroups.DEVICE_ALLOW), on its own -- through nodes placed where
nodev does not apply. The BPF program of the v2 driver is tested for real on
this hybrid host's unified hierarchy, where such programs apply too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from deltabox.host import cgroups
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc

# The cgroup2 hierarchy: all of /sys/fs/cgroup on v2 hosts, beside the v1 ones on hybrid hosts.
UNIFIED = next((p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                if (p / "cgroup.controllers").exists()), None)
KMSG = os.makedev(1, 11)  # a char device root may open for writing with no capability


def host_block_device() -> int:
    """rdev of a block device of this host that this (root) process can open:
    its disk if allowed (some hosts refuse even root), else e.g. a loop device."""
    for d in sorted(Path("/sys/class/block").iterdir(),
                    key=lambda p: (p.name.startswith(("loop", "zram", "ram")), p.name)):
        node = Path("/dev") / d.name
        try:
            os.close(os.open(node, os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            continue
        return os.stat(node).st_rdev
    pytest.skip("no block device this host lets root open")


# ---- the BPF program of the v2 driver, on the unified hierarchy ----------------------

PROBE = r"""
import json, os, sys
if sys.argv[1]:
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
nodes = json.loads(sys.argv[2])
out = {}
for name, (path, flags) in nodes.items():
    try:
        os.close(os.open(path, flags))
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
try:
    master, slave = os.openpty()  # /dev/ptmx (5:2) and a /dev/pts/N (136:N)
    out["pty"] = os.ttyname(slave)
except OSError as e:
    out["pty"] = e.errno
print(json.dumps(out))
"""


@pytest.fixture
def unified_cgroup():
    if UNIFIED is None:
        pytest.skip("no cgroup2 hierarchy")
    d = UNIFIED / f"deltabox-devtest-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    cgroups._rmdir_retry(d)


def probe_in(cgroup: Path | None, nodes: dict[str, tuple[str, int]]) -> dict:
    """Open each node from a fresh root process inside `cgroup` (None: ours);
    name -> errno (0: opened), and "pty" -> the pts a new pty got (or errno)."""
    r = subprocess.run([sys.executable, "-c", PROBE, str(cgroup or ""), json.dumps(nodes)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def host_nodes(tmp_path):
    """Device nodes made for the probe: a disk, /dev/kmsg, and the allowed ones."""
    made = {"disk": (stat.S_IFBLK, host_block_device(), os.O_RDONLY),
            "kmsg": (stat.S_IFCHR, KMSG, os.O_WRONLY),
            "null": (stat.S_IFCHR, os.makedev(1, 3), os.O_RDWR),
            "zero": (stat.S_IFCHR, os.makedev(1, 5), os.O_RDONLY),
            "urandom": (stat.S_IFCHR, os.makedev(1, 9), os.O_RDONLY),
            "full": (stat.S_IFCHR, os.makedev(1, 7), os.O_WRONLY)}
    nodes = {}
    for name, (kind, rdev, flags) in made.items():
        os.mknod(tmp_path / name, kind | 0o600, rdev)
        nodes[name] = (str(tmp_path / name), flags)
    return nodes


def test_bpf_filter_denies_devices_off_the_list(unified_cgroup, host_nodes):
    outside = probe_in(None, host_nodes)  # without the filter the probe opens them all
    assert all(outside[name] == 0 for name in host_nodes), outside

    cgroups.attach_device_filter(unified_cgroup)
    inside = probe_in(unified_cgroup, host_nodes)
    assert inside["disk"] == errno.EPERM and inside["kmsg"] == errno.EPERM, inside
    assert inside["null"] == inside["zero"] == inside["urandom"] == inside["full"] == 0, inside
    assert str(inside["pty"]).startswith("/dev/pts/"), inside


def test_bpf_filter_checks_access_and_reattaching_replaces(unified_cgroup, host_nodes):
    only_null_read = (cgroups.DeviceRule("c", 1, 3, "r"),)
    cgroups.attach_device_filter(unified_cgroup, only_null_read)
    nodes = {"null_r": (host_nodes["null"][0], os.O_RDONLY),
             "null_rw": (host_nodes["null"][0], os.O_RDWR), "zero": host_nodes["zero"]}
    got = probe_in(unified_cgroup, nodes)
    assert got["null_r"] == 0 and got["null_rw"] == errno.EPERM and got["zero"] == errno.EPERM
    assert got["pty"] == errno.EPERM

    # A cgroup created again gets the filter again: one program, the latest.
    cgroups.attach_device_filter(unified_cgroup)
    got = probe_in(unified_cgroup, nodes)
    assert got["null_r"] == got["null_rw"] == got["zero"] == 0, got


def test_bpf_filter_errors_name_the_call(unified_cgroup, tmp_path):
    with pytest.raises(OSError, match="BPF_PROG_LOAD") as e:
        cgroups.attach_device_filter(unified_cgroup, (cgroups.DeviceRule("x", 1, 3, "r"),))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError, match="BPF_PROG_ATTACH"):  # a directory, not a cgroup
        cgroups.attach_device_filter(tmp_path)


# ---- a sandbox, through the daemon --------------------------------------------------

def place_node(sbx, name: str, kind: int, rdev: int) -> Path:
    """mknod into the sandbox's /dev (a tmpfs without nodev) from the host."""
    pid = sbx.info.init_pid or sbx.refresh().info.init_pid
    path = Path(f"/proc/{pid}/root/dev/{name}")
    os.mknod(path, kind | 0o666, rdev)
    return path


def test_sandbox_cannot_open_devices_off_the_list(tiny):
    disk = place_node(tiny, "hostdisk", stat.S_IFBLK, host_block_device())
    kmsg = place_node(tiny, "hostkmsg", stat.S_IFCHR, KMSG)
    # Live nodes: the host opens them through the same mount (so neither nodev
    # nor file modes are what stops the sandbox below).
    os.close(os.open(disk, os.O_RDONLY))
    os.close(os.open(kmsg, os.O_WRONLY))

    for cmd in ("exec 3</dev/hostdisk", "exec 3>/dev/hostdisk", "exec 3>/dev/hostkmsg"):
        r = tiny.exec(cmd)
        assert r.exit_code != 0 and b"Operation not permitted" in r.stderr, (cmd, r)

    r = tiny.exec("cat /dev/null && head -c 8 /dev/zero | wc -c && head -c 8 /dev/urandom "
                  "| wc -c && head -c 8 /dev/random | wc -c && echo x >/dev/null && "
                  "exec 3>/dev/full && echo ok")
    assert r.exit_code == 0 and r.stdout.split() == [b"8", b"8", b"8", b"ok"], r


def test_restored_and_forked_sandboxes_keep_the_list(client, tiny):
    """CRIU restores /dev (a tmpfs: its nodes are mknod'ed again, a foreign block
    node included) inside the new incarnation's cgroup, which has the list too."""
    place_node(tiny, "hostdisk", stat.S_IFBLK, host_block_device())
    # a process that outlives its exec (own session), restored by CRIU with the rest
    tiny.exec("setsid sleep 1000 >/dev/null 2>&1 </dev/null & p=$!; "
              "while [ \"$(cut -d' ' -f6 /proc/$p/stat)\" != \"$p\" ]; do sleep 0.01; done"
              ).check()
    ckpt = tiny.checkpoint("devices", full=True)
    tiny.rollback(ckpt)
    (child,) = client.fork(ckpt)
    assert child.error is None, child.error
    try:
        for sbx in (tiny, child.sandbox):
            r = sbx.exec("pidof sleep && ls -l /dev/hostdisk && exec 3</dev/hostdisk")
            assert r.exit_code != 0 and b"Operation not permitted" in r.stderr, r
            assert b"hostdisk" in r.stdout, r  # restored with the tmpfs, still a node
            assert sbx.exec("head -c 4 /dev/urandom | wc -c").check().stdout == b"4\n"
    finally:
        child.sandbox.destroy()


def test_sandbox_pty_shell_uses_tty_and_pts(daemon, tiny):
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = pb_grpc.SandboxesStub(channel)

    def inputs():
        yield pb.ShellInput(start=pb.ShellStart(sandbox=tiny.id, argv=["/bin/sh"], rows=24,
                                                cols=80))
        # (the pty echoes the input: only the shell's arithmetic shows it ran)
        yield pb.ShellInput(stdin=b"tty; echo via-$((6*7)) >/dev/tty; exec 3<>/dev/ptmx && "
                                  b"echo ptmx-$((1+1)); exit 0\n")
    out = b""
    try:
        for msg in stub.Shell(inputs(), timeout=30):
            if msg.WhichOneof("output") == "data":
                out += msg.data
    finally:
        channel.close()
    assert b"/dev/pts/" in out and b"via-42" in out and b"ptmx-2" in out, out
    assert b"not permitted" not in out, out


@pytest.mark.skipif(not Path("/sys/fs/cgroup/devices").is_dir(), reason="no v1 devices")
def test_v1_devices_list_is_the_allow_list(tiny):
    pid = tiny.info.init_pid or tiny.refresh().info.init_pid
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "devices" in ctrls.split(","):
            d = Path("/sys/fs/cgroup/devices") / path.lstrip("/")
            break
    else:
        pytest.fail("the sandbox's init is in no devices cgroup")
    assert d.parent.parent.name == "deltabox" and d.name, d
    listed = (d / "devices.list").read_text().split("\n")
    assert [x for x in listed if x] == [r.v1_line() for r in cgroups.DEVICE_ALLOW]
