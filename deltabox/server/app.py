"""The DeltaBox daemon's lifecycle: start-up, sockets, TLS, signals, sd_notify, shutdown.

Start: refuse bad settings -> mount the store -> reconcile (`SandboxManager.start`) -> serve
the unix socket (and TCP with TLS + bearer token, and HTTP /metrics when configured) ->
health SERVING, sd_notify READY=1. On SIGTERM/SIGINT: STOPPING=1, NOT_SERVING, stop
accepting calls, let running ones finish (grace), stop sandboxes, unmount, close the store.

What each call does is elsewhere: `servicers` (pb -> domain call -> pb, via `convert`),
`interceptors` (token, parsing, errors -> status, per-RPC metrics).

Blocking work (CRIU RPCs, freezes, file sinks, store transactions) runs in the event loop's
default executor, sized here (`blocking_threads`): asyncio's own default, min(32, cpus + 4)
threads, queued concurrent full checkpoints -- each holds a thread for its whole frozen
dump, mostly waiting on CRIU -- while the host's cores idled.
"""

from __future__ import annotations

import asyncio
import ctypes
import grp
import os
import resource
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deltabox._proto.deltabox.v1 import deltabox_pb2 as pb
from deltabox._proto.deltabox.v1 import deltabox_pb2_grpc as pb_grpc
from deltabox.config import Config
from deltabox.core.sandboxes import SandboxManager
from deltabox.errors import ResourceExhausted
from deltabox.host.cgroups import detect_driver
from deltabox.host.systemd import keep_sandboxes_on_exit
from deltabox.host.criu import find_criu
from deltabox.logs import configure_logging
from deltabox.metrics import Metrics, MetricsHTTPServer
from deltabox.server.batch import BatchRunner
from deltabox.server.interceptors import ErrorInterceptor, ErrorReporter
from deltabox.server.servicers import (CheckpointsServicer, ImagesServicer, SandboxesServicer,
                                       SystemServicer)
from deltabox.store.backing import ensure_backing, release_backing
from deltabox.store.metadata import Store
from deltabox.store.space import StoreSpace

__all__ = ["Daemon", "run_daemon", "blocking_threads"]

log = structlog.get_logger("deltabox.server.app")

PR_SET_CHILD_SUBREAPER = 36


def _criu_version(criu: Path | None) -> str:
    if criu is None:
        return ""
    res = subprocess.run([str(criu), "--version"], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return res.stdout.strip()


def blocking_threads(config: Config) -> int:
    """The size of the daemon's executor: `blocking-threads`, or 8 per CPU and at least
    64 (threads waiting on CRIU or the kernel cost a stack, not a core)."""
    return config.blocking_threads or max(64, 8 * (os.cpu_count() or 1))


def _sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify), without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def _socket_group_id(spec: str | None) -> int | None:
    """The gid of --socket-group (a name or a number), which must exist."""
    if spec is None:
        return None
    try:
        return grp.getgrgid(int(spec)).gr_gid if spec.isdigit() else grp.getgrnam(spec).gr_gid
    except (KeyError, OverflowError):
        raise SystemExit(f"--socket-group {spec}: no such group (create it with "
                         f"`groupadd {spec}`, or give an existing name or gid)") from None


