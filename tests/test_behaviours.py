"""Promises with no other test: the token on streaming TCP calls, partial and wide forks,
the metrics' counts, the cpu quota, and durable mode's flushes.

Each is checked on what the system did -- files written or not, processes and
cgroups in /proc and /sys, the daemon's syscalls (strace) -- not only on replies.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest

import deltabox
from conftest import TINY_TAR, sandbox_inits, store_instance
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from observing import live_init
from tcp import free_port, make_tls_files, tcp_daemon_args, token_file
from waiting import wait_for

# ---- the token on streaming calls over TCP ----------------------------------------------


def _stream_code(target: str, cert: Path, call, token: str | None) -> grpc.StatusCode:
    """Run a streaming call to its end over TLS with `token` (None: no header)."""
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    meta = [("authorization", f"Bearer {token}")] if token is not None else []
    with grpc.secure_channel(target, creds) as channel:
        try:
            for _ in call(pb_grpc.SandboxesStub(channel), meta):
                pass
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_streaming_tcp_calls_need_the_token(new_daemon, tmp_path, monkeypatch):
    """Exec (server streaming) and Shell (bidirectional) over TCP are refused without the
    token or with a wrong one -- and the command did not run: its marker file is absent."""
    key, cert = make_tls_files(tmp_path)
    port = free_port()
    monkeypatch.delenv("DELTABOX_TOKEN", raising=False)
    token = token_file(tmp_path / "token", "s3cret")
    d = new_daemon(extra_args=tcp_daemon_args("localhost", port, key, cert, token)).start()
    target = f"localhost:{port}"
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")

        def exec_call(marker):
            return lambda stub, meta: stub.Exec(pb.ExecRequest(
                sandbox=sbx.id, argv=["touch", marker]), metadata=meta, timeout=20)

        def shell_call(marker):
            def call(stub, meta):
                def inputs():
                    yield pb.ShellInput(start=pb.ShellStart(sandbox=sbx.id, argv=["sh"]))
                    yield pb.ShellInput(stdin=f"touch {marker}; exit\n".encode())
                return stub.Shell(inputs(), metadata=meta, timeout=20)
            return call

        for name, make in (("exec", exec_call), ("shell", shell_call)):
            for token in (None, "wrong"):
                marker = f"/tmp/{name}-{token}"
                code = _stream_code(target, cert, make(marker), token)
                assert code in (grpc.StatusCode.UNAUTHENTICATED,
                                grpc.StatusCode.PERMISSION_DENIED), (name, token, code)
                assert sbx.exec(["test", "-e", marker]).exit_code == 1, \
                    f"{name} ran with token {token!r}"
            # the right token: it runs (the refusals above were the token's doing)
            marker = f"/tmp/{name}-right"
            assert _stream_code(target, cert, make(marker), "s3cret") == grpc.StatusCode.OK
            assert sbx.exec(["test", "-e", marker]).exit_code == 0, name
        sbx.destroy()


# ---- fork: partial failures, and wide forks ----------------------------------------------


def _instance_state(d) -> tuple[set[int], set[str], list[str]]:
    """(inits, cgroups, branch dirs) of a daemon's store, from /proc, /sys and the disk."""
    instance = store_instance(d.state_dir)
    cgroups = {p.name for base in (Path("/sys/fs/cgroup/pids/deltabox"),
                                   Path("/sys/fs/cgroup/deltabox"))
               if (base / instance).is_dir() for p in (base / instance).iterdir() if p.is_dir()}
    branches = sorted(p.name for p in (d.state_dir / "store" / "branches").iterdir())
    return set(sandbox_inits(d.state_dir)), cgroups, branches


def test_partial_fork_failure_names_the_failed_children_and_leaves_nothing(new_daemon):
    """A fork of 4 where 2 incarnations were warmed and the checkpoint's images are then
    damaged: the 2 warm children start, the 2 cold restores fail. The reply says which
    (an error per failed child), the started ones work, and nothing of the failed ones
    -- no init, cgroup, branch or record -- is left."""
    d = new_daemon(extra_args=("--no-standby",)).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        parent = c.create("tiny")
        parent.write_file("/state", "forked")
        ckpt = parent.checkpoint("fork-me", full=True)
        assert c.warm(ckpt, 2, wait=True) == 2
        inits, cgroups, branches = _instance_state(d)
        images = d.state_dir / "store" / "images" / ckpt.id
        for img in images.glob("core-*.img"):   # a cold restore cannot read its tasks
            img.write_bytes(b"damaged")
        children = c.fork(ckpt, 4)
        started = [k.sandbox for k in children if k.error is None]
        failed = [k.error for k in children if k.error is not None]
        assert len(started) == 2 and len(failed) == 2, children
        for e in failed:
            assert isinstance(e, deltabox.DeltaboxError) and str(e), repr(e)
        for k in started:
            assert k.read_file("/state") == b"forked"
            assert k.exec(["echo", "ok"]).stdout == b"ok\n"
        # the warm incarnations became the children: no init, cgroup or branch was added
        # (once the daemon's recheck of the failed restore, in the background, is done)
        expected = (inits, cgroups, branches)
        try:
            wait_for(lambda: _instance_state(d) == expected, "the failed children to go")
        except AssertionError:
            assert _instance_state(d) == expected
        assert {s.id for s in c.list()} == {parent.id} | {k.id for k in started}
        for k in started:
            k.destroy()
        parent.destroy()
    assert d.stop() == 0


