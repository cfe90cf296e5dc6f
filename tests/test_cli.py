"""The `deltabox` CLI against a real daemon: ids, exit codes, --json, tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_create_exec_rm_roundtrip(daemon):
    r = daemon.cli("create", "tiny", "--name", "cli-box", "--memory", "128M", "--pids", "64")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.decode().strip()
    assert sid.startswith("sbx-")
    try:
        r = daemon.cli("exec", "cli-box", "--", "sh", "-c", "echo hi; echo err >&2; exit 3")
        assert (r.returncode, r.stdout, r.stderr) == (3, b"hi\n", b"err\n")
        r = daemon.cli("exec", sid, "--env", "A=b", "--cwd", "/etc", "--", "sh", "-c",
                       "echo $A; pwd")
        assert r.stdout == b"b\n/etc\n"
        r = daemon.cli("exec", "cli-box", "--timeout", "0.3", "--", "sleep", "10")
        assert r.returncode == 128 + 9 and b"timed out" in r.stderr
        r = daemon.cli("exec", "cli-box", "--stdin", "--", "wc", "-c", input=b"12345")
        assert r.stdout.strip() == b"5"
        r = daemon.cli("--json", "ls")
        boxes = {b["name"]: b for b in json.loads(r.stdout)}
        assert boxes["cli-box"]["limits"]["memory_bytes"] == 128 << 20
        assert boxes["cli-box"]["state"] == "running" and boxes["cli-box"]["network"] == "none"
        r = daemon.cli("ls")
        assert b"cli-box" in r.stdout and b"running" in r.stdout
    finally:
        r = daemon.cli("rm", "cli-box")
        assert r.returncode == 0, r.stderr
    r = daemon.cli("exec", "cli-box", "--", "true")
    assert r.returncode == 1 and b"NotFound" in r.stderr


def test_sessions_through_cli(daemon):
    sid = daemon.cli("create", "tiny").stdout.decode().strip()
    try:
        assert daemon.cli("session", "open", sid, "--kind", "sh", "--name", "s").returncode == 0
        assert daemon.cli("exec", sid, "--session", "s", "--", "X=9").returncode == 0
        r = daemon.cli("exec", sid, "--session", "s", "--", "echo $X; exit_code_test() { "
                       "return 4; }; exit_code_test")
        assert (r.returncode, r.stdout) == (4, b"9\n")
        r = daemon.cli("--json", "session", "ls", sid)
        assert [s["name"] for s in json.loads(r.stdout)] == ["s"]
        assert daemon.cli("session", "close", sid, "s").returncode == 0
    finally:
        daemon.cli("rm", sid)


def test_status_images_and_errors(daemon):
    r = daemon.cli("--json", "status")
    st = json.loads(r.stdout)
    assert st["store_backing"] in ("loop-image", "host-xfs") and st["version"]
    r = daemon.cli("--json", "image", "ls")
    from conftest import WITHOUT_DEMO
    assert {"tiny", *(() if WITHOUT_DEMO else ("demo",))} <= {i["name"]
                                                              for i in json.loads(r.stdout)}
    r = daemon.cli("create", "no-such-image")
    assert r.returncode == 1 and b"no-such-image" in r.stderr
    r = daemon.cli("snapshot", "whatever")
    assert r.returncode == 1 and b"NotFound" in r.stderr and b"whatever" in r.stderr
    r = daemon.cli("exec", "x")
    assert r.returncode != 0


def test_token_options(daemon, tmp_path):
    """The token never goes on a command line; a file or $DELTABOX_TOKEN carries it."""
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    token_file.chmod(0o600)
    r = daemon.cli("--token-file", str(token_file), "status")  # a unix socket: no TLS
    assert r.returncode == 2 and b"TLS" in r.stderr
    env = {**os.environ, "DELTABOX_TOKEN": "t0ken"}  # only sent over TLS: ignored here
    r = subprocess.run([sys.executable, "-m", "deltabox.cli", "--socket", str(daemon.socket),
                        "--json", "status"], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "deltabox.cli", "daemon", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert "--token-file" in r.stdout and "--socket-group" in r.stdout
    assert "--token " not in r.stdout and "--token\n" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "deltabox.cli", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert "--token-file" in r.stdout and "--tls-ca" in r.stdout
    r = daemon.cli("--token", "s3cret", "status")  # refused, not taken for --token-file
    assert r.returncode == 2 and b"--token-file" in r.stderr and b"s3cret" not in r.stderr


def test_shell_through_cli(daemon, tiny):
    """`deltabox shell` (Client.shell underneath) with a piped stdin: output relayed, the
    shell's exit status propagated."""
    r = daemon.cli("shell", tiny.id, "--", "/bin/sh", input=b"echo via-$((6*7)); exit 3\n")
    assert r.returncode == 3, r.stderr
    assert b"via-42" in r.stdout
