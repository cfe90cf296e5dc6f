"""Per-sandbox disk limits: each branch's upper is an XFS project with hard block and inode limits
(docs/deltafs.md, "Disk limits").

Two kinds of tests:
- bookkeeping, run everywhere: the limit is in the sandbox's spec and every branch of it (create,
  standby and fresh rollback, full rollback, fork, daemon restart) is tagged with a project of its
  own, checked with the system's `xfs_io`; destroy frees the id;
- enforcement, run where the daemon reports `disk_quotas: enforced` (a kernel with
  CONFIG_XFS_QUOTA; the loop-backed store is mounted with prjquota): writes over the limit fail
  with ENOSPC, other sandboxes and the daemon go on, the limit is read back with `xfs_quota`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR
from deltabox.config import Config
from waiting import poll as wait_for

MiB = 1 << 20
LIMIT = 64 * MiB


# ---- helpers --------------------------------------------------------------------------------

def store_of(d) -> Path:
    return d.state_dir / "store"


def project_of(path: Path) -> tuple[int, bool]:
    """(project id, PROJINHERIT) of a directory, as xfs_io reports them."""
    out = subprocess.run(["xfs_io", "-r", "-c", "stat", str(path)], capture_output=True,
                         text=True, check=True).stdout
    fields = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    return int(fields["fsxattr.projid"]), "P" in fields["fsxattr.xflags"].split("[")[1]


def branch_project(d, info) -> int:
    """The project of a sandbox's branch: its dir, upper and work all carry it."""
    branch = store_of(d) / "branches" / info.branch_id
    found = {project_of(p) for p in (branch, branch / "upper", branch / "work")}
    assert len(found) == 1, found
    project, inherit = found.pop()
    assert project > 0 and inherit, (info.branch_id, project, inherit)
    return project


def projects_on_disk(d) -> dict[str, int]:
    """branch -> project id, for the branch dirs there are (the daemon retires branches in
    the background: one that goes while we look is not there)."""
    found = {}
    for p in (store_of(d) / "branches").iterdir():
        try:
            found[p.name] = project_of(p)[0]
        except subprocess.CalledProcessError:
            if p.exists():
                raise
    return found


def quota_report(d) -> dict[int, tuple[int, int, int, int]]:
    """project -> (KiB used, KiB hard limit, inodes used, inode hard limit), by xfs_quota."""
    out = {}
    for flag, at in (("-b", 0), ("-i", 2)):
        text = subprocess.run(["xfs_quota", "-x", "-c", f"report -p {flag} -n -N",
                               str(store_of(d))], capture_output=True, text=True,
                              check=True).stdout
        for line in text.splitlines():
            cols = line.split()
            if cols and cols[0].startswith("#"):
                row = list(out.get(int(cols[0][1:]), (0, 0, 0, 0)))
                row[at], row[at + 1] = int(cols[1]), int(cols[3])
                out[int(cols[0][1:])] = tuple(row)
    return out


def enforced(d) -> bool:
    with d.client() as c:
        return c.status().disk_quotas == "enforced"


