"""deltabox.ray on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

Each node runs its own daemon, started by its `NodeDaemon` actor: its own state dir, XFS
store, socket, TCP port, certificate and token. Nothing is mocked: the handles reach the
daemons over TCP + TLS + token from the driver and from Ray tasks and actors on either
node. The module shares one cluster (starting one takes ~10 s); the killed-daemon test
runs last and restarts what it killed.
"""

from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: `pip install 'deltabox[ray]'` (or `make venv`, whose "
    "test extra includes it) -- tests/test_ray.py needs it")

import deltabox  # noqa: E402
from deltabox.ray import NodeLost  # noqa: E402
from deltabox.ray.local import LocalCluster  # noqa: E402
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,  # noqa: E402
                                            PlacementGroupSchedulingStrategy)
from conftest import TINY_TAR  # noqa: E402
from waiting import wait_for  # noqa: E402

SLOTS = 8


@pytest.fixture(scope="module")
def pool():
    # Only the second node has `accelerator`: a placement group asking for it lands there.
    lc = LocalCluster(2, slots=SLOTS, node_resources=[{}, {"accelerator": 1}],
                      images={"tiny": TINY_TAR})
    try:
        yield lc.__enter__().pool
    finally:
        left = lc.stop()
    assert set(left.values()) == {""}, f"the daemons left things behind: {left}"


@pytest.fixture(scope="module")
def nodes(pool):
    head = ray.get_runtime_context().get_node_id()
    other = next(n for n in pool.node_ids if n != head)
    return head, other


def on(node_id: str):
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def test_two_nodes_two_daemons(pool, nodes):
    eps = {n: ray.get(pool.daemon(n).endpoint.remote()) for n in nodes}
    assert len({ep.address for ep in eps.values()}) == 2
    assert len({ep.state_dir for ep in eps.values()}) == 2
    assert len({ep.pid for ep in eps.values()}) == 2
    for n in nodes:
        assert pool.capacity()[n] == (SLOTS, 0)


def test_placement_by_free_slots_pinned_and_by_placement_group(pool, nodes):
    head, other = nodes
    spread = pool.create("tiny", 4)
    assert sorted(s.node_id for s in spread) == sorted([head, head, other, other])
    # Free slots, not turns: with 2 more on `other`, the next 2 go to `head`.
    pinned = pool.create("tiny", 2, node=other)
    assert {s.node_id for s in pinned} == {other}
    assert {s.node_id for s in pool.create("tiny", 2)} == {head}
    assert pool.capacity() == {head: (SLOTS, 4), other: (SLOTS, 4)}

    # Co-location: the bundle asks for `accelerator`, which only `other` has.
    pg = ray.util.placement_group([{"accelerator": 1, "CPU": 0.1}])
    try:
        @ray.remote(num_cpus=0.1, resources={"accelerator": 1})
        class Learner:
            def node(self):
                return ray.get_runtime_context().get_node_id()
        learner = Learner.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0)).remote()
        near = pool.create("tiny", 1, placement_group=pg)[0]
        assert near.node_id == ray.get(learner.node.remote()) == other
    finally:
        ray.util.remove_placement_group(pg)
    for s in pool.sandboxes():
        s.destroy()
    assert pool.sandboxes() == []


def test_create_is_all_or_nothing(pool, nodes):
    from deltabox.ray import routing
    head, other = nodes
    routing.connection(other).import_image("only-there", TINY_TAR)
    # Spread over both nodes, the one on `head` fails: the one made on `other` is destroyed.
    with pytest.raises(deltabox.ImageNotFound, match="only-there"):
        pool.create("only-there", 2)
    assert pool.sandboxes() == []
    assert pool.create("only-there", 1, node=other)[0].destroy() is None


