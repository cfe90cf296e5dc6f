"""DeltaBox under Ray's own sandbox API (`ray.experimental.sandbox`, Ray >= 2.5x), with
checkpoint, rollback and fork added.

Ray ships `ray.experimental.sandbox`: a `BaseSandboxBackend` contract (create, delete,
exec, read/write a file, status) implemented by gVisor, and a `Sandbox` actor (one actor
per sandbox) made by `ray.experimental.sandbox.create(...)`. This module gives both a
DeltaBox counterpart:

- `DeltaBoxSandboxBackend`: the same contract over the node's deltabox daemon (reached
  through `routing.py`, so the node needs a `NodeDaemon`), plus `checkpoint`, `rollback`
  and `fork`. Errors arrive as Ray's sandbox exceptions (`SandboxNotFoundError`,
  `SandboxTimeoutError`, `SandboxCreationError`, `SandboxExecError`), the DeltaBox error as
  their cause.
- `DeltaBoxSandbox` (an actor with the methods of Ray's `Sandbox` actor, plus
  `checkpoint`, `rollback`, `fork`) and `create(image, ...)`, a drop-in for
  `ray.experimental.sandbox.create` that reserves one `deltabox_slots` on the node.

Differences from the gVisor backend, on purpose: the root file system is always writable
copy-on-write (`readonly=True` is read as False: checkpoints are of the whole tree);
`image` is the name of an image imported into the daemons (`SandboxPool.import_image`),
not an OCI reference; networks are `none` and `public` (DeltaBox's NAT); `user`,
`ttl_seconds`, `dns` and `capabilities` are refused rather than ignored.
"""

from __future__ import annotations

from contextlib import contextmanager

import ray
from ray.experimental.sandbox.backend.base import BaseSandboxBackend, ExecResult, SandboxStatus
from ray.experimental.sandbox.config import SandboxConfig, parse_memory_bytes
from ray.experimental.sandbox.exceptions import (SandboxCreationError, SandboxError,
                                                 SandboxExecError, SandboxNotFoundError,
                                                 SandboxTimeoutError)

from deltabox.client.sync import Client
from deltabox.errors import (DeadlineExceeded, DeltaboxError, ImageNotFound, InvalidArgument,
                             SandboxNotFound)
from deltabox.ray import routing
from deltabox.ray.node import SLOTS
from deltabox.types import SandboxState

__all__ = ["DeltaBoxSandboxBackend", "DeltaBoxSandbox", "create"]

_STATUS = {SandboxState.CREATING: SandboxStatus.PENDING,
           SandboxState.RUNNING: SandboxStatus.RUNNING,
           SandboxState.STOPPED: SandboxStatus.TERMINATED,
           SandboxState.BROKEN: SandboxStatus.ERROR}
_NETWORKS = {"none": "none", "public": "nat"}


@contextmanager
def _as_ray_errors(kind: type[SandboxError], what: str):
    """DeltaBox errors as Ray's sandbox exceptions (the DeltaBox one as the cause)."""
    try:
        yield
    except SandboxNotFound as e:
        raise SandboxNotFoundError(f"{what}: {e}") from e
    except DeadlineExceeded as e:
        raise SandboxTimeoutError(f"{what}: {e}") from e
    except DeltaboxError as e:
        raise kind(f"{what}: {e}") from e


class _DaemonImages:
    """The backend's image manager: images are the daemon's (imported beforehand)."""

    def __init__(self, client: Client):
        self.client = client

    def pull_image(self, image: str, timeout_seconds: float = 120.0) -> str:
        if image not in {i.name for i in self.client.list_images()}:
            raise ImageNotFound(f"no image {image!r} in this node's deltabox daemon: import "
                                "it first (SandboxPool.import_image)")
        return image