def check_limit(d, info, limit: int = LIMIT) -> int:
    """The branch has a project; where quotas are enforced, its hard limits are `limit`."""
    project = branch_project(d, info)
    assert info.limits.disk_bytes == limit and info.limits.disk_inodes == limit // 1024
    if enforced(d):
        _, bhard, _, ihard = quota_report(d)[project]
        assert (bhard * 1024, ihard) == (limit, limit // 1024), (project, bhard, ihard)
    return project



@pytest.fixture
def qd(new_daemon):
    """A daemon of its own (its project ids are not shared with other tests' sandboxes)."""
    # One standby (of the head) per sandbox, so a rollback to an older checkpoint takes the
    # fresh path: both kinds of branch are checked.
    d = new_daemon(store_size="4G", extra_args=("--hot-checkpoints", "1")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    yield d
    if d.proc.poll() is None:
        with d.client() as c:
            for s in c.list():
                s.destroy()


def needs_enforcement(d) -> None:
    with d.client() as c:
        state = c.status().disk_quotas
    if state != "enforced":
        pytest.skip(f"disk quotas are {state}")


# ---- the API ----------------------------------------------------------------------------------

def test_status_says_whether_limits_are_enforced(qd):
    with qd.client() as c:
        state = c.status().disk_quotas
    opts = subprocess.run(["findmnt", "-no", "OPTIONS", str(store_of(qd))], capture_output=True,
                          text=True, check=True).stdout.strip()
    has_quota = Path("/proc/fs/xfs/xqmstat").exists()
    if has_quota:
        assert state == "enforced" and "prjquota" in opts.split(","), (state, opts)
    else:
        assert state == ("unavailable: this kernel's XFS has no quota support "
                         "(CONFIG_XFS_QUOTA)"), state
        assert "noquota" in opts.split(","), opts
    assert "disk_quotas" in qd.log()


def test_limit_is_recorded_validated_and_defaulted(qd, new_daemon):
    with qd.client() as c:
        s = c.create("tiny", disk=LIMIT)
        assert (s.info.limits.disk_bytes, s.info.limits.disk_inodes) == (LIMIT, LIMIT // 1024)
        s2 = c.create("tiny", disk=LIMIT, disk_inodes=5000)
        assert s2.info.limits.disk_inodes == 5000
        d = c.create("tiny")
        assert d.info.limits.disk_bytes == 10 << 30  # the daemon's default
        for bad in ({"disk": MiB}, {"disk": -1}, {"disk": LIMIT, "disk_inodes": 10}):
            with pytest.raises(deltabox.InvalidArgument):
                c.create("tiny", **bad)
        r = qd.cli("create", "tiny", "--disk", "100M")
        assert r.returncode == 0, r.stderr
        assert c.list()[-1].info.limits.disk_bytes == 100 * MiB
        assert "DISK" in qd.cli("ls").stdout.decode()
    # --default-disk 0: no limit unless asked for
    other = new_daemon(store_size="2G", extra_args=("--default-disk", "0")).start()
    with other.client() as c:
        c.import_image("tiny", TINY_TAR)
        s = c.create("tiny")
        assert (s.info.limits.disk_bytes, s.info.limits.disk_inodes) == (0, 0)
        branch_project(other, s.info)  # tagged all the same: usage is accounted
        s.destroy()


# ---- every branch of a sandbox -------------------------------------------------------------

def test_every_branch_gets_the_limit_rollback_fork_and_full(qd):
    with qd.client() as c:
        s = c.create("tiny", disk=LIMIT)
        p0 = check_limit(qd, s.info)
        other = c.create("tiny", disk=2 * LIMIT)
        assert check_limit(qd, other.info, 2 * LIMIT) != p0
        s.exec("echo one > /root/one").check()
        c1 = s.checkpoint()
        s.exec("echo two > /root/two").check()
        c2 = s.checkpoint()
        # the standby of c2 is a branch of the sandbox too: it gets the limit before it is used
        r = s.rollback(c2)
        check_limit(qd, r.sandbox)
        r = s.rollback(c1)  # not the standby's checkpoint
        assert r.path == "fresh"
        p1 = check_limit(qd, r.sandbox)
        assert s.exec("cat /root/one; test ! -e /root/two").stdout == b"one\n"
        kid = c.fork(c2, 1)[0]
        assert kid.error is None, kid.error
        check_limit(qd, kid.sandbox.info)
        assert c.warm(c2, 1, wait=True) == 1  # a warm child's branch is made ahead
        warm = c.fork(c2, 1)[0].sandbox
        check_limit(qd, warm.info)
        # no two live branches share a project
        live = [x.info for x in c.list()]
        assert len({branch_project(qd, i) for i in live}) == len(live)
        assert p1 in {branch_project(qd, i) for i in live}


def test_full_rollback_keeps_the_limit(client, daemon):
    s = client.create("demo", disk=LIMIT)
    try:
        s.exec("echo one > /root/one").check()
        ck = s.checkpoint(full=True)
        s.checkpoint(full=True)  # ck is no longer the head: a CRIU restore
        r = s.rollback(ck)
        # a double still being built races a restore (the first ready wins): any of the three
        assert r.path in ("restore", "double", "double-waited")
        check_limit(daemon, r.sandbox)
        assert s.exec("cat /root/one").stdout == b"one\n"
    finally:
        s.destroy()


def test_limit_survives_a_restart_and_a_crash(qd):
    with qd.client() as c:
        s = c.create("tiny", name="keep", disk=LIMIT)
        project = check_limit(qd, s.info)
    assert qd.stop() == 0
    qd.start()
    with qd.client() as c:
        s = c.get("keep")
        assert check_limit(qd, s.info) == project
    qd.kill()
    qd.start()
    with qd.client() as c:
        s = c.get("keep")
        assert check_limit(qd, s.info) == project
        # a new sandbox after the restart does not get an id that is in use
        assert check_limit(qd, c.create("tiny", disk=LIMIT).info) != project


def test_destroy_and_rollback_free_their_projects(qd):
    with qd.client() as c:
        s = c.create("tiny", disk=LIMIT)
        first = branch_project(qd, s.info)
        ck = s.checkpoint()
        for _ in range(5):
            s.rollback(ck)
        # retired branches give their ids back: the live branch and the standbys of ck hold
        # 1 + --hottest-pool (default 2: ck, rolled back to, is the hottest checkpoint)
        pool = Config().hottest_pool
        assert wait_for(lambda: len(projects_on_disk(qd)) == 1 + pool), projects_on_disk(qd)
        s.destroy()
        assert wait_for(lambda: projects_on_disk(qd) == {}), projects_on_disk(qd)
        time.sleep(0.2)  # the id is freed just after its directory is gone
        again = c.create("tiny", disk=2 * LIMIT)
        assert branch_project(qd, again.info) == first  # the smallest free id is reused
        check_limit(qd, again.info, 2 * LIMIT)  # with its own limit, not the old one
        if enforced(qd):
            report = quota_report(qd)
            assert all(row[1] == 0 and row[3] == 0 for p, row in report.items()
                       if p not in projects_on_disk(qd).values()), report


def test_a_sandbox_cannot_leave_its_project(client, daemon):
    """Root inside could set its files' project id (FS_IOC_FSSETXATTR) or clear the
    inherit flag (FS_IOC_SETFLAGS) through overlayfs; the init's seccomp filter refuses
    those two ioctls."""
    code = r"""
import fcntl, os, struct
GET, SET, SETFLAGS = 0x801C581F, 0x401C5820, 0x40086602
os.makedirs("/root/d", exist_ok=True)
open("/root/f", "w").close()
for path in ("/root/f", "/root/d"):
    fd = os.open(path, os.O_RDONLY)
    x = list(struct.unpack("=IIIII8s", fcntl.ioctl(fd, GET, bytes(28))))
    x[0] &= ~0x200; x[3] = 0
    for cmd, arg in ((SET, struct.pack("=IIIII8s", *x)), (SETFLAGS, struct.pack("=l", 0))):
        try:
            fcntl.ioctl(fd, cmd, arg)
        except OSError as e:
            print(path, hex(cmd), e.errno)
"""
    s = client.create("demo", disk=LIMIT)
    try:
        s.exec(["python3", "-c", code]).check()
        project = branch_project(daemon, s.info)
        upper = store_of(daemon) / "branches" / s.info.branch_id / "upper" / "root"
        assert project_of(upper / "f")[0] == project
        assert project_of(upper / "d") == (project, True)
    finally:
        s.destroy()


# ---- enforcement ------------------------------------------------------------------------------

def test_writes_over_the_limit_fail_others_go_on(qd):
    needs_enforcement(qd)
    with qd.client() as c:
        hog, other = c.create("tiny", disk=LIMIT), c.create("tiny", disk=LIMIT)
        size = int(hog.exec("df -k / | tail -1").stdout.split()[1])
        assert size * 1024 <= LIMIT  # df inside shows the limit, not the store
        r = hog.exec("fallocate -l 100M /root/big")
        assert r.exit_code != 0 and b"No space left" in r.stderr + r.stdout, r
        hog.exec("rm -f /root/big").check()
        r = hog.exec("dd if=/dev/zero of=/root/fill bs=1M count=100 2>&1")
        assert r.exit_code != 0 and b"No space left" in r.stdout, r
        written = int(hog.exec("stat -c %s /root/fill").stdout)
        assert 32 * MiB <= written <= LIMIT, written
        # the others and the daemon do not notice
        other.exec("dd if=/dev/urandom of=/root/work bs=1M count=16").check()
        other.checkpoint()
        c.create("tiny").destroy()
        hog.checkpoint()  # the sink writes layers outside the sandbox's project
        project = branch_project(qd, hog.info)
        used_kib = quota_report(qd)[project][0]
        assert used_kib * 1024 <= LIMIT + MiB, used_kib
        # freeing space inside lets the sandbox write again
        hog.exec("rm /root/fill; dd if=/dev/zero of=/root/again bs=1M count=8").check()


def test_inode_limit(qd):
    needs_enforcement(qd)
    with qd.client() as c:
        s = c.create("tiny", disk=LIMIT, disk_inodes=2000)
        r = s.exec("mkdir /root/many && cd /root/many && i=0; "
                   "while touch f$i 2>/dev/null; do i=$((i+1)); done; echo $i")
        assert 1000 < int(r.stdout) < 2000, r


def test_rollback_frees_the_upper_and_keeps_the_limit(qd):
    needs_enforcement(qd)
    with qd.client() as c:
        s = c.create("tiny", disk=LIMIT)
        ck = s.checkpoint()
        s.exec("dd if=/dev/zero of=/root/a bs=1M count=40").check()
        s.checkpoint()
        # the live upper keeps what was sunk: usage grows until a rollback
        assert s.exec("dd if=/dev/zero of=/root/b bs=1M count=40").exit_code != 0
        s.rollback(ck)
        s.exec("dd if=/dev/zero of=/root/c bs=1M count=40").check()
        assert s.exec("dd if=/dev/zero of=/root/d bs=1M count=40").exit_code != 0


def test_exhausting_one_sandbox_leaves_the_store_usable(new_daemon):
    """The escape battery's probe with a limit: the attacker fills its own quota only."""
    d = new_daemon(store_size="2G", extra_args=("--default-disk", "512M")).start()
    needs_enforcement(d)
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        victim, attacker = c.create("tiny"), c.create("tiny")
        attacker.exec("fallocate -l 2G /tmp/fill; i=0; while fallocate -l 1048576 /tmp/f$i "
                      "2>/dev/null; do i=$((i+1)); done", timeout=60)
        victim.exec("dd if=/dev/urandom of=/tmp/work bs=1M count=4").check()
        victim.checkpoint()
        c.create("tiny").destroy()
        free = int(c.status().store_free_bytes)
        assert free > 1 << 30, free
        for s in c.list():
            s.destroy()


def test_a_store_mounted_without_prjquota_runs_unlimited_until_a_clean_start(new_daemon):
    """A store mount left behind without prjquota (a crashed older daemon): quotas cannot be
    turned on by a remount, so they are off (and said so) until the next clean start."""
    d = new_daemon(store_size="2G").start()
    needs_enforcement(d)
    assert d.stop() == 0
    image, root = d.state_dir / "store.xfs", d.state_dir / "store"
    subprocess.run(["mount", "-o", "loop,nosuid,nodev", str(image), str(root)], check=True)
    d.start()
    with d.client() as c:
        assert c.status().disk_quotas.startswith("unavailable: "), c.status().disk_quotas
    assert "store.quota_off_until_clean_restart" in d.log()
    assert d.stop() == 0
    d.start()
    assert enforced(d)