def test_a_handle_works_from_a_task_on_the_other_node(pool, nodes):
    head, other = nodes
    sbx = pool.create("tiny", 1, node=head)[0]

    @ray.remote(num_cpus=0)
    def step(sandbox, text):
        sandbox.write_file("/tmp/from-task", text)
        ckpt = sandbox.checkpoint("in-task")
        out = sandbox.exec("cat /tmp/from-task").stdout
        return ray.get_runtime_context().get_node_id(), out, ckpt

    where, out, ckpt = ray.get(step.options(scheduling_strategy=on(other)).remote(sbx, "hi"))
    assert where == other != sbx.node_id
    assert out == b"hi"
    assert ckpt.node_id == head
    sbx.write_file("/tmp/from-task", "changed")
    sbx.rollback(ckpt)
    assert sbx.read_file("/tmp/from-task") == b"hi"
    sbx.destroy()


def test_batched_calls_fan_out_per_node_in_order(pool, nodes):
    sbxs = pool.create("tiny", 6)
    assert {s.node_id for s in sbxs} == set(nodes)
    for i, s in enumerate(sbxs):
        s.write_file("/tmp/i", str(i))
    res = pool.exec_many([(s, "cat /tmp/i; echo; hostname") for s in sbxs])
    assert [r.unwrap().stdout.split()[0] for r in res] == [str(i).encode() for i in range(6)]
    assert [r.value.stdout.split()[1].decode() for r in res] == [s.name for s in sbxs]
    ckpts = pool.checkpoint_many(sbxs, "batch").values()
    assert [c.node_id for c in ckpts] == [s.node_id for s in sbxs]
    pool.exec_many([(s, "echo x > /tmp/i") for s in sbxs]).values()
    back = pool.rollback_many(list(zip(sbxs, ckpts)))
    assert all(item.ok for item in back)
    assert [s.read_file("/tmp/i") for s in sbxs] == [str(i).encode() for i in range(6)]
    for s in sbxs:
        s.destroy()


def _counter(sbx):
    """A process whose state is in its memory only: it writes its count each 50 ms."""
    sbx.exec("sh -c 'n=0; while :; do n=$((n+1)); echo $n > /tmp/n; sleep 0.05; done' "
             ">/dev/null 2>&1 &")
    return wait_for(lambda: count(sbx) > 3, "the counter runs")


def count(sbx) -> int:
    """What the counter wrote last (0: nothing yet)."""
    return int(sbx.exec("cat /tmp/n 2>/dev/null").stdout or 0)


def test_fork_on_its_node_and_on_the_other(pool, nodes):
    head, other = nodes
    sbx = pool.create("tiny", 1, node=head)[0]
    sbx.write_file("/data", "state of the parent")
    ckpt = sbx.checkpoint("fs")
    here = pool.fork(ckpt, 2)
    assert [c.sandbox.node_id for c in here] == [head, head]
    there = ckpt.fork(2, node=other)
    assert [c.sandbox.node_id for c in there] == [other, other]
    for child in (*here, *there):
        assert child.sandbox.read_file("/data") == b"state of the parent"
        child.sandbox.destroy()
    sbx.destroy()


def test_full_checkpoint_forks_on_the_other_node_with_its_processes(pool, nodes):
    head, other = nodes
    sbx = pool.create("tiny", 1, node=head)[0]
    _counter(sbx)
    ckpt = sbx.checkpoint("full", full=True, wait_ready=True)
    at_checkpoint = count(sbx)
    child = pool.fork(ckpt, 1, node=other)[0].sandbox
    assert child.node_id == other
    # The child's counter goes on from the checkpoint's count: the process moved, memory
    # and all (a restarted one would count from 1 again).
    seen = wait_for(lambda: (v := count(child)) > at_checkpoint and v,
                    "the child's counter goes on")
    assert seen < at_checkpoint + 200
    child.destroy()
    sbx.destroy()


