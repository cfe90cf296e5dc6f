"""Sandbox and daemon lifecycle: destroy leaves nothing, create/destroy cycles, graceful
stop and restart, crash and adoption, strays after a crash, an init killed from the host,
start-ups that fail (no reflink, plaintext TCP, foreign schema, half-removed cgroups) and
daemons side by side.

Extra daemons come from `new_daemon()` (each on its own loop-backed XFS store); a test that
kills one restarts it in teardown if the kernel still holds anything of it.
"""

from __future__ import annotations

import os
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR, leftovers, sandbox_cgroups, sandbox_inits
from deltabox.host.cgroups import CgroupV1
from waiting import poll as wait_for

NOTHING = {"mounts": [], "loops": [], "inits": []}
CLEAN = {**NOTHING, "sandbox_inits": []}
# A process that outlives the exec that started it, in its own session (waiting until setsid
# has happened, so it is a session leader by the time the exec returns).
BACKGROUND = ("setsid sleep 1000 >/dev/null 2>&1 </dev/null & p=$!; "
              "while [ \"$(cut -d' ' -f6 /proc/$p/stat)\" != \"$p\" ]; do sleep 0.01; done")
CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1 << 20


# ---- helpers -------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...), None if it does not exist."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def gone(pid: int, timeout: float = 3.0) -> bool:
    """No such process any more -- not even a zombie."""
    return wait_for(lambda: proc_state(pid) is None, timeout)


def dead(pid: int, timeout: float = 3.0) -> bool:
    """Not running (gone, or a zombie whose parent is not ours to judge)."""
    return wait_for(lambda: proc_state(pid) in (None, "Z"), timeout)


def mounts_at(path: Path) -> list[str]:
    p = str(path)
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if t == p or t.startswith(p + "/")]


def all_leftovers(state_dir: Path) -> dict:
    return {**leftovers(state_dir), "sandbox_inits": sandbox_inits(state_dir)}


def settled_leftovers(state_dir: Path, timeout: float = 3.0) -> dict:
    """all_leftovers(), allowing the kernel a moment to detach an autoclear loop device (it
    goes a few ms after the store's umount2, which can be after the daemon exited)."""
    wait_for(lambda: all_leftovers(state_dir) == CLEAN, timeout)
    return all_leftovers(state_dir)


def instance_of(d) -> str:
    """The daemon's cgroup instance (sandbox cgroups live in deltabox/<instance>/<id>)."""
    db = sqlite3.connect(f"file:{d.state_dir / 'store' / 'meta.db'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT value FROM meta WHERE key='instance_id'").fetchone()[0]
    finally:
        db.close()


def cgroup_parents(instance: str) -> list[Path]:
    """A daemon's parent cgroups: one per v1 controller, or the v2 one."""
    v1 = [CGROUP_ROOT / c / "deltabox" for c in CgroupV1.CONTROLLERS]
    if all(p.parent.is_dir() for p in v1) and not (CGROUP_ROOT / "cgroup.controllers").exists():
        return [p / instance for p in v1]
    return [CGROUP_ROOT / "deltabox" / instance]


def cgroup_dirs(instance: str, name: str) -> list[Path]:
    return [p / name for p in cgroup_parents(instance)]


