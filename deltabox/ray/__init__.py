"""`deltabox.ray`: sandboxes over the nodes of a Ray cluster (`pip install deltabox[ray]`).

    import deltabox.ray
    pool = deltabox.ray.SandboxPool.start()        # or .connect() once they run
    sbxs = pool.create("tiny", 256)                 # placed by free `deltabox_slots`
    ckpt = sbxs[0].checkpoint(full=True)
    kids = pool.fork(ckpt, 8, node=other_node)      # moved there, then forked

The package, module by module:
    node.py      one daemon per node: the `NodeDaemon` actor (pinned to its node) that
                 starts and supervises it, or publishes the installed service
    routing.py   node id -> a cached TLS + token client on that node's daemon; NodeLost
    handles.py   PoolSandbox / PoolCheckpoint: picklable handles, routed per call
    pool.py      SandboxPool: placement, fork across nodes, batched calls per node
    backend.py   a DeltaBox backend for Ray's own `ray.experimental.sandbox` API, with
                 checkpoint, rollback and fork added
    errors.py    NodeLost

Ray is imported lazily: `import deltabox` and `import deltabox.ray` never need it; the
calls that talk to the cluster do. docs/scale-out.md has the topology and the numbers.
"""

from __future__ import annotations

import importlib

__all__ = ["SandboxPool", "PoolSandbox", "PoolCheckpoint", "NodeLost", "NodeDaemonConfig",
           "Endpoint", "start_node_daemons", "SLOTS", "DeltaBoxSandboxBackend",
           "DeltaBoxSandbox", "create"]

_WHERE = {
    "SandboxPool": "pool", "PoolSandbox": "handles", "PoolCheckpoint": "handles",
    "NodeLost": "errors", "NodeDaemonConfig": "node", "Endpoint": "node",
    "start_node_daemons": "node", "SLOTS": "node", "DeltaBoxSandboxBackend": "backend",
    "DeltaBoxSandbox": "backend", "create": "backend",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'deltabox.ray' has no attribute {name!r}")
    return getattr(importlib.import_module(f"deltabox.ray.{_WHERE[name]}"), name)
