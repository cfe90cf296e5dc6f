"""A TCP daemon's credentials for tests: a free port, a self-signed TLS pair, a token file.

(tests/test_tcp_and_shell.py has the same as private helpers; this is the shared copy.)
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """(key, certificate) for localhost and 127.0.0.1, valid for a day."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def token_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def tcp_daemon_args(host: str, port: int, key: Path, cert: Path,
                    token: Path | None = None) -> tuple[str, ...]:
    """A daemon's flags to serve on HOST:PORT with TLS (and a bearer token file)."""
    args = ("--tcp", f"{host}:{port}", "--tls-cert", str(cert), "--tls-key", str(key))
    return args + (("--token-file", str(token)) if token is not None else ())