def cgroup_procs(instance: str, name: str) -> list[int]:
    d = cgroup_dirs(instance, name)[-1]  # freezer (v1) or the only one (v2)
    try:
        return [int(x) for x in (d / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def cgroup_of(info) -> str | None:
    """The name of a sandbox's cgroup (after its id or its current branch), if it has one."""
    names = sandbox_cgroups()
    return next((n for n in (info.branch_id, info.id) if n in names), None)


def no_cgroup(*infos) -> bool:
    names = sandbox_cgroups()
    return not any({i.id, i.branch_id} & names for i in infos)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@pytest.fixture
def fresh(new_daemon):
    """Start a new daemon with the tiny image; at teardown clean up after crashes."""
    made = []

    def make():
        d = new_daemon().start()
        made.append(d)
        with d.client() as c:
            c.import_image("tiny", TINY_TAR)
        return d
    yield make
    for d in made:
        try:
            alive = d.proc.poll() is None
            if not alive and all_leftovers(d.state_dir) == CLEAN:
                continue
            if not alive:  # killed and left sandboxes running: reconcile, then clean
                d.start()
            with d.client() as c:
                for s in c.list():
                    s.destroy()
            d.stop()
        except Exception as e:  # never hide the test's own failure
            print(f"teardown of {d.state_dir} failed: {e}\n{d.log()}")


# ---- one sandbox ---------------------------------------------------------------------------

def test_destroy_leaves_nothing(client, daemon):
    sbx = client.create("tiny")
    info = sbx.info
    mnt = daemon.state_dir / "store" / "mnt" / info.branch_id
    branch = daemon.state_dir / "store" / "branches" / info.branch_id
    assert info.state == deltabox.SandboxState.RUNNING and info.init_pid > 0
    assert mounts_at(mnt) and branch.is_dir()
    cg = cgroup_of(info)
    assert cg
    sbx.exec(BACKGROUND).check()
    inst = instance_of(daemon)
    procs = wait_for(lambda: len(cgroup_procs(inst, cg)) >= 2 and cgroup_procs(inst, cg))
    assert info.init_pid in procs and len(procs) >= 2, procs

    sbx.destroy()
    assert mounts_at(mnt) == [] and not mnt.exists() and not branch.exists()
    assert no_cgroup(info)
    assert all(not d.exists() for d in cgroup_dirs(inst, cg))
    for pid in procs:
        assert gone(pid), f"pid {pid} ({proc_state(pid)}) outlived destroy"
    with pytest.raises(deltabox.NotFound, match=sbx.id):
        client.get(sbx.id)
    with pytest.raises(deltabox.NotFound, match=sbx.id):
        sbx.exec(["true"])
    with pytest.raises(deltabox.NotFound, match=sbx.id):
        sbx.destroy()
    assert sbx.id not in {s.id for s in client.list()}


def test_create_destroy_cycles(client, daemon, capsys):
    store = daemon.state_dir / "store"
    branches_before = set(os.listdir(store / "branches"))
    mnt_before = set(os.listdir(store / "mnt"))
    times = {"create": [], "exec": [], "destroy": []}
    seen = []
    for i in range(20):
        t0 = time.perf_counter()
        sbx = client.create("tiny")
        t1 = time.perf_counter()
        r = sbx.exec(["echo", str(i)])
        t2 = time.perf_counter()
        sbx.destroy()
        t3 = time.perf_counter()
        assert r.stdout == f"{i}\n".encode()
        times["create"].append(t1 - t0)
        times["exec"].append(t2 - t1)
        times["destroy"].append(t3 - t2)
        seen.append(sbx.info)
    with capsys.disabled():
        print("\n  lifecycle latency over 20 cycles (ms):")
        for op, v in times.items():
            print(f"    {op:8s} p50 {1000 * statistics.median(v):7.1f}  "
                  f"p95 {1000 * pct(v, 95):7.1f}  max {1000 * max(v):7.1f}")
    assert set(os.listdir(store / "branches")) == branches_before
    assert set(os.listdir(store / "mnt")) == mnt_before
    assert not mounts_at(store / "mnt") or all(
        Path(m).name in mnt_before for m in mounts_at(store / "mnt") if m != str(store / "mnt"))
    assert no_cgroup(*seen)
    assert [i.init_pid for i in seen if not gone(i.init_pid, 1)] == []
    assert not {i.id for i in seen} & {s.id for s in client.list()}


def test_init_killed_from_host_becomes_stopped(client, daemon):
    sbx = client.create("tiny")
    try:
        sbx.write_file("/root/kept", b"still here")
        pid = sbx.info.init_pid
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: sbx.refresh().info.state == deltabox.SandboxState.STOPPED, 5), \
            sbx.info
        assert sbx.info.init_pid == 0
        assert gone(pid), f"the dead init stays as {proc_state(pid)}"
        with pytest.raises(deltabox.FailedPrecondition, match="stopped"):
            sbx.exec(["true"])
        with pytest.raises(deltabox.FailedPrecondition, match="stopped"):
            sbx.open_session("sh")
        # files are kept and readable while stopped
        assert sbx.read_file("/root/kept") == b"still here"
    finally:
        sbx.destroy()
    mnt = daemon.state_dir / "store" / "mnt" / sbx.info.branch_id
    assert mounts_at(mnt) == [] and not mnt.exists()
    assert no_cgroup(sbx.info)
    with pytest.raises(deltabox.NotFound):
        client.get(sbx.id)


# ---- daemon restarts -----------------------------------------------------------------------

def test_graceful_stop_then_restart(fresh):
    d = fresh()
    with d.client() as c:
        a = c.create("tiny", name="keep-a", env={"K": "v"}, memory=64 * MiB, pids=100)
        b = c.create("tiny", name="keep-b")
        a.exec("echo before > /root/note && mkdir -p /srv/x && echo deep > /srv/x/y").check()
        a.write_file("/root/data.bin", bytes(range(256)) * 1000, mode=0o600)
        a.exec("rm /etc/hostname").check()  # a deletion of an image file persists too
        a.open_session("sh", name="old").run("X=1")
        old = {s.id: s.info.init_pid for s in (a, b)}
        infos = [a.info, b.info]
    assert d.stop() == 0, d.log()
    assert settled_leftovers(d.state_dir) == CLEAN
    assert no_cgroup(*infos)
    for pid in old.values():
        assert gone(pid)

    d.start()
    with d.client() as c:
        listed = {s.id: s.info for s in c.list()}
        assert set(listed) == set(old)
        for sid, info in listed.items():
            assert info.state == deltabox.SandboxState.RUNNING
            assert info.init_pid not in (0, old[sid]) and proc_state(info.init_pid) not in \
                (None, "Z")
        a = c.get("keep-a")
        assert a.exec("cat /root/note /srv/x/y; echo $K").stdout == b"before\ndeep\nv\n"
        assert a.read_file("/root/data.bin") == bytes(range(256)) * 1000
        assert a.stat("/root/data.bin").mode == 0o600
        assert a.exec("test -e /etc/hostname").exit_code == 1
        assert a.info.limits.memory_bytes == 64 * MiB and a.info.limits.pids == 100
        assert cgroup_of(a.info)
        assert a.list_sessions() == []  # processes are fresh
        assert a.open_session("sh").run("echo new").stdout == b"new\n"
        assert c.get("keep-b").exec(["hostname"]).stdout == b"keep-b\n"
    assert d.stop() == 0, d.log()
    assert settled_leftovers(d.state_dir) == CLEAN
    assert no_cgroup(*infos)


def test_graceful_stop_with_a_stopped_sandbox(fresh):
    """A sandbox whose init died is STOPPED but still mounted: a graceful stop must still
    leave nothing behind, and the restarted daemon must still know the sandbox."""
    d = fresh()
    with d.client() as c:
        s = c.create("tiny", name="dies")
        s.write_file("/root/f", b"kept")
        os.kill(s.info.init_pid, signal.SIGKILL)
        assert wait_for(lambda: c.get(s.id).info.state == deltabox.SandboxState.STOPPED, 5)
    assert d.stop() == 0, d.log()
    assert settled_leftovers(d.state_dir) == CLEAN
    assert no_cgroup(s.info)
    d.start()
    with d.client() as c:
        s = c.get("dies")
        assert s.info.state in (deltabox.SandboxState.STOPPED, deltabox.SandboxState.RUNNING)
        s.destroy()
        assert c.list() == []
    assert d.stop() == 0
    assert settled_leftovers(d.state_dir) == CLEAN


def test_crash_keeps_sandboxes_running_and_restart_adopts_them(fresh):
    d = fresh()
    with d.client() as c:
        s = c.create("tiny", name="survivor")
        s.open_session("sh", name="keepme").run("X=42; cd /tmp")
        s.exec(BACKGROUND).check()
        pid, branch = s.info.init_pid, s.info.branch_id
        inst = instance_of(d)
        cg = cgroup_of(s.info)
        sleeper = wait_for(lambda: [p for p in cgroup_procs(inst, cg) if p != pid])
        assert sleeper
    d.kill()
    # the crash leaves the sandbox as it was
    assert proc_state(pid) not in (None, "Z") and pid in sandbox_inits(d.state_dir)
    assert mounts_at(d.state_dir / "store" / "mnt" / branch)
    assert cgroup_of(s.info) == cg and set(sleeper) <= set(cgroup_procs(inst, cg))

    d.start()
    assert '"adopted": 1' in d.log() or "adopted=1" in d.log(), d.log()
    with d.client() as c:
        s = c.get("survivor")
        assert s.info.state == deltabox.SandboxState.RUNNING and s.info.init_pid == pid
        assert [x.name for x in s.list_sessions()] == ["keepme"]
        r = s.session("keepme").run("echo $X; pwd")
        assert (r.exit_code, r.stdout) == (0, b"42\n/tmp\n")
        assert set(sleeper) <= set(cgroup_procs(inst, cg)), \
            "adoption restarted the processes"
        assert s.exec("echo adopted").stdout == b"adopted\n"
    assert d.stop() == 0, d.log()
    assert settled_leftovers(d.state_dir) == CLEAN
    assert no_cgroup(s.info)
    for p in [pid, *sleeper]:
        assert dead(p), f"{p} survived the stop"


def test_crash_strays_are_removed_on_restart(fresh):
    d = fresh()
    store = d.state_dir / "store"
    with d.client() as c:
        legit = c.create("tiny", name="legit")
        legit.write_file("/root/f", b"legit")
    d.kill()
    inst = instance_of(d)

    tag = secrets.token_hex(6)
    stray_cg = f"sbx-{tag}"
    stray_mnt = store / "mnt" / f"br-{tag}"
    stray_layer = store / "layers" / f"l-{tag}"
    stray_branch = store / "branches" / f"br-{tag}"
    stray_tmp = store / "tmp" / f"new-{tag}"
    sleeper = None
    try:
        for cg in cgroup_dirs(inst, stray_cg):
            cg.mkdir()
        # a process left in the stray cgroup (e.g. of a sandbox whose record was lost)
        sleeper = subprocess.Popen(["sleep", "1000"])
        for cg in cgroup_dirs(inst, stray_cg):
            (cg / "cgroup.procs").write_text(str(sleeper.pid))
        stray_mnt.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stray", str(stray_mnt)],
                       check=True)
        (stray_mnt / "file").write_text("x")
        for p in (stray_layer, stray_branch / "upper", stray_branch / "work", stray_tmp):
            p.mkdir(parents=True)
        (stray_layer / "f").write_text("layer")
        (stray_tmp / "f").write_text("tmp")

        d.start()
        assert all(not cg.exists() for cg in cgroup_dirs(inst, stray_cg)), "stray cgroup kept"
        assert sleeper.wait(5) == -signal.SIGKILL
        assert mounts_at(stray_mnt) == [] and not stray_mnt.exists()
        assert not stray_layer.exists() and not stray_branch.exists()
        assert not stray_tmp.exists()
        with d.client() as c:
            legit = c.get("legit")
            assert legit.info.state == deltabox.SandboxState.RUNNING
            assert legit.read_file("/root/f") == b"legit"
            assert legit.exec("echo ok").stdout == b"ok\n"
            assert [s.name for s in c.list()] == ["legit"]
            assert [i.name for i in c.list_images()] == ["tiny"]
        assert d.stop() == 0, d.log()
        assert settled_leftovers(d.state_dir) == CLEAN
    finally:  # never leave our strays to other daemons on this host
        if sleeper and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        if mounts_at(stray_mnt):
            subprocess.run(["umount", "-l", str(stray_mnt)])
        for cg in cgroup_dirs(inst, stray_cg):
            if cg.exists():
                wait_for(lambda: not (cg / "cgroup.procs").read_text().strip(), 2)
                cg.rmdir()


