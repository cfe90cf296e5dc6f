"""TCP is TLS + bearer token only; and the interactive Shell RPC."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

import deltabox
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from conftest import TINY_TAR
from tcp import free_port, make_tls_files, tcp_daemon_args, token_file


@pytest.fixture
def tls_files(tmp_path):
    return make_tls_files(tmp_path)


def _status_with_authorization(target: str, cert, *values: str) -> grpc.StatusCode:
    """Status over TLS with these raw `authorization` headers (none: no header)."""
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(target, creds) as channel:
        try:
            pb_grpc.SystemStub(channel).Status(
                pb.StatusRequest(), timeout=10, metadata=[("authorization", v) for v in values])
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_tcp_needs_tls_and_the_token(new_daemon, tls_files, tmp_path, monkeypatch):
    key, cert = tls_files
    port = free_port()
    monkeypatch.delenv("DELTABOX_TOKEN", raising=False)
    tok = token_file(tmp_path / "token", "s3cret\n")  # one trailing newline: dropped
    d = new_daemon(extra_args=tcp_daemon_args("localhost", port, key, cert, tok)).start()
    assert b"s3cret" not in (Path("/proc") / str(d.proc.pid) / "cmdline").read_bytes()
    target = f"localhost:{port}"
    with deltabox.Client(target, tls_ca=cert, token="s3cret") as c:
        assert c.status().version
    with deltabox.Client(target, tls_ca=cert, token_file=tok) as c:
        assert c.status().version
    monkeypatch.setenv("DELTABOX_TOKEN", "s3cret")
    with deltabox.Client(target, tls_ca=cert) as c:  # from the environment
        assert c.status().version
    monkeypatch.delenv("DELTABOX_TOKEN")
    with deltabox.Client(target, tls_ca=cert, token="wrong") as c:
        with pytest.raises(deltabox.PermissionDenied, match="token"):
            c.status()
    with deltabox.Client(target, tls_ca=cert) as c:
        with pytest.raises(deltabox.PermissionDenied):
            c.list()
    with deltabox.Client(target, retry=None) as c:  # plaintext: the TLS port does not speak it
        with pytest.raises(deltabox.DeltaboxError):
            c.status()
    # Missing, malformed, repeated or a prefix of the right one: all refused alike.
    assert _status_with_authorization(target, cert, "Bearer s3cret") == grpc.StatusCode.OK
    for values in [(), ("s3cret",), ("Bearer",), ("Bearer ",), ("Bearer s3cre",),
                   ("Bearer s3cret ",), ("bearer s3cret",), ("Basic czNjcmV0",),
                   ("Bearer s3cret", "Bearer s3cret")]:
        assert _status_with_authorization(target, cert, *values) == \
            grpc.StatusCode.PERMISSION_DENIED, values
    with d.client() as c:  # the unix socket needs no token (its file mode guards it)
        assert c.status().version
    monkeypatch.setenv("DELTABOX_TOKEN", "s3cret")
    with d.client() as c:  # ... and does not send one from the environment
        assert c.status().version


def test_cli_talks_to_a_tcp_daemon(new_daemon, tls_files, tmp_path, monkeypatch):
    key, cert = tls_files
    port = free_port()
    tok = token_file(tmp_path / "token", "cli-s3cret\n")
    new_daemon(extra_args=tcp_daemon_args("127.0.0.1", port, key, cert, tok)).start()
    env = {k: v for k, v in os.environ.items() if k != "DELTABOX_TOKEN"}

    def cli(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "deltabox.cli", "--socket",
                               f"127.0.0.1:{port}", "--tls-ca", str(cert), *args],
                              capture_output=True, text=True, timeout=60, env={**env, **extra_env})
    r = cli("--token-file", str(tok), "--json", "status")
    assert r.returncode == 0 and '"version"' in r.stdout, r.stderr
    r = cli("--json", "status", DELTABOX_TOKEN="cli-s3cret")
    assert r.returncode == 0 and '"version"' in r.stdout, r.stderr
    r = cli("status", DELTABOX_TOKEN="wrong")
    assert r.returncode == 1 and "PermissionDenied" in r.stderr
    r = cli("status")
    assert r.returncode == 1 and "PermissionDenied" in r.stderr
    tok.chmod(0o644)
    r = cli("--token-file", str(tok), "status")
    assert r.returncode == 2 and "group or others" in r.stderr and "cli-s3cret" not in r.stderr


def test_cli_address_tls_and_token_file_drive_a_sandbox(new_daemon, tls_files, tmp_path):
    """`--address HOST:PORT --tls-ca FILE --token-file FILE`: the whole round trip of a
    sandbox over TCP, and nothing without the token."""
    key, cert = tls_files
    port = free_port()
    tok = token_file(tmp_path / "token", "addr-s3cret\n")
    d = new_daemon(extra_args=tcp_daemon_args("127.0.0.1", port, key, cert, tok)).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
    env = {k: v for k, v in os.environ.items() if k not in ("DELTABOX_TOKEN", "DELTABOX_SOCKET")}

    def cli(*args, token: bool = True):
        auth = ("--token-file", str(tok)) if token else ()
        return subprocess.run([sys.executable, "-m", "deltabox.cli", "--address",
                               f"127.0.0.1:{port}", "--tls-ca", str(cert), *auth, *args],
                              capture_output=True, text=True, timeout=60, env=env)
    r = cli("create", "tiny", "--name", "over-tcp")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    r = cli("exec", "over-tcp", "--", "sh", "-c", "echo hi-$((6*7)); exit 5")
    assert (r.returncode, r.stdout) == (5, "hi-42\n"), r.stderr
    r = cli("--json", "ls")
    assert [(b["id"], b["state"]) for b in json.loads(r.stdout)] == [(sid, "running")]
    r = cli("ls", token=False)
    assert r.returncode == 1 and "PermissionDenied" in r.stderr
    assert cli("rm", sid).returncode == 0
    with d.client() as c:
        assert c.list() == []
    r = cli("--socket", str(d.socket), "ls")
    assert r.returncode != 0 and "not both" in r.stderr


def test_daemon_takes_the_token_from_the_environment(new_daemon, tls_files, monkeypatch):
    key, cert = tls_files
    port = free_port()
    monkeypatch.setenv("DELTABOX_TOKEN", "from-env")
    d = new_daemon(extra_args=tcp_daemon_args("localhost", port, key, cert)).start()
    monkeypatch.delenv("DELTABOX_TOKEN")
    with deltabox.Client(f"localhost:{port}", tls_ca=cert, token="from-env") as c:
        assert c.status().version
    with deltabox.Client(f"localhost:{port}", tls_ca=cert, token="from-env2") as c:
        with pytest.raises(deltabox.PermissionDenied):
            c.status()
    # The daemon's children (sandbox inits, their processes) do not inherit it.
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        with c.create("tiny") as sbx:
            assert b"DELTABOX_TOKEN" not in sbx.exec(["env"]).stdout
            init_env = (Path("/proc") / str(sbx.info.init_pid) / "environ").read_bytes()
            assert b"from-env" not in init_env


def _daemon_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltabox.cli", "daemon", *args],
                          capture_output=True, text=True, timeout=60,
                          env=env if env is not None else os.environ)


def test_token_on_the_command_line_is_refused(tmp_path):
    state = tmp_path / "state"
    r = _daemon_cli("--state-dir", str(state), "--tcp", "localhost:1", "--token", "s3cret")
    assert r.returncode != 0
    assert "--token-file" in r.stderr and "DELTABOX_TOKEN" in r.stderr and "cmdline" in r.stderr
    assert not state.exists()  # refused before touching anything


@pytest.mark.parametrize("mode, content, error", [
    (0o644, "s3cret\n", "group or others"),
    (0o640, "s3cret\n", "group or others"),
    (0o602, "s3cret\n", "group or others"),
    (0o600, "", "non-empty"),
    (0o600, "\n", "non-empty"),
    (0o600, "s3cret\n\n", "without spaces"),   # only one newline is dropped
    (0o600, "s3 cret", "without spaces"),
])
def test_bad_token_files_are_refused(tmp_path, mode, content, error):
    tok = token_file(tmp_path / "token", content, mode)
    state = tmp_path / "state"
    r = _daemon_cli("--state-dir", str(state), "--tcp", "localhost:1", "--token-file",
                    str(tok))
    assert r.returncode != 0 and error in r.stderr and str(tok) in r.stderr, r.stderr
    assert "s3cret" not in r.stderr
    assert not state.exists()
    with pytest.raises(deltabox.InvalidArgument, match=error):
        deltabox.client.read_token_file(tok)


def test_token_file_checks(tmp_path):
    assert deltabox.client.read_token_file(token_file(tmp_path / "a", "abc\n")) == "abc"
    assert deltabox.client.read_token_file(token_file(tmp_path / "b", "abc")) == "abc"
    with pytest.raises(deltabox.InvalidArgument, match="cannot open"):
        deltabox.client.read_token_file(tmp_path / "missing")
    with pytest.raises(deltabox.InvalidArgument, match="not a regular file"):
        deltabox.client.read_token_file(tmp_path)
    other = token_file(tmp_path / "c", "abc")
    os.chown(other, 65534, 65534)
    with pytest.raises(deltabox.InvalidArgument, match="uid 65534"):
        deltabox.client.read_token_file(other)
    with pytest.raises(deltabox.InvalidArgument, match="not both"):
        deltabox.Client("localhost:1", tls_ca=tmp_path / "x", token="a",
                        token_file=tmp_path / "a")
    with pytest.raises(deltabox.InvalidArgument, match="TLS"):  # a token never travels in plaintext
        deltabox.Client("localhost:1", token_file=tmp_path / "a")


def test_tcp_without_tls_is_refused_at_start(new_daemon):
    d = new_daemon(extra_args=("--tcp", f"127.0.0.1:{free_port()}"))
    with pytest.raises(RuntimeError, match="TLS|tls"):
        d.start(timeout=15)
    assert d.proc.returncode != 0


def test_shell_rpc_runs_an_interactive_shell(daemon, tiny):
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = pb_grpc.SandboxesStub(channel)

    def inputs():
        yield pb.ShellInput(start=pb.ShellStart(sandbox=tiny.id, argv=["/bin/sh"], rows=30,
                                                cols=100))
        yield pb.ShellInput(resize=pb.WindowSize(rows=40, cols=120))
        yield pb.ShellInput(stdin=b"stty size; tty; echo hi-$((6*7)); exit 3\n")
    out, exit_ = b"", None
    for msg in stub.Shell(inputs(), timeout=30):
        if msg.WhichOneof("output") == "data":
            out += msg.data
        else:
            exit_ = msg.exit
    channel.close()
    assert b"hi-42" in out and b"/dev/pts/" in out
    assert b"40 120" in out  # the resize reached the pty
    assert exit_ is not None and exit_.exit_code == 3


def test_shell_rpc_needs_start_first(daemon, tiny):
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = pb_grpc.SandboxesStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Shell(iter([pb.ShellInput(stdin=b"x")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_shell_rpc_bad_input_mid_stream_ends_the_call(daemon, tiny):
    """A window size out of range after the start is INVALID_ARGUMENT at once -- not a
    shell left running with its input no longer read, until the client's deadline."""
    channel = grpc.insecure_channel(f"unix:{daemon.socket}")
    stub = pb_grpc.SandboxesStub(channel)

    def inputs():
        yield pb.ShellInput(start=pb.ShellStart(sandbox=tiny.id, argv=["/bin/sh"]))
        yield pb.ShellInput(resize=pb.WindowSize(rows=70000, cols=80))
        yield pb.ShellInput(stdin=b"echo after; exit 7\n")
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Shell(inputs(), timeout=30))
    channel.close()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "65535" in err.value.details()
    assert time.monotonic() - t0 < 10
    assert tiny.exec(["true"]).exit_code == 0  # the sandbox is fine afterwards


def test_client_shell_runs_an_interactive_shell(tiny):
    """Client.shell / Sandbox.shell: the Shell RPC without touching stubs."""
    with tiny._client.shell(tiny.id, ["/bin/sh"], rows=30, cols=100) as sh:
        sh.resize(40, 120)
        sh.send("stty size; tty; echo hi-$((6*7)); exit 3\n")
        out = b"".join(sh)
    assert b"hi-42" in out and b"/dev/pts/" in out and b"40 120" in out
    assert sh.exit is not None and sh.exit.exit_code == 3 and sh.exit.status == 3
    with tiny.shell(["/bin/sh"]) as sh:
        sh.send(b"kill -9 $$\n")
        assert b"".join(sh) is not None
    assert sh.exit.signal == 9 and sh.exit.status == 128 + 9


def test_async_client_shell(daemon, tiny):
    async def go():
        async with deltabox.AsyncClient(daemon.socket) as c:
            sbx = await c.get(tiny.id)
            async with sbx.shell(["/bin/sh"]) as sh:
                await sh.send("echo async-$((6*7)); exit 4\n")
                out = b"".join([data async for data in sh])
            return out, sh.exit
    out, exit_ = asyncio.run(go())
    assert b"async-42" in out and exit_.exit_code == 4