def _own_socket_dir(sock: Path, gid: int, state_dir: Path) -> None:
    """Make the socket's directory root:`gid` 0750: members of the group reach the socket
    (0660), others cannot even traverse. Since its group and mode change, the directory
    must be the socket's own: created now, or holding nothing but a stale socket."""
    parent = sock.absolute().parent
    real, state = parent.resolve(), state_dir.resolve()
    if real == state or state in real.parents or real in state.parents:
        raise SystemExit(f"--socket-group: the socket's directory {parent} must be apart "
                         f"from the state dir {state} (which only root may enter)")
    parent.parent.mkdir(parents=True, exist_ok=True)
    try:
        parent.mkdir(mode=0o750)
    except FileExistsError:
        sock.unlink(missing_ok=True)
        # (a symlink or a non-directory is refused by the open below)
        others = sorted(p.name for p in parent.iterdir()) \
            if parent.is_dir() and not parent.is_symlink() else []
        if others:
            raise SystemExit(f"--socket-group: {parent} holds other files "
                             f"({', '.join(others[:5])}); give the socket a directory of its "
                             "own") from None
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise SystemExit(f"--socket-group: cannot open {parent}: {e.strerror}") from None
    try:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o750)
    finally:
        os.close(fd)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.criu_version = ""

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise SystemExit("deltabox daemon must run as root (it mounts, creates "
                             "namespaces and cgroups)")
        self._check_tcp_config()  # refuse bad settings before touching anything
        self.socket_gid = _socket_group_id(self.config.socket_group)
        if self.socket_gid is not None:
            _own_socket_dir(self.config.socket, self.socket_gid, self.config.state_dir)
        # Prometheus' /metrics (off unless configured): a busy port fails here, before the
        # store is mounted.
        self.metrics_http = None
        if self.config.metrics_address:
            self.metrics_http = MetricsHTTPServer(self.metrics, self.config.metrics_address)
        # Every asyncio.to_thread of the daemon runs here (asyncio.run shuts it down).
        threads = blocking_threads(self.config)
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deltabox-blocking"))
        # Walks of deep trees hold a directory fd per level, and each sandbox, CRIU run and
        # client holds some: the soft fd limit of a shell (often 1,024) is raised to the
        # hard one (systemd's unit sets both).
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # Orphaned sandbox inits are re-parented to us, so we can reap them.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        try:
            self.backing = await asyncio.to_thread(ensure_backing, self.config.state_dir,
                                                   self.config.store_size)
        except BaseException:
            if self.metrics_http is not None:
                self.metrics_http.close()
            raise
        self.store = self.manager = None
        try:
            await self._start_serving()
        except BaseException:
            # Leave nothing behind: sandboxes reconcile restarted, mounts, the loop.
            if self.manager is not None:
                await self.manager.shutdown()
            if self.store is not None:
                self.store.close()
            await asyncio.to_thread(release_backing, self.backing)
            if self.metrics_http is not None:
                self.metrics_http.close()
            raise

    def require_space(self, what: str, method: str) -> None:
        """Refuse new work while the store is below its reserve (`deltabox.store.space`). Only
        calls that start new work are refused: deletions, rollbacks (they drop an upper)
        and the daemon's own work (standbys, squashes) go on."""
        try:
            self.space.require(what)
        except ResourceExhausted:
            self.metrics.store_refusals.labels(method).inc()
            raise

    def _check_tcp_config(self) -> None:
        cfg = self.config
        if cfg.tcp_address and not (cfg.tls_cert and cfg.tls_key and cfg.token):
            raise SystemExit("TCP needs tls-cert, tls-key and a bearer token (token-file or "
                             "$DELTABOX_TOKEN), as flags or in the config file; there is no "
                             "plaintext TCP")

    async def _start_serving(self) -> None:
        self.store = Store(self.backing.root, durable=self.config.durable)
        self.space = StoreSpace(self.backing.root, self.config.store_reserve,
                                self.config.store_reserve_inodes)
        self.metrics.track_store(self.space)
        self.reporter = ErrorReporter(self.space, (self.config.state_dir, self.backing.root))
        self.manager = SandboxManager(self.config, self.store,
                                      detect_driver(self.store.instance_id), self.metrics)
        report = await self.manager.start()
        self.criu_version = await asyncio.to_thread(_criu_version,
                                                 find_criu(self.config.criu_prefix))

        opts = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes)]
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.metrics, self.config.token, self.reporter)],
            options=opts)
        self.batch = BatchRunner(self)  # CheckpointMany, RollbackMany, ExecMany
        pb_grpc.add_ImagesServicer_to_server(ImagesServicer(self), self.server)
        pb_grpc.add_SandboxesServicer_to_server(SandboxesServicer(self), self.server)
        pb_grpc.add_CheckpointsServicer_to_server(CheckpointsServicer(self), self.server)
        pb_grpc.add_SystemServicer_to_server(SystemServicer(self), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else \
            health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [d.full_name for d in pb.DESCRIPTOR.services_by_name.values()]
        reflection.enable_server_reflection(names + [health.SERVICE_NAME,
                                                     reflection.SERVICE_NAME], self.server)

        sock = self.config.socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        self.server.add_insecure_port(f"unix:{sock}")
        if self.config.tcp_address:
            self._add_tcp_port(opts)
        await self.server.start()
        if self.socket_gid is not None:
            os.chown(sock, 0, self.socket_gid)
        os.chmod(sock, 0o660)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        _sd_notify("READY=1")
        log.info("daemon.serving", socket=str(sock), state_dir=str(self.config.state_dir),
                 metrics=self.metrics_http.url if self.metrics_http else None,
                 store=self.backing.kind, criu=self.criu_version,
                 disk_quotas=self.store.quotas.state,
                 blocking_threads=blocking_threads(self.config), **report)
        if not self.store.quotas.enforced and self.config.default_disk_bytes:
            log.warning("daemon.disk_limits_not_enforced", reason=self.store.quotas.state)

    def _add_tcp_port(self, opts) -> None:
        cfg = self.config
        creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(),
                                              cfg.tls_cert.read_bytes())])
        # Calls arriving over TCP must carry the bearer token (see ErrorInterceptor).
        self.server.add_secure_port(cfg.tcp_address, creds)
        log.warning("daemon.tcp_enabled", address=cfg.tcp_address)

    async def _set_health(self, status) -> None:
        for service in ("", *[d.full_name for d in pb.DESCRIPTOR.services_by_name.values()]):
            res = self.health.set(service, status)
            if asyncio.iscoroutine(res):
                await res

    async def stop(self, grace: float = 5.0) -> None:
        # --on-exit: stop the sandboxes, or leave them (and the store they are mounted on)
        # for the next daemon to adopt, e.g. across `systemctl restart` (deltabox.host.systemd).
        keep = await asyncio.to_thread(keep_sandboxes_on_exit, self.config.on_exit)
        log.info("daemon.stopping", keep_sandboxes=keep)
        _sd_notify("STOPPING=1")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        try:
            await self.manager.shutdown(keep_sandboxes=keep)
        finally:  # whatever failed above, the store is not left mounted (unless kept)
            self.store.close()
            if not keep:
                await asyncio.to_thread(release_backing, self.backing)
            self.config.socket.unlink(missing_ok=True)
            if self.metrics_http is not None:
                self.metrics_http.close()
        log.info("daemon.stopped")


async def _serve(config: Config) -> None:
    daemon = Daemon(config)
    await daemon.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await daemon.stop()


def run_daemon(config: Config) -> None:
    """Serve until SIGTERM or SIGINT (`deltabox daemon`)."""
    configure_logging(config.log_level)
    asyncio.run(_serve(config))