def test_partial_stray_cgroup_does_not_stop_startup(fresh):
    """A sandbox cgroup left in some v1 controllers only (a clean-up that failed half way)
    must not keep the daemon from starting: it is a stray like any other."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        pytest.skip("v1 controllers only")
    d = fresh()
    inst = instance_of(d)
    assert d.stop() == 0
    stray = [CGROUP_ROOT / c / "deltabox" / inst / f"sbx-{secrets.token_hex(6)}"
             for c in ("pids", "cpu")]
    try:
        for cg in stray:
            cg.mkdir(parents=True)
        d.start(timeout=20)
        assert not any(cg.exists() for cg in stray)
        with d.client() as c:
            with c.create("tiny") as sbx:
                assert sbx.exec("echo ok").stdout == b"ok\n"
    finally:
        for cg in stray:
            if cg.exists():
                cg.rmdir()
        if d.proc.poll() is not None:  # the parents we made, if no daemon owns them
            for parent in cgroup_parents(inst):
                try:
                    parent.rmdir()
                except OSError:
                    pass


def _set_schema_version(d, version: int) -> None:
    """Edit a stopped daemon's database (its store image mounted for the moment)."""
    store = d.state_dir / "store"
    if not mounts_at(store):
        subprocess.run(["mount", "-o", "loop", str(d.state_dir / "store.xfs"), str(store)],
                       check=True)
    try:
        db = sqlite3.connect(store / "meta.db")
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
        db.commit()
        db.close()
    finally:
        subprocess.run(["umount", str(store)], check=True)