class DeltaBoxSandboxBackend(BaseSandboxBackend):
    """Ray's sandbox backend contract over a deltabox daemon (default: this node's), with
    checkpoint, rollback and fork."""

    def __init__(self, client: Client | None = None):
        self.client = client or routing.connection(ray.get_runtime_context().get_node_id())
        super().__init__(image_manager=_DaemonImages(self.client))
        self._configs: dict[str, SandboxConfig] = {}

    def create_sandbox(self, config: SandboxConfig) -> str:
        refused = [name for name, given in (("ttl_seconds", config.ttl_seconds),
                                            ("dns", config.dns),
                                            ("capabilities", config.capabilities)) if given]
        if refused or config.network not in _NETWORKS:
            raise SandboxCreationError(
                f"the DeltaBox backend does not support {', '.join(refused) or 'network'}"
                f"{'' if config.network in _NETWORKS else f' {config.network!r}'} (networks: "
                f"{sorted(_NETWORKS)})")
        with _as_ray_errors(SandboxCreationError, f"creating a sandbox of {config.image!r}"):
            self.image_manager.pull_image(config.image)
            sbx = self.client.create(config.image, memory=parse_memory_bytes(config.memory) or 0,
                                     cpus=float(config.cpu or 0.0), env=dict(config.env),
                                     network=_NETWORKS[config.network])
        self._configs[sbx.id] = config
        return sbx.id

    def adopt(self, sandbox_id: str, config: SandboxConfig) -> str:
        """Take charge of an existing sandbox (a fork's child) with `config`."""
        with _as_ray_errors(SandboxNotFoundError, f"sandbox {sandbox_id}"):
            self.client.get(sandbox_id)
        self._configs[sandbox_id] = config
        return sandbox_id

    def config(self, sandbox_id: str) -> SandboxConfig:
        if sandbox_id not in self._configs:
            raise SandboxNotFoundError(f"Sandbox '{sandbox_id}' not found or already deleted.")
        return self._configs[sandbox_id]

    def delete_sandbox(self, sandbox_id: str) -> None:
        with _as_ray_errors(SandboxError, f"deleting sandbox {sandbox_id}"):
            self.client.get(sandbox_id).destroy()
        self._configs.pop(sandbox_id, None)

    def exec_command(self, sandbox_id, command, timeout=None, cwd=None, env=None, shell=None,
                     user=None) -> ExecResult:
        if user is not None:
            raise SandboxExecError("the DeltaBox backend runs commands as the sandbox's root "
                                   "(user= is not supported)")
        config = self.config(sandbox_id)
        argv = [shell or config.shell, "-c", command] if isinstance(command, str) else command
        with _as_ray_errors(SandboxExecError, f"exec in sandbox {sandbox_id}"):
            r = self.client.get(sandbox_id).exec(argv, env=env, cwd=cwd or config.workdir or "",
                                                 timeout=timeout or 0)
        if r.timed_out:
            raise SandboxTimeoutError(f"command timed out after {timeout}s in {sandbox_id}")
        return ExecResult(r.exit_code, r.stdout.decode(errors="replace"),
                          r.stderr.decode(errors="replace"), r.duration)

    def write_file(self, sandbox_id, path, content, append=False) -> None:
        with _as_ray_errors(SandboxExecError, f"writing {path} in sandbox {sandbox_id}"):
            self.client.get(sandbox_id).write_file(path, content, append=append,
                                                   make_parents=True)

    def read_file(self, sandbox_id, path) -> bytes:
        with _as_ray_errors(SandboxExecError, f"reading {path} in sandbox {sandbox_id}"):
            return self.client.get(sandbox_id).read_file(path)

    def get_status(self, sandbox_id) -> SandboxStatus:
        try:
            return _STATUS.get(self.client.get(sandbox_id).info.state, SandboxStatus.ERROR)
        except SandboxNotFound:
            return SandboxStatus.TERMINATED

    # ---- what DeltaBox adds ---------------------------------------------------------------

    def checkpoint(self, sandbox_id: str, label: str = "", full: bool = False) -> str:
        """A checkpoint of the sandbox (files; with `full`, its processes too): its id."""
        with _as_ray_errors(SandboxExecError, f"checkpoint of sandbox {sandbox_id}"):
            return self.client.get(sandbox_id).checkpoint(label, full=full).id

    def rollback(self, sandbox_id: str, checkpoint_id: str) -> str:
        """Back to a checkpoint of the sandbox's tree: the rollback path taken."""
        with _as_ray_errors(SandboxExecError, f"rollback of sandbox {sandbox_id}"):
            return str(self.client.get(sandbox_id).rollback(checkpoint_id).path)

    def fork(self, checkpoint_id: str, n: int = 1) -> list[str]:
        """n new sandboxes from a checkpoint on this daemon: their ids (all or an error)."""
        with _as_ray_errors(SandboxCreationError, f"fork of {checkpoint_id}"):
            res = self.client.fork(checkpoint_id, n)
            made = [c.sandbox for c in res if c.sandbox is not None]
            failed = [c.error for c in res if c.error is not None]
            if failed:
                for sbx in made:
                    sbx.destroy()
                raise failed[0]
        return [s.id for s in made]


