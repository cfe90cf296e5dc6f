"""DeltaBox as a host service under a real systemd as PID 1 (issue 12), end to end.

This VM's PID 1 is not systemd, so the test boots one: `systemd-nspawn --boot` of the Debian
rootfs that `native/setup-host.sh service-rootfs` (part of `make host`) caches in
$DELTABOX_CACHE/service-rootfs/root. Each run boots an overlay of it, so the cache never
changes. Inside the container, as an admin would on a host:

  native/install.sh install          the wheel built here; its dependencies from a wheelhouse
                                     (the container has no compiler and needs no index)
  systemctl start deltabox           Type=notify: returns once the socket is served
  a user in the `deltabox` group     creates a sandbox, checkpoints it and rolls it back;
                                     a user outside the group is refused
  systemctl restart deltabox         a "restart" job: the old daemon leaves the sandbox
                                     (--on-exit systemd), the new one adopts it: same init pid,
                                     the shell session's variable and cwd still there
  systemctl stop deltabox            a "stop" job: nothing is left mounted or running, the
                                     unit's cgroup is empty, the unit ends "success"

What the container gets from the host, and why:
- `--capability=all`, no user namespace: the daemon mounts, makes namespaces and runs CRIU.
- CRIU (`$DELTABOX_CRIU_PREFIX`, as `make host` built it), read-only, and the images.
- Loop devices: nspawn's /dev is a tmpfs without them (no udev inside), so the test makes
  /dev/loop-control and /dev/loop0..255 there (the container may: all capabilities, and no
  device cgroup without a host systemd). The daemon then makes its default store, a sparse
  XFS image loop-mounted on /var/lib/deltabox/store, as on a host.
- The cgroup v1 controller hierarchies (hybrid hosts like this one) are remounted
  read-write inside: nspawn mounts them read-only, since a container normally must not
  manage the host's controllers; on a hybrid host booted by systemd they are writable by
  root, and the daemon puts every sandbox in its own groups there (docs/install.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import require_systemd_tool

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
ROOTFS = CACHE / "service-rootfs" / "root"
CRIU_PREFIX = Path(os.environ.get("DELTABOX_CRIU_PREFIX", "/opt/deltabox/criu"))
IMAGES = CACHE / "images"
# The extras native/install.sh installs (the daemon and the CLI).
EXTRAS = "server,cli"
PATH = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(argv, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def _check(res: subprocess.CompletedProcess, what: str) -> str:
    assert res.returncode == 0, f"{what}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _wheels(tmp: Path) -> tuple[Path, Path]:
    """The project's wheel (built now) and a wheelhouse of its dependencies (cached per
    pyproject.toml: the container installs offline)."""
    wheel = Path(_check(_run(["bash", str(ROOT / "native/install.sh"), "wheel",
                              str(tmp / "wheels")], timeout=300), "install.sh wheel")
                 .strip().splitlines()[-1])
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    house = CACHE / "service-rootfs" / f"wheelhouse-{key}"
    if not house.is_dir():
        new = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=house.parent))
        _check(_run([str(ROOT / ".venv/bin/python"), "-m", "pip", "wheel", "-q", "-w", str(new),
                     f"{wheel}[{EXTRAS}]"], timeout=300), "pip wheel (dependencies)")
        for whl in new.glob("deltabox-*.whl"):
            whl.unlink()
        new.rename(house)
    return wheel, house


class Container:
    """A booted `systemd-nspawn --boot` container, driven with nsenter (no machined)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.merged = tmp / "merged"
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0

    def boot(self, wheel: Path, wheelhouse: Path) -> None:
        tmp = self.tmp
        for d in ("upper", "work", "merged"):
            (tmp / d).mkdir()
        _check(_run(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={ROOTFS},upperdir={tmp}/upper,workdir={tmp}/work",
                     str(self.merged)]), "overlay mount")
        self.log = open(tmp / "nspawn.log", "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=passive",
             "-D", str(self.merged), "-M", f"deltabox-e2e-{os.getpid()}",
             "--capability=all", f"--bind-ro={ROOT}", f"--bind-ro={CRIU_PREFIX}",
             f"--bind-ro={wheel.parent}:/wheels", f"--bind-ro={wheelhouse}:/wheelhouse",
             f"--bind-ro={IMAGES}:/var/cache/deltabox/images"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.wheel = f"/wheels/{wheel.name}"
        self.leader = self._wait_leader()
        self._wait_booted()
        # Writable controllers, as on a hybrid host (the module docstring says why).
        self.sh("findmnt -rn -t cgroup -o TARGET,OPTIONS | awk '$2 ~ /(^|,)ro(,|$)/ {print $1}'"
                " | xargs -r -n1 mount -o remount,bind,rw")
        # Loop devices, as udev makes them on a host (the module docstring says why).
        self.sh("mknod -m 0660 /dev/loop-control c 10 237; "
                "for i in $(seq 0 255); do mknod -m 0660 /dev/loop$i b 7 $i; done")

    def _wait_booted(self, timeout: float = 90) -> None:
        # The leader is found as soon as it has exec'd systemd; until systemd has made
        # /run/systemd/system (sd_booted()), systemctl says "offline" at once, and until
        # its own socket is up it cannot connect. Both are the boot still starting (a
        # window that grows with the host's load): ask again, up to the deadline.
        deadline = time.monotonic() + timeout
        while True:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.nspawn.returncode}:\n"
                                     f"{(self.tmp / 'nspawn.log').read_text()}")
            left = max(deadline - time.monotonic(), 1)
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=left)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return
            starting = "connect" in res.stderr or (state == "offline" and not res.stderr)
            if time.monotonic() > deadline or not starting:
                failed = self.run(["systemctl", "--failed", "--no-pager"], check=False)
                log = (self.tmp / "nspawn.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"boot: {state} {res.stderr}\n{failed.stdout}\n{log}")
            time.sleep(0.2)

    def _wait_leader(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.nspawn.returncode}:\n"
                                     f"{(self.tmp / 'nspawn.log').read_text()}")
            kids = psutil.Process(self.nspawn.pid).children()
            if kids and kids[0].name() == "systemd":
                return kids[0].pid
            time.sleep(0.1)
        raise AssertionError("the container's systemd did not start")

    def run(self, argv: list[str], user: str | None = None, check: bool = True,
            timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run argv in the container (all its namespaces), as root or as `user`."""
        envs = [f"{k}={v}" for k, v in {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8",
                                         **(env or {})}.items()]
        prefix = ["nsenter", "--all", "--target", str(self.leader), "env", "-i", *envs]
        if user:
            prefix += ["runuser", "-u", user, "--"]
        res = _run([*prefix, *argv], timeout=timeout)
        if check:
            _check(res, " ".join(argv))
        return res

    def sh(self, script: str, check: bool = True, timeout: float = 120) -> str:
        return self.run(["sh", "-c", script], check=check, timeout=timeout).stdout

    def python(self, code: str, user: str) -> dict:
        """Run client code with the installed venv's python, as `user`; its JSON line."""
        out = self.run(["/opt/deltabox/venv/bin/python", "-c", code], user=user).stdout
        return json.loads(out.strip().splitlines()[-1])

    def unit(self, prop: str) -> str:
        return self.run(["systemctl", "show", "-p", prop, "--value", "deltabox"]).stdout.strip()

    def journal(self, invocation: str) -> list[dict]:
        """The daemon's structlog events of one invocation of the unit."""
        self.run(["journalctl", "--sync"])     # what journald received is on disk
        out = self.run(["journalctl", "-o", "cat", "--no-pager", "-u", "deltabox",
                        f"_SYSTEMD_INVOCATION_ID={invocation}"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            # Whatever the test left: the daemon stops its sandboxes, then the container
            # halts (a second SIGTERM makes nspawn end it at once).
            if self.leader:
                self.run(["systemctl", "stop", "deltabox"], check=False, timeout=120)
            for _ in range(2):
                self.nspawn.send_signal(signal.SIGTERM)
                try:
                    self.nspawn.wait(60)
                    break
                except subprocess.TimeoutExpired:
                    pass
            if self.nspawn.poll() is None:
                self.nspawn.kill()
                self.nspawn.wait(30)
        if self.nspawn is not None:
            self.log.close()
        if os.path.ismount(self.merged):
            _check(_run(["umount", str(self.merged)]), f"umount {self.merged}")


@pytest.fixture(scope="module")
def container():
    require_systemd_tool("systemd-nspawn", "`make host` (native/setup-host.sh packages "
                         "installs systemd-container)")
    if not (ROOTFS / "lib/systemd/systemd").exists():
        pytest.fail(f"{ROOTFS} missing: `make host` (native/setup-host.sh service-rootfs)")
    if not (CRIU_PREFIX / "sbin/criu").exists() or not (IMAGES / "tiny.tar").exists():
        pytest.fail("CRIU or the tiny image missing: `make host`")
    tmp = Path(tempfile.mkdtemp(prefix="deltabox-e2e-"))
    c = Container(tmp)
    try:
        c.boot(*_wheels(tmp))
        yield c
    finally:
        c.close()       # raises if a mount stays: rmtree must not cross into it
        shutil.rmtree(tmp, ignore_errors=True)


CREATE_AND_ROLL_BACK = """
import json, deltabox
with deltabox.Client("/run/deltabox/deltabox.sock") as c:
    s = c.create("tiny", name="svc")
    s.write_file("/root/f", b"before")
    ck = s.checkpoint("before")
    s.write_file("/root/f", b"after")
    s.rollback(ck.id)
    rolled_back = s.read_file("/root/f").decode()
    s.open_session("sh", name="sh").run("X=kept; cd /tmp")
    print(json.dumps({"init": s.refresh().info.init_pid, "f": rolled_back}))
"""

STILL_THERE = """
import json, deltabox
with deltabox.Client("/run/deltabox/deltabox.sock") as c:
    s = c.get("svc")
    r = s.session("sh").run("echo $X; pwd")
    print(json.dumps({"init": s.info.init_pid, "sh": r.stdout.decode(),
                      "f": s.read_file("/root/f").decode()}))
"""


def _events(journal: list[dict], name: str) -> list[dict]:
    return [e for e in journal if e.get("event") == name]


def _store_loop(c: Container) -> str:
    """The loop device the store is mounted from (the daemon's default, loop-backed store)."""
    return c.sh("findmnt -rn -o SOURCE /var/lib/deltabox/store").strip()


def _left_in_container(c: Container, loop: str) -> dict:
    mounts = c.sh("findmnt -rn -o TARGET | grep '^/var/lib/deltabox' || true").split()
    # The store's loop device still backed by its image (the kernel detaches it when the
    # store is unmounted; another user may take the device afterwards).
    name = Path(loop).name
    backing = c.sh(f"cat /sys/block/{name}/loop/backing_file 2>/dev/null || true").strip()
    loops = [loop] if backing.endswith("/var/lib/deltabox/store.xfs") else []
    # (the sandbox's shell session is in the unit's cgroup, checked below)
    procs = c.sh("ps -eo comm= | grep -x -e deltabox-init -e criu || true").split()
    cg = c.sh("cat /sys/fs/cgroup/systemd/system.slice/deltabox.service/cgroup.procs "
              "/sys/fs/cgroup/system.slice/deltabox.service/cgroup.procs 2>/dev/null || true")
    return {"mounts": mounts, "loops": loops, "processes": procs, "unit_cgroup": cg.split()}


def test_install_start_restart_keeps_sandbox_stop_leaves_nothing(container):
    c = container
    c.run(["bash", f"{ROOT}/native/install.sh", "install"], timeout=300,
          env={"WHEEL": c.wheel, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheelhouse"})
    assert c.unit("LoadState") == "loaded"          # the install ran daemon-reload
    verify = c.run(["systemd-analyze", "verify", "--man=no", "deltabox.service"], check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr

    c.run(["systemctl", "start", "deltabox"], timeout=300)     # returns at READY=1
    assert c.unit("ActiveState") == "active"
    first_pid, first = c.unit("MainPID"), c.unit("InvocationID")
    # The socket: root:deltabox 0660 in root:deltabox 0750 (RuntimeDirectory=).
    assert c.sh("stat -c '%A %U %G' /run/deltabox /run/deltabox/deltabox.sock").split() \
        == ["drwxr-x---", "root", "deltabox", "srw-rw----", "root", "deltabox"]
    c.run(["useradd", "--create-home", "--groups", "deltabox", "trainer"])
    c.run(["deltabox", "image", "import", "tiny", "/var/cache/deltabox/images/tiny.tar"])

    loop = _store_loop(c)
    assert loop.startswith("/dev/loop"), loop
    made = c.python(CREATE_AND_ROLL_BACK, user="trainer")
    assert made["f"] == "before", made                     # rolled back
    refused = c.run(["deltabox", "ls"], user="nobody", check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused

    c.run(["systemctl", "restart", "deltabox"], timeout=300)
    assert c.unit("ActiveState") == "active" and c.unit("MainPID") != first_pid
    old = c.journal(first)
    assert [(e["job"], e["keep_sandboxes"]) for e in _events(old, "daemon.on_exit")] \
        == [("restart", True)], old[-5:]
    assert _events(old, "daemon.stopped"), "the old daemon did not exit cleanly"
    second = c.unit("InvocationID")
    reconciled = _events(c.journal(second), "sandbox.reconciled")
    assert reconciled and reconciled[0]["adopted"] == 1 and reconciled[0]["restarted"] == 0
    assert reconciled[0]["stray_mounts"] == 0 and reconciled[0]["stray_cgroups"] == 0
    assert _store_loop(c) == loop                          # the store's mount was kept
    after = c.python(STILL_THERE, user="trainer")
    assert after == {"init": made["init"], "sh": "kept\n/tmp\n", "f": "before"}, after

    running = _left_in_container(c, loop)                  # what the stop must remove
    assert running["loops"] == [loop] and running["mounts"] and running["unit_cgroup"]
    assert "deltabox-init" in running["processes"], running

    c.run(["systemctl", "stop", "deltabox"], timeout=300)
    assert c.unit("ActiveState") == "inactive" and c.unit("Result") == "success"
    stop = c.journal(second)
    assert [(e["job"], e["keep_sandboxes"]) for e in _events(stop, "daemon.on_exit")] \
        == [("stop", False)], stop[-5:]
    assert _events(stop, "daemon.stopped")
    assert _left_in_container(c, loop) == {"mounts": [], "loops": [], "processes": [],
                                           "unit_cgroup": []}