@pytest.mark.parametrize("cause", ["tcp-without-tls", "schema-mismatch"])
def test_failed_start_leaves_nothing_behind(fresh, cause):
    """A daemon that refuses to start (here: plaintext TCP asked for; a database of another
    schema version) says why and leaves no mount, loop device, cgroup or sandbox process."""
    d = fresh()
    with d.client() as c:
        info = c.create("tiny", name="waits").info
    assert d.stop() == 0
    args = []
    if cause == "tcp-without-tls":
        args, why = ["--tcp", "127.0.0.1:0"], "TLS"
    else:
        _set_schema_version(d, 99)
        why = "schema version"
    try:
        res = subprocess.run(
            [sys.executable, "-m", "deltabox.cli", "daemon", "--state-dir", str(d.state_dir),
             "--socket", str(d.socket), "--store-size", d.store_size, *args],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode != 0
        assert why.lower() in (res.stderr + res.stdout).lower(), res.stderr[-3000:]
        assert settled_leftovers(d.state_dir) == CLEAN, res.stderr[-3000:]
        assert no_cgroup(info)
    finally:
        if cause == "schema-mismatch":
            _set_schema_version(d, 1)
    d.start()  # and the next, correct start recovers the sandbox
    with d.client() as c:
        assert c.get("waits").exec("echo back").stdout == b"back\n"


def test_starting_a_daemon_leaves_other_daemons_sandboxes_alone(fresh, daemon, tiny):
    """Daemons with different state dirs share the host's cgroup tree; one daemon's
    start-up must not take another daemon's sandboxes for strays."""
    tiny.write_file("/root/mine", b"1")
    before = tiny.info.init_pid
    other = fresh()
    assert instance_of(other) != instance_of(daemon)
    assert proc_state(before) not in (None, "Z"), "the other daemon killed our sandbox"
    assert cgroup_of(tiny.info)
    assert tiny.exec(["cat", "/root/mine"]).stdout == b"1"


def test_state_dir_without_reflink_is_refused(new_daemon, workdir):
    img = workdir / f"noreflink-{secrets.token_hex(3)}.xfs"
    state = workdir / f"noreflink-{secrets.token_hex(3)}"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    res = subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=0", str(img)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mkfs.xfs -m reflink=0 failed: {res.stderr}")
    state.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(state)], check=True)
    try:
        d = new_daemon()
        d.state_dir = state
        d.socket = state / "deltabox.sock"
        with pytest.raises(RuntimeError, match="daemon exited") as exc:
            d.start(timeout=20)
        assert d.proc.returncode != 0
        assert "reflink" in str(exc.value), exc.value
        assert not d.socket.exists()
    finally:
        subprocess.run(["umount", str(state)], check=True)
        img.unlink()


