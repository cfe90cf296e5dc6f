"""One deltabox daemon per Ray node: the `NodeDaemon` actor that starts, supervises and
publishes it.

Each node that advertises the custom resource `deltabox_slots` gets one `NodeDaemon`
actor, pinned to it (`NodeAffinitySchedulingStrategy(node_id, soft=False)`) and named
`deltabox-node-<node id>` in the `deltabox` namespace, so any worker can find the daemon
of a node by its id. The actor either

- `spawn`s the daemon (default): a `deltabox daemon` subprocess on its own state dir
  (`<base_dir>/node-<id>/state`: its own loop-backed XFS store, socket, store instance and
  so cgroup parent), listening on TCP at the node's IP with a self-signed certificate and
  a fresh bearer token made here. This needs the Ray worker to run as root (containers,
  the tests); or
- attaches to the installed `service` (docs/install.md) that the operator configured with
  `tcp`, `tls-cert` and `token-file`: the actor only publishes that endpoint and watches it.

`endpoint()` hands out what a client needs (address, CA certificate, token) to callers of
the actor; that is Ray's trust boundary: whoever can call actors in the cluster can use
its sandboxes. The supervising thread notices the daemon's exit (logged
`ray.daemon_exited`) and `health()` reports it; `restart()` starts it again on the same
state dir, port and token (the daemon adopts its running sandboxes), so cached
connections work again. `stop()` stops it and removes what it left.

The transfer key: a FULL checkpoint is imported only when signed with the importing
daemon's `transfer-key-file` (its CRIU images are restored as host root; docs/security.md,
"Importing checkpoints"), so cross-node fork needs every node's daemon to hold the same key.
`start_node_daemons()` makes one per cluster (32 random bytes; an existing actor's key is
reused, so nodes started later join the same trust) and passes it in each actor's start
arguments; the actor writes it root-only (0600) next to the daemon's token and hands it to
the daemon. In `service` mode the operator installs the same key file on every host.

`start_node_daemons()` creates the actors (idempotent: an existing one is reused).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog

__all__ = ["NodeDaemonConfig", "Endpoint", "NodeDaemon", "start_node_daemons",
           "node_daemon_actor", "actor_name", "NAMESPACE", "SLOTS"]

log = structlog.get_logger("deltabox.ray.node")

NAMESPACE = "deltabox"
SLOTS = "deltabox_slots"   # the custom resource a node advertises its capacity with


def actor_name(node_id: str) -> str:
    return f"deltabox-node-{node_id}"


@dataclass(frozen=True)
class NodeDaemonConfig:
    """How the daemon of each node is run. `mode`: `spawn` (the actor starts one under
    `base_dir`) or `service` (the installed one, reached at `service_address` with
    `service_ca` and the token in `service_token_file`, as the daemon's config says)."""
    mode: str = "spawn"
    base_dir: str = "/var/lib/deltabox-ray"
    store_size: str = "64G"
    image_dirs: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 60.0
    service_address: str = ""
    service_ca: str = ""
    service_token_file: str = ""


@dataclass(frozen=True)
class Endpoint:
    """What a client needs to reach one node's daemon, as its actor publishes it."""
    node_id: str
    address: str            # host:port (TLS)
    ca_pem: bytes           # the daemon's certificate (or its CA)
    token: str = field(repr=False)
    pid: int = 0            # the daemon's pid on its node (0: the installed service)
    state_dir: str = ""

    def describe(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "the installed service"
        return f"node {self.node_id[:12]} (daemon at {self.address}, {pid})"


class NodeDaemon:
    """The per-node actor's body (made a Ray actor by `node_daemon_actor()`)."""

    def __init__(self, config: NodeDaemonConfig, transfer_key: bytes | None = None):
        import ray
        self.config = config
        self._transfer_key = transfer_key
        self.node_id = ray.get_runtime_context().get_node_id()
        self.ip = ray.util.get_node_ip_address()
        self.exit_code: int | None = None
        self._daemon = None
        self._stopping = False
        if config.mode == "service":
            self._endpoint = _service_endpoint(config, self.node_id)
            return
        if config.mode != "spawn":
            raise ValueError(f"mode must be 'spawn' or 'service', not {config.mode!r}")
        self.dir = Path(config.base_dir) / f"node-{self.node_id[:12]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        key, cert = _self_signed(self.dir, self.ip)
        token = secrets.token_urlsafe(32)
        token_file = self.dir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        port = _free_port(self.ip)
        self._args = ("--tcp", f"{self.ip}:{port}", "--tls-cert", str(cert), "--tls-key",
                      str(key), "--token-file", str(token_file), *config.extra_args)
        if transfer_key:
            self._args += ("--transfer-key-file", str(_write_key(self.dir, transfer_key)))
        self._endpoint = Endpoint(self.node_id, f"{self.ip}:{port}", cert.read_bytes(), token,
                                  0, str(self.dir / "state"))
        self._start()

    # ---- the daemon's life -----------------------------------------------------------------

    def _start(self) -> None:
        from deltabox.testing import ThrowawayDaemon
        self._daemon = ThrowawayDaemon(self.dir / "state", store_size=self.config.store_size,
                                       image_dirs=tuple(Path(d) for d in self.config.image_dirs),
                                       extra_args=self._args)
        self._daemon.start(timeout=self.config.start_timeout)
        self.exit_code = None
        self._endpoint = Endpoint(self.node_id, self._endpoint.address, self._endpoint.ca_pem,
                                  self._endpoint.token, self._daemon.pid,
                                  self._endpoint.state_dir)
        log.info("ray.daemon_started", node=self.node_id[:12], address=self._endpoint.address,
                 pid=self._daemon.pid)
        threading.Thread(target=self._supervise, args=(self._daemon,), daemon=True,
                         name="deltabox-supervise").start()

    def _supervise(self, daemon) -> None:
        code = daemon.proc.wait()
        if daemon is self._daemon:
            self.exit_code = code
            if self._stopping:
                log.info("ray.daemon_exited", node=self.node_id[:12], pid=daemon.pid,
                         exit_code=code)
            else:
                log.warning("ray.daemon_exited", node=self.node_id[:12], pid=daemon.pid,
                            exit_code=code, log_tail=daemon.log()[-500:])

    def endpoint(self) -> Endpoint:
        return self._endpoint

    def transfer_key(self) -> bytes | None:
        """The cluster's transfer key this actor's daemon was given (None: the service's
        own, or none), for `start_node_daemons` to give nodes started later. Whoever can
        call this actor already has the node (the daemon's token, root Ray workers)."""
        return self._transfer_key

    def health(self) -> dict:
        """{'alive': bool, 'pid': int, 'exit_code': int | None, 'address': str}."""
        if self._daemon is None:   # the service: ask it
            return {"alive": _answers(self._endpoint), "pid": 0, "exit_code": None,
                    "address": self._endpoint.address}
        return {"alive": self._daemon.running(), "pid": self._daemon.pid,
                "exit_code": self.exit_code, "address": self._endpoint.address}

    def restart(self) -> Endpoint:
        """Start the daemon again after it exited (same state dir, port and token: it
        adopts the sandboxes that still run). A running daemon is left alone."""
        if self._daemon is None:
            raise RuntimeError("the installed service is restarted by systemd, not by Ray")
        if not self._daemon.running():
            self._start()
        return self._endpoint

    def log_tail(self) -> str:
        return self._daemon.log() if self._daemon is not None else ""

    def stop(self) -> str:
        """Stop the daemon (SIGTERM, its sandboxes end) and remove what it left: '' or
        what had to be cleaned up."""
        if self._daemon is None:
            return ""
        self._stopping = True
        left = self._daemon.cleanup()
        log.info("ray.daemon_stopped", node=self.node_id[:12], leftovers=left)
        return left


def _service_endpoint(config: NodeDaemonConfig, node_id: str) -> Endpoint:
    from deltabox.client.connection import read_token_file
    if not (config.service_address and config.service_ca and config.service_token_file):
        raise ValueError("mode 'service' needs service_address, service_ca and "
                         "service_token_file (the daemon's tcp, tls-cert and token-file)")
    return Endpoint(node_id, config.service_address, Path(config.service_ca).read_bytes(),
                    read_token_file(config.service_token_file))


def _answers(ep: Endpoint) -> bool:
    from deltabox.ray.routing import client_for_endpoint
    from deltabox.errors import DeltaboxError
    try:
        client_for_endpoint(ep).status()
        return True
    except DeltaboxError:
        return False


def _write_key(directory: Path, key: bytes) -> Path:
    """The key written root-only (0600, never through a symlink) as `directory`/transfer-key."""
    path = directory / "transfer-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.fchmod(fd, 0o600)   # an older file of another mode
        os.write(fd, key)
    finally:
        os.close(fd)
    return path


def _cluster_key(node_ids: list[str]) -> bytes:
    """The transfer key of the NodeDaemons already running (one key per cluster), or a
    new random one."""
    import ray
    for node_id in node_ids:
        try:
            actor = ray.get_actor(actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            continue
        key = ray.get(actor.transfer_key.remote())
        if key:
            return key
    return secrets.token_bytes(32)


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _self_signed(directory: Path, ip: str) -> tuple[Path, Path]:
    """(key, certificate) for the node's IP, localhost and 127.0.0.1 (valid a year)."""
    key, cert = directory / "tls-key.pem", directory / "tls-cert.pem"
    if not (key.exists() and cert.exists()):
        san = f"subjectAltName=DNS:localhost,IP:127.0.0.1,IP:{ip}"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "365", "-keyout", str(key), "-out", str(cert), "-subj",
                        "/CN=deltabox-node", "-addext", san], check=True, capture_output=True)
        key.chmod(0o600)
    return key, cert


_ACTOR = None
# The handles of the actors this process started: a non-detached actor ends when its last
# handle goes away, named or not.
STARTED: dict[str, object] = {}


def node_daemon_actor():
    """The Ray actor class of `NodeDaemon` (made once; importing this module needs no Ray).
    Threaded (health answers while a restart runs); no CPU reserved: it mostly waits."""
    global _ACTOR
    if _ACTOR is None:
        import ray
        _ACTOR = ray.remote(num_cpus=0, max_concurrency=4, max_restarts=0)(NodeDaemon)
    return _ACTOR


def daemon_nodes() -> list[dict]:
    """The live Ray nodes that advertise `deltabox_slots` (ray.nodes() entries)."""
    import ray
    return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get(SLOTS, 0) > 0]


def start_node_daemons(config: NodeDaemonConfig = NodeDaemonConfig(), *,
                       nodes: list[str] | None = None, detached: bool = False,
                       transfer_key: bytes | None = None) -> dict:
    """One `NodeDaemon` per node advertising `deltabox_slots` (or per node id in `nodes`),
    started concurrently; returns {node_id: actor handle} once every daemon answers.
    `detached`: the actors outlive the driver that started them (an operator's one-off
    script); else they end with this job. `transfer_key`: the key the spawned daemons
    share (default: the running actors' key, or a new random one; see the module doc)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ids = nodes if nodes is not None else [n["NodeID"] for n in daemon_nodes()]
    if config.mode == "spawn" and transfer_key is None:
        transfer_key = _cluster_key([n["NodeID"] for n in daemon_nodes()])
    actors = {}
    for node_id in ids:
        actors[node_id] = node_daemon_actor().options(
            name=actor_name(node_id), namespace=NAMESPACE, get_if_exists=True,
            lifetime="detached" if detached else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(config, transfer_key)
    ray.get([a.endpoint.remote() for a in actors.values()])
    STARTED.update(actors)
    return actors
