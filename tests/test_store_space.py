"""The store's free space: reported (Status, metrics), and kept for what already exists.

Every sandbox's upper, every checkpoint and the metadata database share one XFS store. Below
its reserve (--store-reserve) new work -- create, checkpoint, fork, import -- is refused with
RESOURCE_EXHAUSTED naming the store and its free space, while the sandboxes that exist go on;
and when the store does run full (a reserve of 0), the operation that hit ENOSPC says so,
as RESOURCE_EXHAUSTED, without a host path. The store is filled from the host side with
fallocate (instant, and nothing written to the host's disk), so this works where per-sandbox
disk quotas are not enforced.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import deltabox
from conftest import TINY_TAR

MiB = 1 << 20


def store_of(d) -> Path:
    return d.state_dir / "store"


def free_bytes(d) -> int:
    st = os.statvfs(store_of(d))
    return st.f_bavail * st.f_frsize


def fill_store(d, leave: int) -> list[Path]:
    """Allocate a file in the store's tmp dir until `leave` bytes are free (0: until
    nothing more can be allocated, blocks or inodes)."""
    path = store_of(d) / "tmp" / f"fill-{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0

    def allocate(n: int) -> bool:
        nonlocal size
        try:
            os.posix_fallocate(fd, size, n)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return False
        size += n
        return True

    try:
        allocate(max(free_bytes(d) - leave, 4096))
        if leave == 0:
            for chunk in (MiB, 64 << 10, 4096):
                while allocate(chunk):
                    pass
    finally:
        os.close(fd)
    made = [path]
    if leave == 0:  # and the inodes XFS could still allocate in existing chunks
        while True:
            extra = path.with_name(f"{path.name}-{len(made)}")
            try:
                extra.touch()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
            made.append(extra)
            if len(made) > 100_000:
                break
    return made


def unfill(paths: list[Path]) -> None:
    """Remove the fill and wait for XFS to free it (it inactivates inodes in the
    background)."""
    for p in paths:
        p.unlink(missing_ok=True)
    if paths:
        fd = os.open(paths[0].parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        subprocess.run(["sync", "-f", str(paths[0].parent)], check=True)


def assert_no_host_path(d, message: str) -> None:
    for path in (d.state_dir, d.state_dir.resolve()):
        assert str(path) not in message, message
    assert "/store/" not in message, message


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not in the metrics"
    return float(m.group(1))


@pytest.fixture
def small(new_daemon):
    """A 1 GiB store with a 256 MiB reserve."""
    d = new_daemon(store_size="1G", extra_args=("--store-reserve", "256M")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    return d


def test_status_and_metrics_report_free_space(small):
    with small.client() as c:
        st = c.status()
        fs = os.statvfs(store_of(small))
        assert st.store_size_bytes == fs.f_blocks * fs.f_frsize
        assert abs(st.store_free_bytes - fs.f_bavail * fs.f_frsize) < 16 * MiB
        assert st.store_inodes == fs.f_files > 0
        assert abs(st.store_free_inodes - fs.f_favail) < 1000 and st.store_free_inodes > 0
        assert st.store_reserve_bytes == 256 * MiB
        assert 0 < st.store_reserve_inodes == fs.f_files // 100  # the default, 1%
        assert not st.store_below_reserve
        text = c.stats().prometheus_text
        assert metric(text, "deltabox_store_size_bytes") == st.store_size_bytes
        assert abs(metric(text, "deltabox_store_free_bytes") - st.store_free_bytes) < 16 * MiB
        assert metric(text, "deltabox_store_inodes") == st.store_inodes
        assert metric(text, "deltabox_store_free_inodes") > 0
        assert metric(text, "deltabox_store_reserve_bytes") == 256 * MiB
        # the CLI shows it too
        out = small.cli("status").stdout.decode()
        assert "store inodes" in out and "store reserve" in out, out


def test_new_work_is_refused_below_the_reserve(small):
    with small.client() as c:
        s = c.create("tiny")
        s.exec("echo before > /root/f").check()
        ck = s.checkpoint()
        fill = fill_store(small, leave=100 * MiB)
        try:
            st = c.status()
            assert st.store_below_reserve and st.store_free_bytes < st.store_reserve_bytes
            refused = {
                "create": lambda: c.create("tiny"),
                "checkpoint": s.checkpoint,
                "fork": lambda: c.fork(ck, 1),
                "import": lambda: c.import_image("tiny2", TINY_TAR),
            }
            for what, call in refused.items():
                with pytest.raises(deltabox.ResourceExhausted) as exc:
                    call()
                msg = exc.value.message
                assert "the store is nearly full" in msg and "free of" in msg, (what, msg)
                assert "reserve of 256.0 MiB" in msg and "--store-reserve" in msg, msg
                assert_no_host_path(small, msg)
            assert {x.id for x in c.list()} == {s.id}, "a refused call left a sandbox"
            assert "tiny2" not in {i.name for i in c.list_images()}
            assert len(s.checkpoints()) == 1
            # what exists goes on: exec, files, rollback, deletion
            assert s.exec("cat /root/f").stdout == b"before\n"
            s.write_file("/root/g", b"small")
            s.rollback(ck)
            text = c.stats().prometheus_text
            for op in ("CreateSandbox", "Checkpoint", "Fork", "ImportImage"):
                assert metric(text, rf'deltabox_store_reserve_refusals_total{{operation="{op}"}}'
                              ) == 1, op
        finally:
            unfill(fill)
        # room again: all of it works
        deadline = time.monotonic() + 10
        while c.status().store_below_reserve and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not c.status().store_below_reserve, c.status()
        s.checkpoint()
        kid = c.fork(ck, 1)[0]
        assert kid.error is None, kid.error
        c.create("tiny").destroy()
        for x in c.list():
            x.destroy()


def test_enospc_is_resource_exhausted_without_host_paths(new_daemon):
    """No reserve: the store runs really full. The call that hits ENOSPC (in the sink, in
    SQLite, in the init's copy) is RESOURCE_EXHAUSTED naming its sandbox and the store's free
    space, not INTERNAL with a path of the store; the sandbox is left as it was."""
    d = new_daemon(store_size="1G", extra_args=("--store-reserve", "0",
                                                 "--store-reserve-inodes", "0")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        s = c.create("tiny")
        s.exec("dd if=/dev/urandom of=/root/data bs=1M count=8 2>/dev/null; "
               "mkdir /root/many; for i in $(seq 200); do echo $i > /root/many/$i; done").check()
        digest = s.exec("md5sum /root/data").stdout
        fill = fill_store(d, leave=0)
        try:
            assert c.status().store_free_bytes < MiB
            with pytest.raises(deltabox.ResourceExhausted) as exc:
                s.checkpoint()
            msg = exc.value.message
            assert "no space left in the store" in msg and s.id in msg, msg
            assert_no_host_path(d, msg)
            with pytest.raises(deltabox.ResourceExhausted) as exc:
                c.create("tiny")
            assert "no space left in the store" in exc.value.message, exc.value.message
            assert_no_host_path(d, exc.value.message)
            assert [x.id for x in c.list()] == [s.id]
        finally:
            unfill(fill)
        assert s.exec("md5sum /root/data").stdout == digest
        ck = s.checkpoint()
        s.exec("rm -rf /root/data /root/many").check()
        s.rollback(ck)
        assert s.exec("md5sum /root/data").stdout == digest
        assert s.exec("ls /root/many | wc -l").stdout.strip() == b"200"
        c.create("tiny").destroy()
        s.destroy()
    assert "rpc.internal_error" not in d.log()


@pytest.mark.parametrize("flag,value", [("--store-reserve", "lots"),
                                        ("--store-reserve", "100%"),
                                        ("--store-reserve-inodes", "1G")])
def test_bad_reserve_flags_are_refused_at_start(tmp_path, flag, value):
    res = subprocess.run([sys.executable, "-m", "deltabox.cli", "daemon",
                          "--state-dir", str(tmp_path / "state"),
                          "--socket", str(tmp_path / "s.sock"), flag, value],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "invalid" in res.stderr and value in res.stderr, res.stderr
    assert not (tmp_path / "state").exists(), "it touched the state dir first"
