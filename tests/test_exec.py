"""Exec: argv and shell commands, exit codes, streams, stdin, env, cwd, timeouts, big outputs."""

from __future__ import annotations

import time

import pytest

import deltabox


def test_echo_and_exit_code(tiny):
    r = tiny.exec(["echo", "hi"])
    assert (r.exit_code, r.stdout, r.stderr) == (0, b"hi\n", b"")
    assert tiny.exec(["sh", "-c", "exit 7"]).exit_code == 7


def test_shell_string_and_separate_streams(tiny):
    r = tiny.exec("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")


def test_signal_exit_reported(tiny):
    r = tiny.exec("kill -TERM $$")
    assert (r.exit_code, r.signal) == (-1, 15)


def test_stdin_env_cwd(tiny):
    r = tiny.exec(["cat"], stdin=b"x" * 3_000_000)
    assert r.stdout == b"x" * 3_000_000
    r = tiny.exec("echo $FOO; pwd", env={"FOO": "bar baz"}, cwd="/etc")
    assert r.stdout == b"bar baz\n/etc\n"


def test_sandbox_env_is_default(client):
    with client.create("tiny", env={"GREETING": "hello"}) as sbx:
        assert sbx.exec("echo $GREETING").stdout == b"hello\n"
        assert sbx.exec("echo $GREETING", env={"GREETING": "hi"}).stdout == b"hi\n"


def test_missing_executable_and_cwd(tiny):
    with pytest.raises(deltabox.NotFound, match="nosuch"):
        tiny.exec(["/bin/nosuch"])
    with pytest.raises(deltabox.NotFound):
        tiny.exec(["true"], cwd="/does/not/exist")


def test_timeout_kills_process_group(tiny):
    start = time.monotonic()
    r = tiny.exec("sleep 30 & sleep 30; echo never", timeout=0.5)
    assert r.timed_out and r.signal == 9
    assert time.monotonic() - start < 10
    # the background sleep was in the same process group: nothing is left
    ps = tiny.exec("ps -o pid,comm | grep -c sleep || true").stdout.strip()
    assert ps == b"0"


def test_big_output_streams_intact(tiny):
    r = tiny.exec("head -c 50000000 /dev/zero | tr '\\0' 'a'", max_output=60_000_000)
    assert len(r.stdout) == 50_000_000 and not r.stdout_truncated
    assert r.stdout.count(b"a") == 50_000_000


def test_output_cap_truncates(tiny):
    r = tiny.exec("head -c 100000 /dev/zero; head -c 100 /dev/zero >&2", max_output=1000)
    assert len(r.stdout) == 1000 and r.stdout_truncated
    assert len(r.stderr) == 100 and not r.stderr_truncated
    assert r.exit_code == 0


def test_stream_events_arrive_before_exit(tiny):
    events = []
    t0 = time.monotonic()
    for ev in tiny.exec_stream("echo first; sleep 1; echo second"):
        events.append((ev.kind, time.monotonic() - t0))
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "exit"
    first_out = next(t for k, t in events if k == "stdout")
    assert first_out < 0.9, "stdout must stream, not arrive at exit"


def test_concurrent_execs(tiny):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: tiny.exec(f"sleep 0.2; echo {i}"), range(16)))
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(16)]


def test_zombies_are_reaped(tiny):
    tiny.exec("sleep 0 & sleep 0 & exit 0")
    time.sleep(0.2)
    r = tiny.exec("ps -o stat | grep -c Z || true")
    assert r.stdout.strip() == b"0"


async def test_async_client(daemon):
    async with deltabox.AsyncClient(daemon.socket) as c:
        async with await c.create("tiny") as sbx:
            r = await sbx.exec(["sh", "-c", "echo async"])
            assert r.stdout == b"async\n"
            await sbx.write_file("/tmp/x", "data")
            assert await sbx.read_file("/tmp/x") == b"data"