def test_a_sandbox_that_cannot_relaunch_is_stopped_and_the_daemon_starts(fresh):
    """A restart relaunches sandboxes whose init is gone; one that cannot be launched
    (here its branch's work dir is gone, so its overlay cannot mount) is marked
    stopped with its files kept, and neither the daemon nor the others stay down."""
    d = fresh()
    with d.client() as c:
        broken, fine = c.create("tiny", name="broken"), c.create("tiny", name="fine")
        fine.exec("echo kept > /root/state").check()
        pids = [broken.info.init_pid, fine.info.init_pid]
        work = d.state_dir / "store" / "branches" / broken.info.branch_id / "work"
    d.kill()
    for pid in pids:  # the inits die with the host's reboot, say
        os.kill(pid, signal.SIGKILL)
    assert all(dead(p) for p in pids)
    subprocess.run(["umount", "-l", str(d.state_dir / "store" / "mnt" / broken.info.branch_id)],
                   check=True)
    work.rename(work.with_name("work.gone"))
    d.start()
    assert '"failed": 1' in d.log() or "failed=1" in d.log(), d.log()
    with d.client() as c:
        assert c.get("broken").info.state == deltabox.SandboxState.STOPPED
        assert c.get("fine").exec("cat /root/state").stdout == b"kept\n"
        c.get("broken").destroy()
    assert d.stop() == 0, d.log()
    assert settled_leftovers(d.state_dir) == CLEAN