def test_the_ray_sandbox_api_on_deltabox(pool, nodes):
    pytest.importorskip("ray.experimental.sandbox",
                        reason="this Ray has no sandbox API (ray.experimental.sandbox)")
    from deltabox.ray.backend import create
    from ray.experimental.sandbox import SandboxStatus
    box = create("tiny", shell="/bin/sh", readonly=False)
    assert ray.get(box.get_status.remote()) == SandboxStatus.RUNNING
    ray.get(box.write_file.remote("/tmp/f", "one"))
    ckpt = ray.get(box.checkpoint.remote("api"))
    ray.get(box.write_file.remote("/tmp/f", "two"))
    r = ray.get(box.exec.remote("cat /tmp/f"))
    assert (r.exit_code, r.stdout) == (0, "two")
    ray.get(box.rollback.remote(ckpt))
    assert ray.get(box.read_file.remote("/tmp/f")) == b"one"
    kids = ray.get(box.fork.remote(ckpt, 2))
    assert [ray.get(k.exec.remote("cat /tmp/f")).stdout for k in kids] == ["one", "one"]
    assert {ray.get(k.get_node_id.remote()) for k in kids} == {ray.get(box.get_node_id.remote())}
    for k in (*kids, box):
        ray.get(k.delete.remote())
    assert ray.get(box.get_status.remote()) == SandboxStatus.TERMINATED


def test_bench_ray_measures_every_way_on_the_cluster(pool, nodes):
    """`deltabox bench ray`'s parts, small, on this module's cluster."""
    from deltabox.bench.ray import WAYS, forks, overhead, scale
    rows = overhead(pool, 5, lambda msg: None)
    assert [r["name"] for r in rows] == list(WAYS)
    assert all(r["n"] == 5 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
    assert rows[0]["over_baseline_p50_ms"] == 0
    fork_rows = forks(pool, 1, lambda msg: None)
    assert {r["name"] for r in fork_rows} == {f"fork {m}, {w}" for m in ("fs", "full")
                                              for w in ("same node", "other node")}
    doc = scale(pool, 4, 2, lambda msg: None)
    assert doc["per_node"] == [2, 2]
    assert [r["name"] for r in doc["rows"]] == ["create", "step (exec)", "checkpoint (fs)",
                                                "rollback"]
    assert all(sum(mix.values()) == 4 for mix in doc["rollback_paths"].values())
    assert pool.sandboxes() == []


def test_a_killed_daemon_fails_its_handles_clearly_and_the_pool_goes_on(pool, nodes, tmp_path):
    head, other = nodes
    doomed = pool.create("tiny", 1, node=other)[0]
    alive = pool.create("tiny", 1, node=head)[0]
    doomed.write_file("/data", "saved before the crash")
    _counter(doomed)
    ckpt = doomed.checkpoint("before", full=True, wait_ready=True)
    saved = tmp_path / "before.dbx"
    pool.export_checkpoint(ckpt, saved)

    actor = pool.daemon(other)
    ep = ray.get(actor.endpoint.remote())
    os.kill(ep.pid, signal.SIGKILL)
    wait_for(lambda: not ray.get(actor.health.remote())["alive"], "the daemon is seen dead")

    with pytest.raises(NodeLost) as err:
        doomed.exec("true")
    assert other[:12] in str(err.value) and ep.address in str(err.value)
    assert str(ep.pid) in str(err.value) and err.value.node_id == other
    assert isinstance(err.value, deltabox.Unavailable)
    # The rest of the pool goes on: placement skips the lost node, batches fail only there.
    assert pool.create("tiny", 1)[0].node_id == head
    res = pool.exec_many([(alive, "echo ok"), (doomed, "echo no")])
    assert res[0].unwrap().stdout == b"ok\n"
    assert isinstance(res[1].error, NodeLost)
    # The checkpoint exported before the crash forks on the live node, processes and all.
    moved = pool.import_checkpoint(saved, node=head)
    child = pool.fork(moved, 1)[0].sandbox
    assert child.node_id == head
    assert child.read_file("/data") == b"saved before the crash"
    at_export = count(child)
    wait_for(lambda: count(child) > at_export, "the moved counter goes on")

    # Its actor restarts it on the same store, port and token: the old handles work again.
    ray.get(actor.restart.remote())
    assert doomed.exec("cat /data").stdout == b"saved before the crash"
    for s in pool.sandboxes():
        s.destroy()
