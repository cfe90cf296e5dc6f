"""How a client reaches the daemon: the target, TLS and the bearer token, the channel, the
deadline of each call, when a call is retried, and how a gRPC error becomes a DeltaboxError.

Shared by the blocking and the asyncio client (`sync.py`, `aio.py`), which differ only in
how they wait.

Deadlines. `Client(timeout=T)` is the default deadline of a call that has no limit of its
own. Calls that carry one -- `exec(timeout=)`, `Session.run(timeout=)`, `Process.wait(
timeout=)` -- are governed by it instead (plus a grace for the reply to travel), and are
never cut by T: an exec of ten minutes is not killed by a client made with timeout=5.
Streams with no end of their own (exec without a timeout, `logs(follow=True)`, an import, a
shell) have no deadline. Every call also takes `deadline=` (seconds, or None for none),
which wins over both.

Retries. On UNAVAILABLE (the daemon is restarting, its socket not there yet) a call that is
idempotent -- reads, lists, `status`, `wait` -- waits for the channel to be ready again and
is re-sent, for at most `Retry.window` seconds (and never past its deadline). Calls that
change state (create, checkpoint, exec, write ...) are not: their first attempt may have run
before the daemon went away. `Retry(non_idempotent=True)` retries them too; `retry=None`
retries nothing.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from deltabox.errors import ERROR_METADATA_KEY, DeltaboxError, InvalidArgument, error_for_code

__all__ = ["default_target", "read_token_file", "load_token", "TOKEN_ENV", "Retry",
           "DEFAULT", "open_channel", "error_from_rpc", "EXEC_GRACE"]

MAX_MESSAGE = 80 << 20
TOKEN_ENV = "DELTABOX_TOKEN"
# A call with its own time limit gets this much longer: the daemon answers at its limit.
EXEC_GRACE = 30.0
# Between a failed attempt and the next: a daemon that is up but refusing (shutting down)
# must not be hammered.
RETRY_PAUSE = 0.05


class _Default:
    """The marker of 'no deadline given for this call': the operation's or the client's."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass(frozen=True)
class Retry:
    """When a call that failed with UNAVAILABLE is sent again (see the module docstring).
    `window`: seconds to wait for the daemon to come back; `non_idempotent`: also retry
    calls that change state (only when the caller knows a repeat is harmless)."""
    window: float = 5.0
    non_idempotent: bool = False

    def allows(self, idempotent: bool) -> bool:
        return self.window > 0 and (idempotent or self.non_idempotent)


def default_target(socket: str | os.PathLike | None = None) -> str:
    """The gRPC target: `unix:PATH` for a socket path (default $DELTABOX_SOCKET, else
    /run/deltabox/deltabox.sock), or HOST:PORT as given."""
    path = str(socket or os.environ.get("DELTABOX_SOCKET", "/run/deltabox/deltabox.sock"))
    return path if ":" in path and not path.startswith("/") else f"unix:{path}"


# ---- the TCP bearer token ---------------------------------------------------------------------
# Never a command-line argument: any host user can read /proc/<pid>/cmdline.

def _check_token(token: str, source: str) -> str:
    # gRPC sends it as "authorization: Bearer <token>": printable ASCII, no spaces.
    if not token or not all("!" <= ch <= "~" for ch in token):
        raise InvalidArgument(f"the bearer token from {source} must be non-empty printable "
                              "ASCII without spaces")
    return token


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in `path`, less one trailing newline. The file must be a regular
    file owned by us (or root) that group and others cannot access (chmod 600);
    InvalidArgument says which rule it breaks."""
    path = os.path.expanduser(path)
    try:
        # O_NONBLOCK: a fifo must not hang us; the checks below are on what was opened.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise InvalidArgument(f"cannot open the token file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"the token file {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise InvalidArgument(f"the token file {path} belongs to uid {st.st_uid}, "
                                  f"not to us (uid {os.geteuid()}) or root")
        if st.st_mode & 0o077:
            raise InvalidArgument(f"the token file {path} is accessible by group or others "
                                  f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise InvalidArgument(f"the token file {path} is longer than 4 KiB")
    try:
        token = data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidArgument(f"the token file {path} is not ASCII") from None
    return _check_token(token.removesuffix("\n"), str(path))


def load_token(token_file: str | os.PathLike | None = None) -> str | None:
    """The bearer token from `token_file`, else from $DELTABOX_TOKEN, else None."""
    if token_file is not None:
        return read_token_file(token_file)
    token = os.environ.get(TOKEN_ENV)
    return _check_token(token, f"${TOKEN_ENV}") if token else None


def _credentials(tls_ca: str | os.PathLike | None, token: str | None):
    """TLS (+ bearer token) credentials for a TCP daemon, or None for the unix socket."""
    if tls_ca is None:
        if token:
            raise InvalidArgument("a token is only sent over TLS: give tls_ca too")
        return None
    creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
    if token:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token))
    return creds


def _channel_options() -> list:
    return [("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            # A restarting daemon is back within a second or two: look for it often, so
            # a waiting retry sees it soon (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def open_channel(module, target: str, tls_ca, token, token_file):
    """A channel of `module` (grpc or grpc.aio) to `target`: plaintext for a unix socket,
    TLS with the bearer token (argument, file, else $DELTABOX_TOKEN) for TCP."""
    if token is not None and token_file is not None:
        raise InvalidArgument("give token or token_file, not both")
    if token is not None:
        token = _check_token(token, "the token argument")
    elif token_file is not None:
        token = read_token_file(token_file)
    elif tls_ca is not None:
        token = load_token()  # $DELTABOX_TOKEN: only TCP (TLS) connections send one
    creds = _credentials(tls_ca, token)
    if creds is None:
        return module.insecure_channel(target, options=_channel_options())
    return module.secure_channel(target, creds, options=_channel_options())


def error_from_rpc(e: grpc.RpcError) -> DeltaboxError:
    """The exception the daemon raised: its code's class, or its domain class when the
    daemon named one in the trailing metadata (errors.ERROR_METADATA_KEY)."""
    trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    domain = next((v for k, v in trailers or () if k == ERROR_METADATA_KEY), "")
    return error_for_code(e.code().name, e.details() or e.code().name, domain)


def is_unavailable(e: grpc.RpcError) -> bool:
    return e.code() == grpc.StatusCode.UNAVAILABLE
