"""Pool handles: `PoolSandbox` and `PoolCheckpoint`, small picklable values that any Ray
worker can pass around and use.

A `PoolSandbox` is (node id, SandboxInfo). Its methods are the blocking client's sandbox
methods (`exec`, `checkpoint`, `rollback`, `read_file`, `write_file`, `destroy`, ...:
generated from the same operation table, so they take the same arguments), each routed
to the owning node's daemon through the process's cached connection (`routing.py`). A
daemon that cannot be reached raises `NodeLost`. Checkpoints come back as
`PoolCheckpoint` (node id + CheckpointInfo; its attributes read through to the info), so
`SandboxPool.fork` knows where one lives.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from deltabox.client.operations import operations_of
from deltabox.client.results import CheckpointInfo, SandboxInfo
from deltabox.client.sync import Sandbox
from deltabox.errors import Unavailable
from deltabox.ray import routing

__all__ = ["PoolSandbox", "PoolCheckpoint"]


@dataclass(frozen=True)
class PoolCheckpoint:
    """A checkpoint and the node whose daemon holds it. Reads through to `info`
    (`.id`, `.mode`, `.label`, ...)."""
    node_id: str
    info: CheckpointInfo

    def __getattr__(self, name: str):
        if name.startswith("__") or "info" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["info"], name)

    def __repr__(self) -> str:
        return f"<PoolCheckpoint {self.info.id} ({self.info.mode}) on {self.node_id[:12]}>"

    def fork(self, n: int = 1, *, node: str | None = None):
        """n sandboxes from it: on its node, or on `node` after it was sent there
        (`SandboxPool.fork`)."""
        from deltabox.ray.pool import SandboxPool
        return SandboxPool([self.node_id, *([node] if node else [])]).fork(self, n, node=node)


def plain(value):
    """What the client takes for a pool value: a CheckpointInfo for a PoolCheckpoint, an
    id for a PoolSandbox."""
    if isinstance(value, PoolCheckpoint):
        return value.info
    if isinstance(value, PoolSandbox):
        return value.id
    return value


def pooled(node_id: str, value):
    """A client result as the pool returns it (checkpoints tagged with their node)."""
    if isinstance(value, CheckpointInfo):
        return PoolCheckpoint(node_id, value)
    if isinstance(value, list) and value and isinstance(value[0], CheckpointInfo):
        return [PoolCheckpoint(node_id, c) for c in value]
    return value


class PoolSandbox:
    """A sandbox on one node of the pool; picklable (ids only), usable from any worker."""

    def __init__(self, node_id: str, info: SandboxInfo):
        self.node_id = node_id
        self.info = info

    id = property(lambda self: self.info.id)
    name = property(lambda self: self.info.name)

    def __repr__(self) -> str:
        return f"<PoolSandbox {self.info.id} {self.info.name!r} on {self.node_id[:12]}>"

    def __eq__(self, other) -> bool:
        return (isinstance(other, PoolSandbox) and other.node_id == self.node_id
                and other.id == self.id)

    def __hash__(self) -> int:
        return hash((self.node_id, self.id))

    def local(self) -> Sandbox:
        """The plain client's handle on this sandbox, over the process's cached
        connection (for what the pool does not route: sessions, shells)."""
        return Sandbox(routing.connection(self.node_id), self.info)

    def _call(self, name: str, args, kwargs):
        args = [plain(a) for a in args]
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        with routing.on_node(self.node_id) as client:
            sbx = Sandbox(client, self.info)
            out = getattr(sbx, name)(*args, **kwargs)
        self.info = sbx.info
        return pooled(self.node_id, out)

    def _stream(self, name: str, args, kwargs):
        with routing.on_node(self.node_id) as client:
            stream = getattr(Sandbox(client, self.info), name)(*args, **kwargs)
        try:
            yield from stream
        except Unavailable as e:
            raise routing.lost(self.node_id, e) from None


def _routed(op):
    if op.shape == "iter":
        def method(self, *args, **kwargs):
            return self._stream(op.name, args, kwargs)
    else:
        def method(self, *args, **kwargs):
            return self._call(op.name, args, kwargs)
    client_method = getattr(Sandbox, op.name)
    method.__name__ = op.name
    method.__qualname__ = f"PoolSandbox.{op.name}"
    method.__doc__ = client_method.__doc__
    method.__signature__ = inspect.signature(client_method)
    return method


# Every sandbox operation but the interactive shell (a bidirectional stream: use local()).
for _op in operations_of("sandbox"):
    if _op.shape != "shell":
        setattr(PoolSandbox, _op.name, _routed(_op))
