"""Fixtures: real daemons (subprocesses, as root) on throw-away state dirs.

`daemon` is one daemon for the whole session with the `tiny` (busybox) and
`demo` (debootstrap + python3 + bash + git) images imported; `DaemonProcess`
starts extra daemons for restart and crash tests. Nothing here mocks the
system: sandboxes are real namespaces, cgroups, overlay mounts on real XFS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import deltabox
from deltabox.testing import ThrowawayDaemon
from deltabox.host.cgroups import instance_processes
from deltabox.store.metadata import read_instance_id

CACHE = Path(os.environ.get("DELTABOX_CACHE", "/var/cache/deltabox"))
TINY_TAR = CACHE / "images" / "tiny.tar"
DEMO_TAR = CACHE / "images" / "demo.tar"


# An offline host the demo image (~260 MB) cannot reach -- e.g. the cgroup-v2 machine of
# docs/testing.md, sent native/offline-bundle.sh's tiny image only -- sets
# DELTABOX_TESTS_WITHOUT_DEMO=1: a test that asks for the demo image is skipped, not failed.
WITHOUT_DEMO = os.environ.get("DELTABOX_TESTS_WITHOUT_DEMO") == "1" and not DEMO_TAR.exists()


def _skip_if_demo_missing(error: Exception) -> None:
    if WITHOUT_DEMO and isinstance(error, deltabox.ImageNotFound) and (
            "'demo'" in str(error) or str(DEMO_TAR) in str(error)):
        pytest.skip("needs the demo image, absent here (DELTABOX_TESTS_WITHOUT_DEMO=1)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except deltabox.ImageNotFound as e:
        _skip_if_demo_missing(e)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except deltabox.ImageNotFound as e:
        _skip_if_demo_missing(e)
        raise


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("DeltaBox's tests are privileged: run them as root")


def pytest_collection_modifyitems(config, items):
    """Tests marked `demo_image` use it where ImageNotFound cannot be seen (a subprocess)."""
    if WITHOUT_DEMO:
        skip = pytest.mark.skip(reason="needs the demo image, absent here "
                                       "(DELTABOX_TESTS_WITHOUT_DEMO=1)")
        for item in items:
            if item.get_closest_marker("demo_image"):
                item.add_marker(skip)


# A host with no systemd at all (the offline v2 machine of docs/testing.md is a container
# without it) sets DELTABOX_TESTS_WITHOUT_SYSTEMD=1: what needs systemd's tools skips there.
# Anywhere else a missing tool is a failure (`make host` installs them).
WITHOUT_SYSTEMD = os.environ.get("DELTABOX_TESTS_WITHOUT_SYSTEMD") == "1"


def require_systemd_tool(tool: str, hint: str) -> None:
    """Fail (or skip, with DELTABOX_TESTS_WITHOUT_SYSTEMD=1) unless `tool` is on PATH."""
    if shutil.which(tool) is None:
        if WITHOUT_SYSTEMD:
            pytest.skip(f"{tool} missing, and this host has no systemd "
                        "(DELTABOX_TESTS_WITHOUT_SYSTEMD=1)")
        pytest.fail(f"{tool} missing: {hint}")


class DaemonProcess(ThrowawayDaemon):
    """A `deltabox daemon` subprocess with its own state dir and socket
    (`deltabox.testing.ThrowawayDaemon`), reading images from the cache and tmp dirs."""

    def __init__(self, state_dir: Path, store_size: str = "16G", extra_args: tuple = ()):
        super().__init__(state_dir, store_size=store_size, extra_args=extra_args,
                         image_dirs=(TINY_TAR.parent, Path(tempfile.gettempdir())))

    def start(self, timeout: float = 30) -> "DaemonProcess":
        super().start(timeout)
        store_instance(self.state_dir)
        return self


_INSTANCES: dict[Path, str] = {}


def store_instance(state_dir: Path) -> str | None:
    """The store instance id under `state_dir` (names its cgroups), remembered:
    the store is unmounted once its daemon stops."""
    if state_dir not in _INSTANCES:
        found = read_instance_id(state_dir)
        if found is None:
            return None
        _INSTANCES[state_dir] = found
    return _INSTANCES[state_dir]


def sandbox_inits(state_dir: Path) -> list[int]:
    """deltabox-init processes in the cgroups of this daemon's store. (Their mount
    table no longer names the store: overlays are mounted through fds.)"""
    instance = store_instance(state_dir)
    return [pid for pid in (instance_processes(instance, "deltabox-init") if instance else [])
            if not _zombie(pid)]


def _zombie(pid: int) -> bool:
    """Dead, not yet reaped: an adopted sandbox's init (its daemon gone) is reaped by PID 1,
    which in some containers (the device machine of docs/testing.md) never reaps."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def freezer_state(pid: int) -> str:
    """THAWED, FREEZING or FROZEN: the state of the process's cgroup freezer (v1
    freezer.state, or v2 cgroup.freeze as seen in cgroup.events)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return "THAWED"
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if ctrl == "freezer":
            f = Path("/sys/fs/cgroup/freezer") / path.lstrip("/") / "freezer.state"
            return f.read_text().strip() if f.exists() else "THAWED"
        if ctrl == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            f = Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.events"
            return "FROZEN" if f.exists() and "frozen 1" in f.read_text() else "THAWED"
    return "THAWED"


def leftovers(state_dir: Path) -> dict[str, list]:
    """What of a daemon is still in the kernel: mounts, loop devices, inits."""
    sd = str(state_dir)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if sd in line.split()[4]]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    loops = [line for line in loops.splitlines() if sd in line]
    return {"mounts": mounts, "loops": loops, "inits": sandbox_inits(state_dir)}


def sandbox_cgroups() -> set[str]:
    """Names of all sandbox cgroups of all daemons (deltabox/<instance>/<sandbox>)."""
    found = set()
    for base in (Path("/sys/fs/cgroup/freezer/deltabox"), Path("/sys/fs/cgroup/deltabox")):
        if base.is_dir():
            for inst in base.iterdir():
                if inst.is_dir():
                    found |= {p.name for p in inst.iterdir() if p.is_dir()}
    return found


def no_new_cgroups(before: set[str], timeout: float = 15.0) -> bool:
    """True once no sandbox cgroup exists that was not in `before`. Background work
    of the daemon (a standby being built or retired) may hold one for a moment; a
    leak holds it for good."""
    deadline = time.monotonic() + timeout
    while sandbox_cgroups() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="session")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="deltabox-pytest-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stopped_clean(d: DaemonProcess) -> None:
    """Destroy every sandbox of `d`, stop it gracefully, and check it left nothing in the
    kernel (mounts, loop devices, sandbox inits)."""
    with d.client() as c:
        for s in c.list():
            s.destroy()
    assert d.stop() == 0, d.log()
    left = leftovers(d.state_dir)
    assert left == {"mounts": [], "loops": [], "inits": []}, left


@pytest.fixture(scope="session")
def daemon(workdir):
    for tar in (TINY_TAR, *(() if WITHOUT_DEMO else (DEMO_TAR,))):
        if not tar.exists():
            raise RuntimeError(f"{tar} is missing: run `make setup` (native/setup-host.sh)")
    # One double, of the head only, whether or not a rollback is likely (the policy before
    # hot nodes): the suite's tests of the restore path roll back to older checkpoints.
    # tests/test_hot_nodes.py covers the default policy (the last K checkpoints, a pool for
    # the hottest, doubles only where rollbacks are likely) on its own daemons.
    d = DaemonProcess(workdir / "main",
                      extra_args=("--hot-checkpoints", "1", "--hottest-pool", "1",
                                  "--double-policy", "always")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        if not WITHOUT_DEMO:
            c.import_image("demo", DEMO_TAR)
    yield d
    stopped_clean(d)


@pytest.fixture
def new_daemon(workdir):
    """Factory for extra daemons; each is stopped (or killed) and checked at teardown."""
    made: list[DaemonProcess] = []

    def make(**kw) -> DaemonProcess:
        d = DaemonProcess(workdir / f"d-{uuid.uuid4().hex[:6]}", **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        if d.proc and d.proc.poll() is None:
            d.stop()


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


def delete_tree(client, sbx) -> None:
    """Delete every checkpoint tree the (destroyed or live) sandbox started."""
    roots = {c.id for c in sbx.checkpoints() if not c.parent_id}
    try:
        sbx.destroy()
    except deltabox.NotFound:
        pass
    for root in roots:
        try:
            client.delete_checkpoint(root, cascade=True)
        except deltabox.DeltaboxError:
            pass


def _fresh_sandbox(client, image: str):
    sbx = client.create(image)
    yield sbx
    try:
        sbx.destroy()
    except deltabox.NotFound:  # the test destroyed it
        pass


@pytest.fixture
def tiny(client):
    """A fresh sandbox from the tiny image (busybox), destroyed afterwards."""
    yield from _fresh_sandbox(client, "tiny")


@pytest.fixture
def demo(client):
    """A fresh sandbox from the demo image (python3, bash, git), destroyed afterwards."""
    yield from _fresh_sandbox(client, "demo")
