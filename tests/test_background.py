"""What an exec leaves running, and detached execs (`exec(..., detach=True)`).

The rules (docs/init-protocol.md, "The end of a process conversation"): as with `docker exec`,
what a command starts in the background -- `cmd &`, `nohup`, `setsid` -- keeps running when the
command exits, as a child of the sandbox's init, and is part of its full checkpoints; the exec
still returns as soon as the command has exited (within ~100 ms, even when a background process
holds its stdout). A timeout or a cancelled call kills the command's process group. A detached
exec returns a handle at once; its output (the newest 1 MiB of each stream), status and signals
go through that handle, across client and daemon restarts and full checkpoints.
"""

from __future__ import annotations

import signal
import time

import pytest

import deltabox
from conftest import TINY_TAR
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from test_deltacr import double_settled, full_checkpoint, rollback
from waiting import wait_for

# Fetch a URL from inside the sandbox, waiting up to 10 s for the server to listen; print
# the body `n` times (one request each: every request makes the server log to stderr).
FETCH = """
import sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
deadline = time.time() + 10
while True:
    try:
        body = urllib.request.urlopen(url, timeout=2).read(); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.05)
for _ in range(n - 1):
    body += urllib.request.urlopen(url, timeout=2).read()
sys.stdout.buffer.write(body)
"""