class _DeltaBoxSandboxActor:
    """Ray's `Sandbox` actor, on DeltaBox: same constructor and methods, plus
    `checkpoint`, `rollback` and `fork` (children are new actors on the same node)."""

    def __init__(self, image: str, cpu=None, memory=None, env=None, workdir=None,
                 ttl_seconds=None, timeout_seconds: float = 30.0, rootless: bool = True,
                 network: str = "none", dns=None, capabilities=None, readonly: bool = True,
                 _adopt: str = "", **kwargs):
        self.backend = DeltaBoxSandboxBackend()
        self.config = SandboxConfig(image=image, cpu=cpu or 0.0, memory=memory or 0,
                                    env=env or {}, workdir=workdir, ttl_seconds=ttl_seconds,
                                    timeout_seconds=timeout_seconds, rootless=rootless,
                                    network=network, dns=dns, capabilities=capabilities,
                                    readonly=readonly, **kwargs)
        self.instance_id = (self.backend.adopt(_adopt, self.config) if _adopt
                            else self.backend.create_sandbox(self.config))

    def get_instance_id(self) -> str:
        return self.instance_id

    def get_node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def get_config(self) -> SandboxConfig:
        return self.backend.config(self.instance_id)

    def exec(self, command, timeout=None, cwd=None, env=None, shell=None) -> ExecResult:
        return self.backend.exec_command(self.instance_id, command, timeout=timeout, cwd=cwd,
                                         env=env, shell=shell)

    def upload_file(self, local_path: str, remote_path: str) -> None:
        with open(local_path, "rb") as f:
            self.backend.write_file(self.instance_id, remote_path, f.read())

    def download_file(self, remote_path: str, local_path: str) -> None:
        data = self.backend.read_file(self.instance_id, remote_path)
        with open(local_path, "wb") as f:
            f.write(data)

    def write_file(self, path: str, content) -> None:
        self.backend.write_file(self.instance_id, path, content)

    def read_file(self, path: str) -> bytes:
        return self.backend.read_file(self.instance_id, path)

    def get_status(self) -> SandboxStatus:
        return self.backend.get_status(self.instance_id)

    def delete(self) -> None:
        self.backend.delete_sandbox(self.instance_id)

    terminate = delete

    def checkpoint(self, label: str = "", full: bool = False) -> str:
        return self.backend.checkpoint(self.instance_id, label, full)

    def rollback(self, checkpoint_id: str) -> str:
        return self.backend.rollback(self.instance_id, checkpoint_id)

    def fork(self, checkpoint_id: str, n: int = 1) -> list:
        """n sandboxes from a checkpoint of this one, each its own actor on this node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ids = self.backend.fork(checkpoint_id, n)
        here = NodeAffinitySchedulingStrategy(self.get_node_id(), soft=False)
        c = self.config
        return [DeltaBoxSandbox.options(scheduling_strategy=here, resources={SLOTS: 1},
                                        num_cpus=0).remote(
            c.image, c.cpu, c.memory, c.env, c.workdir, None, c.timeout_seconds, c.rootless,
            c.network, None, None, c.readonly, _adopt=child, shell=c.shell) for child in ids]


DeltaBoxSandbox = ray.remote(_DeltaBoxSandboxActor)


def create(image: str, cpu: float | None = None, memory=None, env=None, workdir=None,
           network: str = "none", resources: dict | None = None, **kwargs):
    """`ray.experimental.sandbox.create` on DeltaBox: a `DeltaBoxSandbox` actor holding one
    `deltabox_slots` of a node with a daemon (plus `cpu` / `memory` / `resources` as Ray's
    create reserves them)."""
    opts: dict = {"resources": {SLOTS: 1, **(resources or {})}, "num_cpus": 0}
    if cpu is not None and cpu >= 0:
        opts["num_cpus"] = cpu
    mem = parse_memory_bytes(memory) if memory is not None else None
    if mem:
        opts["memory"] = mem
    if not isinstance(image, str) or not image:
        raise InvalidArgument("image must be the name of an image imported into the daemons")
    return DeltaBoxSandbox.options(**opts).remote(image, cpu, memory, env, workdir,
                                                  network=network, **kwargs)
