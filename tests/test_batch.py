"""Batched calls (CheckpointMany, RollbackMany, ExecMany): one result or error per item, in
order; a failing item leaves the others alone; the effects are the single calls' effects."""

from __future__ import annotations

import pytest

import deltabox
from deltabox import SandboxNotFound


@pytest.fixture
def three(client):
    boxes = [client.create("tiny") for _ in range(3)]
    yield boxes
    for b in boxes:
        try:
            b.destroy()
        except deltabox.NotFound:
            pass


def test_checkpoint_many_mixed_items(client, three):
    for i, b in enumerate(three):
        b.write_file("/tmp/who", f"box {i}")
    res = client.checkpoint_many([three[0], "no-such-sandbox", three[1].id, three[2]],
                                 label="batch")
    assert [item.ok for item in res] == [True, False, True, True]
    assert isinstance(res[1].error, SandboxNotFound)
    with pytest.raises(SandboxNotFound):
        res[1].unwrap()
    with pytest.raises(SandboxNotFound):
        res.values()
    for item, box in zip((res[0], res[2], res[3]), three):
        ck = item.value
        assert ck.sandbox_id == box.id and ck.label == "batch"
        assert ck.id in {c.id for c in box.checkpoints()}
    assert res.timings_ms["total_ms"] > 0


def test_rollback_many_restores_files(client, three):
    cks = client.checkpoint_many(three).values()
    for b in three:
        b.exec("rm -f /bin/ls /etc/passwd && echo changed > /tmp/mark").check()
    res = client.rollback_many([*zip(three, cks), ("no-such-sandbox", cks[0])])
    assert [item.ok for item in res] == [True, True, True, False]
    assert isinstance(res[3].error, SandboxNotFound)
    for b in three:
        assert b.exec("test -e /bin/ls && test -s /etc/passwd && ! test -e /tmp/mark").ok
        assert b.info.state == "running"


def test_rollback_many_wrong_tree_is_its_own_error(client, three):
    a, b, _ = three
    ck_a, ck_b = client.checkpoint_many([a, b]).values()
    a.write_file("/tmp/x", "after")
    res = client.rollback_many([(a, ck_b), (a, ck_a)], concurrency=1)
    assert isinstance(res[0].error, deltabox.FailedPrecondition), res[0]
    assert res[1].ok
    with pytest.raises(deltabox.NotFound):
        a.stat("/tmp/x")


def test_exec_many_results_in_order(client, three):
    items = [(b, f"echo out-{i}; echo err-{i} >&2; exit {i}") for i, b in enumerate(three)]
    items.insert(1, ("no-such-sandbox", "true"))
    items.append((three[0], ["/no/such/binary"]))
    res = client.exec_many(items, concurrency=2)
    assert len(res) == 5
    assert isinstance(res[1].error, SandboxNotFound)
    assert isinstance(res[4].error, deltabox.NotFound)
    for slot, i in ((0, 0), (2, 1), (3, 2)):
        out = res[slot].value
        assert (out.exit_code, out.stdout, out.stderr) == (i, f"out-{i}\n".encode(),
                                                           f"err-{i}\n".encode())
        assert out.pid > 0


def test_batch_arguments_are_checked(client, tiny):
    with pytest.raises(deltabox.InvalidArgument):
        client.checkpoint_many([])
    with pytest.raises(deltabox.InvalidArgument):
        client.exec_many([(tiny, "true")], concurrency=1000)
    assert not tiny.checkpoints()  # nothing ran


async def test_async_client_batches(daemon, three):
    async with deltabox.AsyncClient(daemon.socket) as c:
        cks = (await c.checkpoint_many([b.id for b in three], full=False)).values()
        res = await c.exec_many([(b.id, "rm /bin/ls") for b in three])
        assert all(item.value.ok for item in res)
        res = await c.rollback_many(list(zip([b.id for b in three], cks)))
        assert all(item.ok for item in res)
    for b in three:
        assert b.exec("test -e /bin/ls").ok


def test_exec_many_runs_items_concurrently_up_to_the_bound(client, tiny):
    """A barrier of three execs on one sandbox: each waits until all three have started.
    With concurrency 3 they meet; with 2, the first two wait out their timeout before the
    third may start."""
    barrier = ("touch /tmp/b/$0; while [ $(ls /tmp/b | wc -l) -lt 3 ]; do sleep 0.05; done")

    def run(concurrency: int, timeout: float):
        tiny.exec("rm -rf /tmp/b; mkdir /tmp/b").check()
        items = [(tiny, ["/bin/sh", "-c", barrier, str(i)]) for i in range(3)]
        return [item.value for item in client.exec_many(items, concurrency=concurrency,
                                                       timeout=timeout)]
    assert [r.exit_code for r in run(3, 60)] == [0, 0, 0]
    assert [r.timed_out for r in run(2, 1.5)] == [True, True, False]


def test_exec_many_outputs_are_bounded_by_one_reply(new_daemon):
    """ExecMany holds every item's output until its one reply: their sum is bounded by what
    a reply may carry (the daemon's --max-message), not by items x max_output. Items past
    it fail in their slots with RESOURCE_EXHAUSTED; those before it keep their output."""
    from conftest import TINY_TAR
    d = new_daemon(extra_args=("--max-message", "4M")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        box = c.create("tiny")
        res = c.exec_many([(box, "head -c 1048576 /dev/zero")] * 8, concurrency=2)
        done = [r.value for r in res if r.error is None]
        over = [r.error for r in res if r.error is not None]
        assert done and over, res
        assert all(isinstance(e, deltabox.ResourceExhausted) for e in over), over
        assert all(out.stdout == b"\0" * (1 << 20) for out in done)
        assert len(done) <= 3  # 4 MiB x 0.9 holds three of them
        assert box.exec("echo ok").stdout == b"ok\n"  # the daemon is fine
        box.destroy()