def stat(sbx, pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state, ppid, pgid, sid, ...)."""
    r = sbx.exec(["cat", f"/proc/{pid}/stat"])
    return r.stdout.decode().rsplit(")", 1)[1].split() if r.exit_code == 0 else None


def running(sbx, pid: int) -> bool:
    fields = stat(sbx, pid)
    return fields is not None and fields[0] != "Z"


def started_in_background(sbx, cmd: str) -> int:
    """Run `cmd & echo $!` as an exec; check it returned promptly; the background pid."""
    t0 = time.monotonic()
    r = sbx.exec(f"{cmd} & echo $!")
    assert r.exit_code == 0, r
    assert time.monotonic() - t0 < 3, "the exec waited for its background job"
    return int(r.stdout.split()[0])


def serve(sbx, port: int) -> int:
    """A real `python3 -m http.server` started in the background of an exec."""
    sbx.write_file("/tmp/www/hello.txt", "served\n", make_parents=True)
    return started_in_background(
        sbx, f"python3 -m http.server {port} --bind 127.0.0.1 --directory /tmp/www")


def fetch(sbx, port: int, n: int = 1) -> bytes:
    return sbx.exec(["python3", "-c", FETCH, f"http://127.0.0.1:{port}/hello.txt", str(n)],
                    timeout=30).check().stdout


# ---- what an exec leaves running ------------------------------------------------------------

def test_background_job_keeps_running_after_its_exec(tiny):
    pid = started_in_background(tiny, "sleep 1000")
    time.sleep(0.5)  # the exec's end is long past
    fields = stat(tiny, pid)
    assert fields is not None and fields[0] != "Z", "the background sleep died with its exec"
    assert fields[1] == "1", "it is re-parented to the sandbox's init"
    # it belongs to the sandbox: a later exec kills it, and init reaps it
    tiny.exec(f"kill {pid}").check()
    wait_for(lambda: stat(tiny, pid) is None, "the killed sleep to be reaped")


def test_nohup_job_keeps_running(demo):
    pid = started_in_background(demo, "nohup sleep 1001")
    time.sleep(0.5)
    assert running(demo, pid)


def test_setsid_job_that_writes_keeps_running(tiny):
    """In its own session it escaped the group kill, but then died of SIGPIPE on its first
    write after the exec: init now drains the pipes it inherited."""
    pid = started_in_background(tiny, "setsid sh -c 'while :; do echo tick; echo tock >&2; "
                                      "sleep 0.02; done'")
    time.sleep(1.0)
    assert running(tiny, pid), "the setsid writer died"
    fields = stat(tiny, pid)
    assert fields[3] == str(pid), "it is a session leader"


def test_background_http_server_answers_later_execs(demo):
    serve(demo, 8123)
    # several requests: each one makes the server write a log line on its stderr, the
    # pipe of the exec that started it, which ended long ago
    assert fetch(demo, 8123, n=5) == b"served\n" * 5
    time.sleep(0.3)
    assert fetch(demo, 8123) == b"served\n"


def test_timeout_still_kills_the_process_group(tiny):
    r = tiny.exec("sleep 1000 & echo $!; sleep 1000", timeout=0.5)
    assert r.timed_out and r.signal == 9
    pid = int(r.stdout)
    wait_for(lambda: stat(tiny, pid) is None, "the background sleep to die with the timeout")


def test_cancelled_exec_kills_its_process_group(client, tiny):
    call = client._stubs["sandboxes"].Exec(pb.ExecRequest(
        sandbox=tiny.id, shell="sleep 1000 & echo $!; sleep 1000"))
    pid = None
    for ev in call:
        if ev.WhichOneof("event") == "stdout":
            pid = int(ev.stdout)
            break
    call.cancel()
    wait_for(lambda: stat(tiny, pid) is None, "the background sleep to die with the call")


# ---- detached execs -------------------------------------------------------------------------

def test_detached_exec_logs_signal_wait(tiny):
    t0 = time.monotonic()
    p = tiny.exec("echo hello; echo oops >&2; trap 'echo got TERM; exit 7' TERM; "
                  "while :; do sleep 0.05; done", detach=True)
    assert time.monotonic() - t0 < 3 and p.id and p.pid > 1
    assert isinstance(p, deltabox.Process)
    out = wait_for(lambda: (lambda o: o if o.stdout and o.stderr else None)(p.logs()),
                   "the first output")
    assert (out.stdout, out.stderr, out.running) == (b"hello\n", b"oops\n", True)
    (listed,) = tiny.processes()
    assert (listed.id, listed.pid, listed.running) == (p.id, p.pid, True)
    assert listed.command.startswith("/bin/sh -c echo hello")
    assert tiny.list_sessions() == []  # a detached exec is not a session
    assert p.signal(signal.SIGTERM).running
    info = p.wait(timeout=10)
    assert (info.running, info.exit_code, info.signal) == (False, 7, 0)
    out = p.logs()
    assert (out.stdout, out.exit_code, out.stdout_truncated) == (b"hello\ngot TERM\n", 7, False)
    assert not tiny.process(p.id).info.running
    with pytest.raises(deltabox.FailedPrecondition, match="ended"):
        p.signal()


def test_detached_wait_timeout_kill_and_exit_codes(tiny):
    p = tiny.exec(["sleep", "1000"], detach=True)
    with pytest.raises(deltabox.DeadlineExceeded):
        p.wait(timeout=0.3)
    p.kill()
    info = p.wait(timeout=10)
    assert (info.exit_code, info.signal) == (-1, 9)
    assert tiny.exec("sleep 0.2; exit 3", detach=True).wait(timeout=10).exit_code == 3
    with pytest.raises(deltabox.NotFound):
        tiny.process("p-nosuch")
    with pytest.raises(deltabox.NotFound):
        tiny.exec(["/bin/nosuch"], detach=True)
    with pytest.raises(deltabox.InvalidArgument):
        tiny.exec("true", detach=True, timeout=5)


def test_detached_exec_stdin_follow_and_bounded_output(tiny):
    p = tiny.exec(["sh", "-c", "cat; for i in 1 2 3; do echo $i; sleep 0.1; done"],
                  detach=True, stdin=b"in\n", env={"X": "y"}, cwd="/tmp")
    out = p.logs(follow=True)
    assert (out.stdout, out.exit_code) == (b"in\n1\n2\n3\n", 0)
    assert tiny.exec("echo $X; pwd", detach=True, env={"X": "y"}, cwd="/tmp").logs(
        follow=True).stdout == b"y\n/tmp\n"
    big = tiny.exec("head -c 3000000 /dev/zero | tr '\\0' a; echo END", detach=True)
    info = big.wait(timeout=30)
    assert info.stdout_bytes == 3_000_004
    out = big.logs()
    assert len(out.stdout) == 1 << 20 and out.stdout.endswith(b"aEND\n")
    assert out.stdout_truncated and not out.stderr_truncated


def test_detached_process_survives_a_daemon_crash(new_daemon):
    d = new_daemon().start()
    try:
        with d.client() as c:
            c.import_image("tiny", TINY_TAR)
            sbx = c.create("tiny")
            p = sbx.exec("echo before; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
                         "echo after; exit 5", detach=True)
            wait_for(lambda: p.logs().stdout, "its first output")
        d.kill()
        d.start()
        with d.client() as c:
            sbx = c.get(sbx.id)
            again = sbx.process(p.id)
            assert (again.pid, again.info.running) == (p.pid, True)
            sbx.write_file("/tmp/go", "")
            assert again.wait(timeout=10).exit_code == 5
            assert again.logs().stdout == b"before\nafter\n"
            sbx.destroy()
    finally:
        d.stop()


def test_full_checkpoint_keeps_background_and_detached_processes(daemon, demo):
    """Neither blocks the checkpoint (no call is in flight); both come back with a rollback."""
    server = serve(demo, 8124)
    assert fetch(demo, 8124) == b"served\n"
    ticker = demo.exec(["python3", "-u", "-c", "import itertools, time\n"
                        "for i in itertools.count():\n print(i); time.sleep(0.05)"],
                       detach=True)
    wait_for(lambda: ticker.logs().stdout, "the ticker's output")
    ckpt, before = full_checkpoint(daemon, demo, "background")
    demo.exec(f"kill {server}").check()
    wait_for(lambda: not running(demo, server), "the server to stop")
    ticker.kill()
    assert ticker.wait(timeout=10).signal == 9

    rollback(demo, ckpt, "double", daemon.state_dir, before)
    assert running(demo, server)
    assert fetch(demo, 8124, n=3) == b"served\n" * 3
    restored = demo.process(ticker.id)
    assert restored.info.running and restored.pid == ticker.pid
    n = len(restored.logs().stdout)
    wait_for(lambda: len(restored.logs().stdout) > n, "the restored ticker to tick")
    restored.kill()
    restored.wait(timeout=10)
    double_settled(daemon.state_dir)


# ---- the async client and the CLI -----------------------------------------------------------

async def test_async_detached_exec(daemon):
    async with deltabox.AsyncClient(daemon.socket) as c:
        async with await c.create("tiny") as sbx:
            p = await sbx.exec("echo async; exit 2", detach=True)
            assert isinstance(p, deltabox.AsyncProcess)
            assert (await p.wait(timeout=10)).exit_code == 2
            assert (await p.logs()).stdout == b"async\n"
            assert [x.id for x in await sbx.processes()] == [p.id]
            q = await sbx.exec(["sleep", "1000"], detach=True)
            await q.kill()
            assert (await q.wait(timeout=10)).signal == 9
            assert (await (await sbx.process(q.id)).refresh()).signal == 9


def test_cli_detach_ps_logs_kill_wait(daemon, tiny):
    r = daemon.cli("exec", "--detach", tiny.id, "--", "sh", "-c", "echo hi; sleep 0.3; exit 4")
    assert r.returncode == 0, r.stderr
    pid = r.stdout.decode().strip()
    r = daemon.cli("wait", tiny.id, pid)
    assert r.returncode == 4 and b"exited 4" in r.stdout, r
    assert daemon.cli("logs", tiny.id, pid).stdout == b"hi\n"
    r = daemon.cli("exec", "-d", tiny.id, "--", "sleep", "1000")
    sleeper = r.stdout.decode().strip()
    r = daemon.cli("ps", tiny.id)
    assert r.returncode == 0 and pid in r.stdout.decode() and sleeper in r.stdout.decode()
    assert daemon.cli("kill", "-s", "KILL", tiny.id, sleeper).returncode == 0
    assert daemon.cli("wait", "--timeout", "10", tiny.id, sleeper).returncode == 128 + 9
    r = daemon.cli("--json", "logs", tiny.id, pid)
    assert b'"exit_code": 4' in r.stdout, r