def test_fork_of_64(client, tiny, daemon):
    """64 children of one checkpoint: 64 sandboxes, each its own running init (pid
    namespace) with the parent's files and its own fork index; all destroyed after."""
    tiny.write_file("/state", "parent")
    ckpt = tiny.checkpoint("wide")
    t0 = time.monotonic()
    children = client.fork(ckpt, 64)
    took = time.monotonic() - t0
    kids = [k.sandbox for k in children if k.error is None]
    try:
        assert len(kids) == 64, [k.error for k in children if k.error][:3]
        assert len({k.id for k in kids}) == 64
        indexes = sorted(int(k.exec("echo $DELTABOX_FORK_INDEX").stdout) for k in kids)
        assert indexes == list(range(64))
        assert all(k.read_file("/state") == b"parent" for k in kids)
        inits = {live_init(daemon.state_dir, k) for k in kids}
        assert len(inits) == 64, "children share an init"
        print(f"fork of 64 (fs): {took:.1f} s")
    finally:
        for k in kids:
            k.destroy()


# ---- metrics --------------------------------------------------------------------------------

def _metrics(client) -> dict[str, float]:
    """The daemon's Prometheus text as {'name{labels}': value}."""
    out = {}
    for line in client.stats().prometheus_text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _moved(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after
            if after[k] != before.get(k, 0.0)}


def test_metrics_count_exactly_what_was_done(client, tiny):
    before = _metrics(client)
    for _ in range(3):
        tiny.exec(["true"])
    for _ in range(2):
        with pytest.raises(deltabox.NotFound):
            client.get("no-such-sandbox-4242")
    fs = [tiny.checkpoint(f"m{i}") for i in range(2)]
    # nothing happened since m0: m1 is m0 again, flagged unchanged, and is not counted as
    # a checkpoint taken (docs/deltacr.md, "Unchanged checkpoints"): only its RPC is
    assert fs[1].unchanged and fs[1].id == fs[0].id and not fs[0].unchanged
    full = tiny.checkpoint("m-full", full=True)  # a full request needs a full head: new
    assert not full.unchanged
    paths = [tiny.rollback(fs[0]).path, tiny.rollback(full).path]
    kids = client.fork(fs[1], 2)
    for k in kids:
        k.sandbox.destroy()
    moved = _moved(before, _metrics(client))
    exp = {
        'deltabox_rpc_seconds_count{code="OK",method="Exec"}': 3,
        'deltabox_rpc_seconds_count{code="NOT_FOUND",method="GetSandbox"}': 2,
        'deltabox_rpc_errors_total{code="NOT_FOUND",method="GetSandbox"}': 2,
        'deltabox_rpc_seconds_count{code="OK",method="Checkpoint"}': 3,
        'deltabox_rpc_seconds_count{code="OK",method="Rollback"}': 2,
        'deltabox_rpc_seconds_count{code="OK",method="Fork"}': 1,
        'deltabox_rpc_seconds_count{code="OK",method="DestroySandbox"}': 2,
        'deltabox_checkpoints_total{mode="fs"}': 1,  # m1 was unchanged: not taken
        'deltabox_checkpoints_total{mode="full"}': 1,
        'deltabox_checkpoint_frozen_seconds_count{mode="fs"}': 1,
        'deltabox_checkpoint_frozen_seconds_count{mode="full"}': 1,
        'deltabox_fork_children_total{start="cold"}': 2,
    }
    for p in paths:
        for key in (f'deltabox_rollbacks_total{{path="{p}"}}',
                    f'deltabox_rollback_seconds_count{{path="{p}"}}'):
            exp[key] = exp.get(key, 0) + 1
    # every count moved by exactly that, and no other (the previous Stats call is
    # counted once it has returned; sums, buckets and gauges are not counts)
    counts = {k: v for k, v in moved.items()
              if re.match(r"deltabox_\w+_(total|count)\{", k) and "Stats" not in k
              and not k.startswith("deltabox_checkpoint_image_bytes")}
    assert counts == exp
    # the image bytes counter moved by the full checkpoint's own image size
    assert moved["deltabox_checkpoint_image_bytes_total"] == full.image_bytes


