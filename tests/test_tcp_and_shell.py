"""TCP is TLS + bearer token only; and the interactive Shell RPC."""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest

import deltabox
from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tls_files(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tcp_needs_tls_and_the_token(new_daemon, tls_files):
    key, cert = tls_files
    port = _free_port()
    d = new_daemon(extra_args=("--tcp", f"localhost:{port}", "--tls-cert", str(cert),
                               "--tls-key", str(key), "--token", "s3cret")).start()
    target = f"localhost:{port}"
    with deltabox.Client(target, tls_ca=cert, token="s3cret") as c:
        assert c.status().version
    with deltabox.Client(target, tls_ca=cert, token="wrong") as c:
        with pytest.raises(deltabox.PermissionDenied, match="token"):
            c.status()
    with deltabox.Client(target, tls_ca=cert) as c:
        with pytest.raises(deltabox.PermissionDenied):
            c.list()
    with deltabox.Client(target) as c:  # plaintext: the TLS port does not speak it
        with pytest.raises(deltabox.DeltaboxError):
            c.status()
    with d.client() as c:  # the unix socket needs no token (its file mode guards it)
        assert c.status().version


def test_tcp_without_tls_is_refused_at_start(new_daemon):
    d = new_daemon(extra_args=("--tcp", f"127.0.0.1:{_free_port()}"))
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
