"""`SandboxPool`: sandboxes over the nodes of a Ray cluster, for trainers.

    pool = SandboxPool.connect()                  # the nodes whose NodeDaemon runs
    sbxs = pool.create("tiny", 64)                # placed by free capacity
    ckpt = sbxs[0].checkpoint(full=True)          # a PoolCheckpoint (knows its node)
    kids = pool.fork(ckpt, 4)                     # on ckpt's node
    far = pool.fork(ckpt, 4, node=other)          # sent to `other` first, then forked
    pool.exec_many([(s, "step") for s in sbxs])   # one batched call per node, concurrently

Placement (`create`): `node=` pins it; `placement_group=` (+ `bundle_index`) puts it on
the node of that bundle, i.e. next to the actor scheduled in it; otherwise each sandbox
goes to the node with the most free slots, free = the node's `deltabox_slots` resource
minus the sandboxes its daemon reports (`Status`), counting the ones placed by this call.

Batched calls (`exec_many`, `checkpoint_many`, `rollback_many`) split their items by
node, send one batched RPC per node, concurrently, and return one BatchResult in the
request's order. A lost node's items are `NodeLost` errors; the other nodes' items are
unaffected.

A pool is a list of node ids: picklable, and any worker may use it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

from deltabox.client.results import BatchItem, BatchResult, ForkChild, ForkResult
from deltabox.errors import AlreadyExists, DeltaboxError, InvalidArgument
from deltabox.ray import routing
from deltabox.ray.errors import NodeLost
from deltabox.ray.handles import PoolCheckpoint, PoolSandbox, plain, pooled
from deltabox.ray.node import (NAMESPACE, SLOTS, STARTED, NodeDaemonConfig, actor_name, daemon_nodes,
                               start_node_daemons)

__all__ = ["SandboxPool"]

log = structlog.get_logger("deltabox.ray.pool")

# Creates in flight per node during one `create` (the daemon runs them concurrently).
CREATE_CONCURRENCY = 4


def _has_daemon(node_id: str) -> bool:
    import ray
    try:
        ray.get_actor(actor_name(node_id), namespace=NAMESPACE)
        return True
    except ValueError:
        return False


class SandboxPool:
    """Sandboxes over the Ray nodes that run a deltabox daemon (see the module doc)."""

    def __init__(self, node_ids: list[str]):
        self.node_ids = list(node_ids)

    @classmethod
    def connect(cls) -> "SandboxPool":
        """The pool of the live nodes advertising `deltabox_slots` whose `NodeDaemon` runs
        (`start` or `deltabox.ray.start_node_daemons` started them)."""
        nodes = [n["NodeID"] for n in daemon_nodes() if _has_daemon(n["NodeID"])]
        if not nodes:
            raise NodeLost("no Ray node runs a deltabox daemon: start them with "
                           "SandboxPool.start() or deltabox.ray.start_node_daemons()")
        return cls(nodes)

    @classmethod
    def start(cls, config: NodeDaemonConfig = NodeDaemonConfig(), *,
              detached: bool = False) -> "SandboxPool":
        """Start a NodeDaemon on every node advertising `deltabox_slots`, then connect."""
        return cls(list(start_node_daemons(config, detached=detached)))

    def __repr__(self) -> str:
        return f"<SandboxPool of {len(self.node_ids)} nodes>"

    # ---- nodes ---------------------------------------------------------------------------

    def live_nodes(self) -> list[str]:
        """This pool's nodes that Ray reports alive (their daemon may still be dead)."""
        alive = {n["NodeID"] for n in daemon_nodes()}
        return [n for n in self.node_ids if n in alive]

    def capacity(self) -> dict[str, tuple[int, int]]:
        """{node: (slots, sandboxes)} of the live nodes whose daemon answers."""
        slots = {n["NodeID"]: int(n["Resources"].get(SLOTS, 0)) for n in daemon_nodes()}
        out = {}
        for node in self.live_nodes():
            try:
                with routing.on_node(node) as client:
                    out[node] = (slots.get(node, 0), client.status().sandboxes)
            except NodeLost as e:
                log.warning("ray.node_skipped", node=node[:12], error=str(e))
        return out

    def daemon(self, node_id: str):
        """The `NodeDaemon` actor of a node (health, restart, stop)."""
        import ray
        return ray.get_actor(actor_name(node_id), namespace=NAMESPACE)

    def stop(self) -> dict[str, str]:
        """Stop every node's daemon (its sandboxes end) and the actors: {node: leftovers}."""
        import ray
        out = {}
        for node in self.node_ids:
            try:
                actor = self.daemon(node)
                out[node] = ray.get(actor.stop.remote(), timeout=120)
                ray.kill(actor)
                STARTED.pop(node, None)
            except (ValueError, ray.exceptions.RayActorError) as e:
                out[node] = f"not stopped: {e}"
            routing.forget(node)
        return out

    # ---- placement -------------------------------------------------------------------------

    def _node_of_bundle(self, placement_group, bundle_index: int) -> str:
        import ray
        from ray.util.placement_group import placement_group_table
        ray.get(placement_group.ready(), timeout=60)
        where = placement_group_table(placement_group)["bundles_to_node_id"]
        if bundle_index not in where:
            raise InvalidArgument(f"the placement group has no bundle {bundle_index} "
                                  f"(it has {sorted(where)})")
        return where[bundle_index]

    def place(self, n: int, *, node: str | None = None, placement_group=None,
              bundle_index: int = 0) -> list[str]:
        """The node of each of n new sandboxes (see the module doc)."""
        if node is None and placement_group is not None:
            node = self._node_of_bundle(placement_group, bundle_index)
        if node is not None:
            if node not in self.node_ids:
                raise InvalidArgument(f"node {node[:12]} runs no deltabox daemon of this pool")
            return [node] * n
        cap = self.capacity()
        if not cap:
            raise NodeLost("no node of the pool has a reachable deltabox daemon")
        free = {node: slots - used for node, (slots, used) in cap.items()}
        out = []
        for _ in range(n):
            best = max(free, key=free.get)
            free[best] -= 1
            out.append(best)
        return out

    # ---- sandboxes ---------------------------------------------------------------------------

    def create(self, image: str, n: int = 1, *, node: str | None = None,
               placement_group=None, bundle_index: int = 0, **kwargs) -> list[PoolSandbox]:
        """n sandboxes of `image` (kwargs: as `Client.create`: memory, cpus, disk, env,
        ...), placed as the module doc says. All or nothing: if one fails, those created
        are destroyed and its error is raised."""
        nodes = self.place(n, node=node, placement_group=placement_group,
                           bundle_index=bundle_index)

        def one(node_id: str) -> PoolSandbox:
            with routing.on_node(node_id) as client:
                sbx = client.create(image, **kwargs)
            return PoolSandbox(node_id, sbx.info)

        workers = min(n, CREATE_CONCURRENCY * len(set(nodes))) or 1
        with ThreadPoolExecutor(workers) as ex:
            futures = [ex.submit(one, node_id) for node_id in nodes]
        made = [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            for sbx in made:
                try:
                    sbx.destroy()
                except DeltaboxError:
                    pass
            raise errors[0]
        return made

    def sandboxes(self) -> list[PoolSandbox]:
        """Every sandbox of the pool's reachable nodes."""
        out = []
        for node in self.live_nodes():
            try:
                with routing.on_node(node) as client:
                    out += [PoolSandbox(node, s.info) for s in client.list()]
            except NodeLost as e:
                log.warning("ray.node_skipped", node=node[:12], error=str(e))
        return out

    def import_image(self, name: str, source: str | os.PathLike, *,
                     replace: bool = False) -> dict[str, object]:
        """Import an image on every node (`source`: a path on each node, below its daemon's
        image dirs): {node: ImageInfo or the error}."""
        def one(node_id):
            with routing.on_node(node_id) as client:
                return client.import_image(name, source, replace=replace)
        return self._each_node(one)

    def _each_node(self, fn) -> dict:
        with ThreadPoolExecutor(len(self.node_ids) or 1) as ex:
            futures = {node: ex.submit(fn, node) for node in self.node_ids}
        return {node: f.exception() or f.result() for node, f in futures.items()}

    # ---- checkpoints across nodes ------------------------------------------------------------

    def fork(self, checkpoint: PoolCheckpoint, n: int = 1, *,
             node: str | None = None) -> ForkResult:
        """n sandboxes from `checkpoint`: on its own node, or on `node` after the checkpoint
        was sent there (`send_checkpoint`). A ForkResult of ForkChild(sandbox=PoolSandbox)."""
        target = node or checkpoint.node_id
        if target != checkpoint.node_id:
            checkpoint = self.send_checkpoint(checkpoint, target)
        with routing.on_node(target) as client:
            res = client.fork(checkpoint.info, n)
        return ForkResult((ForkChild(sandbox=PoolSandbox(target, c.sandbox.info))
                           if c.sandbox is not None else ForkChild(error=c.error)
                           for c in res), res.timings_ms)

    def send_checkpoint(self, checkpoint: PoolCheckpoint, node: str) -> PoolCheckpoint:
        """The checkpoint on `node` too (streamed daemon to daemon through this process,
        layers `node` already has skipped); it keeps its id. Already there: returned as is."""
        if node == checkpoint.node_id:
            return checkpoint
        try:
            with routing.on_node(checkpoint.node_id) as source, \
                    routing.on_node(node) as target:
                info = source.send_checkpoint(checkpoint.info, to=target)
        except AlreadyExists:
            return PoolCheckpoint(node, checkpoint.info)
        log.info("ray.checkpoint_sent", checkpoint=checkpoint.info.id,
                 source=checkpoint.node_id[:12], target=node[:12])
        return PoolCheckpoint(node, info)

    def export_checkpoint(self, checkpoint: PoolCheckpoint, out: str | os.PathLike, **kw):
        """Write the checkpoint to a file of this process's host (`Client.export_checkpoint`)."""
        with routing.on_node(checkpoint.node_id) as client:
            return client.export_checkpoint(checkpoint.info, out, **kw)

    def import_checkpoint(self, src: str | os.PathLike, *,
                          node: str | None = None) -> PoolCheckpoint:
        """Import an exported checkpoint (a file here) into `node` (default: the node with
        the most free slots); it can be forked there."""
        node = node or self.place(1)[0]
        with routing.on_node(node) as client:
            info = client.import_checkpoint(Path(src))
        return PoolCheckpoint(node, info)

    # ---- batched calls, one per node ----------------------------------------------------------

    def _fan_out(self, items: list, node_of, call) -> BatchResult:
        """Split `items` by node, `call(client, items_of_node)` per node concurrently (a
        BatchResult each), and merge back in order."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(node_of(item), []).append(i)
        out: list[BatchItem | None] = [None] * len(items)
        timings: dict[str, float] = {}

        def one(node_id: str, indexes: list[int]):
            try:
                with routing.on_node(node_id) as client:
                    res = call(client, [items[i] for i in indexes])
                for i, item in zip(indexes, res):
                    out[i] = BatchItem(value=pooled(node_id, item.value), error=item.error)
                timings.update({f"{node_id[:8]}.{k}": v for k, v in res.timings_ms.items()})
            except NodeLost as e:
                for i in indexes:
                    out[i] = BatchItem(error=e)

        with ThreadPoolExecutor(len(groups) or 1) as ex:
            for f in [ex.submit(one, node, idx) for node, idx in groups.items()]:
                f.result()
        return BatchResult(out, timings)

    def exec_many(self, items: list, **kwargs) -> BatchResult:
        """(PoolSandbox, cmd) pairs; kwargs as `Client.exec_many`. ExecResults in order."""
        return self._fan_out(items, lambda it: it[0].node_id,
                             lambda c, its: c.exec_many([(s.id, cmd) for s, cmd in its],
                                                        **kwargs))

    def checkpoint_many(self, sandboxes: list, label: str = "", full: bool = False,
                        **kwargs) -> BatchResult:
        """PoolCheckpoints (or errors) of many sandboxes, in order."""
        return self._fan_out(sandboxes, lambda s: s.node_id,
                             lambda c, its: c.checkpoint_many([s.id for s in its], label, full,
                                                              **kwargs))

    def rollback_many(self, items: list, **kwargs) -> BatchResult:
        """(PoolSandbox, PoolCheckpoint) pairs: RollbackResults in order (and each handle's
        info updated)."""
        res = self._fan_out(items, lambda it: it[0].node_id,
                            lambda c, its: c.rollback_many([(s.id, plain(k)) for s, k in its],
                                                           **kwargs))
        for (sbx, _), item in zip(items, res):
            if item.ok:
                sbx.info = item.value.sandbox
        return res