# ---- the cpu quota ------------------------------------------------------------------------

def _cpu_cgroup(pid: int) -> Path:
    """The directory of the cgroup that holds the process's cpu quota (v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "cpu" in ctrls.split(","):
            base = next(p for p in Path("/sys/fs/cgroup").iterdir()
                        if "cpu" in p.name.split(","))
            return base / path.lstrip("/")
        if ctrls == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    raise AssertionError(f"no cpu cgroup for {pid}")


def _cpu_seconds(cgroup: Path) -> float:
    """CPU time used so far by the processes in a cgroup: its own accounting where the
    cgroup has it (v2 cpu.stat, a v1 cpu,cpuacct), else the sum of its processes' user
    and system times (a v1 cpu hierarchy mounted apart from cpuacct)."""
    if (cgroup / "cpuacct.usage").exists():
        return int((cgroup / "cpuacct.usage").read_text()) / 1e9
    stat = (cgroup / "cpu.stat").read_text()
    if "usage_usec" in stat:
        return int(re.search(r"usage_usec (\d+)", stat).group(1)) / 1e6
    total = 0
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])          # utime + stime, in ticks
    return total / os.sysconf("SC_CLK_TCK")


def _throttled(cgroup: Path) -> int:
    """How many periods the kernel throttled the cgroup for its quota (v1 and v2)."""
    return int(re.search(r"nr_throttled (\d+)", (cgroup / "cpu.stat").read_text()).group(1))


def test_cpus_quota_is_enforced(client, daemon):
    """Four busy loops in a sandbox with cpus=0.1 use at most about a tenth of a CPU
    between them, measured by the cgroup's usage, and the kernel throttles them for it.
    (A quota well below what four loops get even on a busy shared host: the check does
    not depend on the host's load. Without the quota they use what they are given.)"""
    with client.create("tiny", cpus=0.1) as sbx:
        cgroup = _cpu_cgroup(live_init(daemon.state_dir, sbx))
        for _ in range(4):
            sbx.exec(["sh", "-c", "while :; do :; done"], detach=True)
        time.sleep(0.3)                      # past the first period's burst
        u0, n0, t0 = _cpu_seconds(cgroup), _throttled(cgroup), time.monotonic()
        time.sleep(3)
        used = (_cpu_seconds(cgroup) - u0) / (time.monotonic() - t0)
        assert used <= 0.13, f"a 0.1-cpu sandbox used {used:.2f} cpu"
        assert used >= 0.02, f"the busy loops hardly ran ({used:.2f} cpu): not a test"
        assert _throttled(cgroup) > n0, f"never throttled at {used:.2f} cpu"


# ---- durable mode --------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the syscalls")
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "default"])
def test_durable_mode_flushes_each_checkpoint(new_daemon, tmp_path, durable):
    """With --durable a checkpoint's layer is flushed (syncfs on the store) and SQLite
    fsyncs its commit; without it, no syncfs. Seen by strace on the daemon's threads."""
    d = new_daemon(extra_args=("--durable",) if durable else ()).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        out = tmp_path / "strace.out"
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=syncfs,fsync,fdatasync",
                                   "-o", str(out), "-p", str(d.proc.pid)],
                                  stderr=subprocess.PIPE)
        try:
            # attached to every thread once a syscall of the daemon shows up
            wait_for(lambda: c.status() and out.exists(), "strace to attach")
            time.sleep(0.5)
            for i in range(3):
                sbx.write_file(f"/data-{i}", "x" * 4096)
                sbx.checkpoint(f"c{i}")
        finally:
            # strace detaches from every thread on SIGINT; under load that can take a while,
            # and a tracer that never lets go would hold the daemon: killing it detaches all.
            tracer.send_signal(signal.SIGINT)
            try:
                tracer.wait(60)
            except subprocess.TimeoutExpired:
                tracer.kill()
                tracer.wait(10)
        calls = out.read_text()
        sbx.destroy()
    syncfs = len(re.findall(r"\bsyncfs\(", calls))
    fsyncs = len(re.findall(r"\bf(?:data)?sync\(", calls))
    if durable:
        assert syncfs >= 3, f"{syncfs} syncfs for 3 checkpoints:\n{calls[-2000:]}"
        assert fsyncs >= 3, f"{fsyncs} fsync/fdatasync for 3 commits:\n{calls[-2000:]}"
    else:
        assert syncfs == 0, calls[-2000:]
