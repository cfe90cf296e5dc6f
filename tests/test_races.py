"""Lifecycle calls racing the calls that use a sandbox.

A destroy or a rollback takes the sandbox's lifecycle lock; exec, session and file
calls do not. These tests run such calls from threads while the lifecycle call
happens and check what a client may rely on: no call hangs, every failure is a
clean gRPC status (never INTERNAL or UNKNOWN), nothing runs in a destroyed
sandbox (its cgroups are empty, read from /proc), and after a rollback every call
started later sees the checkpoint's incarnation. Also: a squash of a deep chain
racing rollbacks, a fork and a delete.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

import deltabox
from conftest import TINY_TAR, store_instance
from deltabox.host.cgroups import instance_processes
from observing import live_init
from waiting import wait_for

CLEAN = (deltabox.NotFound, deltabox.FailedPrecondition)


class Hammer:
    """Threads that call exec, a session and the file API in a loop until stopped;
    each outcome is kept ("ok" or the exception)."""

    def __init__(self, sbx, with_session: bool = True):
        self.sbx, self.stop = sbx, threading.Event()
        self.outcomes: list = []
        self.session = sbx.open_session("sh", name="hammer") if with_session else None
        self.threads = [threading.Thread(target=self._loop, args=(k,), daemon=True)
                        for k in ("exec", "session", "file") if k != "session" or with_session]

    def _loop(self, kind: str) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                if kind == "exec":
                    r = self.sbx.exec(["sh", "-c", f"echo {n} > /tmp/exec-{n}; cat /tmp/exec-{n}"])
                    assert r.stdout == f"{n}\n".encode() or r.signal, r
                elif kind == "session":
                    self.session.run(f"echo {n}")
                else:
                    self.sbx.write_file(f"/tmp/file-{n}", str(n))
                    assert self.sbx.read_file(f"/tmp/file-{n}") == str(n).encode()
                self.outcomes.append((kind, "ok"))
            except deltabox.DeltaboxError as e:
                self.outcomes.append((kind, e))
            except AssertionError as e:
                self.outcomes.append((kind, e))

    def __enter__(self):
        for t in self.threads:
            t.start()
        wait_for(lambda: len(self.outcomes) >= 6, "the calls to run")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        hung = [t for t in self.threads if t.is_alive()]
        assert not hung, f"{len(hung)} call(s) hung"

    def unclean(self, allowed=CLEAN) -> list:
        return [(k, o) for k, o in self.outcomes if o != "ok" and not isinstance(o, allowed)]


def test_destroy_racing_exec_session_and_file_calls(new_daemon):
    """Destroy while exec, session and file calls run: each either completes or fails
    with NOT_FOUND / FAILED_PRECONDITION; afterwards no process of the sandbox exists
    and every call (an exec above all) is refused."""
    d = new_daemon().start()
    instance = store_instance(d.state_dir)
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        for _ in range(5):
            sbx = c.create("tiny")
            with Hammer(sbx) as h:
                time.sleep(0.1)          # calls in every phase (spawned, streaming, done)
                sbx.destroy()
                # nothing runs in the destroyed sandbox, nor starts there afterwards
                wait_for(lambda: not instance_processes(instance),
                         "the sandbox's processes to go")
                after = len(h.outcomes)
                wait_for(lambda: len(h.outcomes) > after + 6, "calls after the destroy")
                assert not instance_processes(instance), "a call ran in a destroyed sandbox"
            assert not h.unclean(), h.unclean()[:5]
            late = [o for _, o in h.outcomes[after:]]
            assert all(isinstance(o, deltabox.NotFound) for o in late), late[:5]
    assert d.stop() == 0


@pytest.mark.parametrize("full", [False, True], ids=["fs", "full"])
def test_rollback_racing_exec_session_and_file_calls(new_daemon, full):
    """Rollbacks while exec, session and file calls run: no call hangs, a call cut by
    the rollback fails cleanly (its incarnation is gone), and calls started after the
    rollback returned run in the checkpoint's incarnation -- not in the old one."""
    d = new_daemon().start()
    instance = store_instance(d.state_dir)
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.write_file("/state", "at-checkpoint")
        ckpt = sbx.checkpoint("base", full=full)
        with Hammer(sbx, with_session=not full) as h:
            old = live_init(d.state_dir, sbx)
            for _ in range(5):
                sbx.write_file("/state", "mutated")
                sbx.rollback(ckpt)
                # calls started now run in the new incarnation (live_init: the exec's
                # pid namespace is the init's), and the old one is gone
                init = live_init(d.state_dir, sbx)
                assert init != old
                assert sbx.read_file("/state") == b"at-checkpoint"
                wait_for(lambda: old not in instance_processes(instance), "the old init to go")
                old = init
                time.sleep(0.1)
        # a call cut by the rollback may fail, cleanly; nothing else
        assert not h.unclean(), sorted({(k, type(o).__name__, str(o)[:90]) for k, o in h.unclean()})
        assert sum(o == "ok" for _, o in h.outcomes) > 10
        sbx.destroy()
    assert d.stop() == 0


def _snapshot(sbx) -> str:
    return sbx.exec(["sh", "-c", "cat /work/counter; ls /work | sort | tr '\\n' ' '; "
                     "ls /work/many | wc -l"]).check().stdout.decode()


def test_squash_racing_rollback_fork_and_delete(new_daemon):
    """A chain deeper than max_chain_depth (32) is squashed in the background; while the
    squash runs (its first layer holds 8000 entries: it takes a while), the sandbox
    rolls back along the chain, the chain is forked and the squashed checkpoint deleted.
    Every call succeeds or fails cleanly, and afterwards every checkpoint still
    restores its own files (rollbacks and fork children read them back)."""
    d = new_daemon().start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sh", "-c", "mkdir -p /work/many && cd /work/many && "
                  "seq 8000 | xargs touch"]).check()
        cks, snaps = [], {}
        for i in range(33):
            sbx.exec(["sh", "-c", f"echo {i} > /work/counter; echo {i} > /work/f{i}; "
                      f"rm -f /work/f{i - 4}"]).check()
            cks.append(sbx.checkpoint(f"n{i}"))
            if i in (0, 2, 15, 20, 30, 31, 32):
                snaps[i] = _snapshot(sbx)
        # the squash of the 33rd (a chain deeper than 32) starts now, in the background
        errors: list = []

        def guarded(fn):
            def run():
                try:
                    fn()
                except deltabox.DeltaboxError as e:
                    errors.append(e)
            return threading.Thread(target=run)

        def rollbacks():
            for i in (20, 32, 2, 31):
                sbx.rollback(cks[i])
                assert _snapshot(sbx) == snaps[i], f"rollback to {i} during the squash"
            sbx.rollback(cks[10])
            c.delete_checkpoint(cks[32])  # the deepest, maybe under its squash

        children = []

        def fork():
            children.extend(c.fork(cks[31], 2))
        threads = [guarded(rollbacks), guarded(fork)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a call hung"
        assert not [e for e in errors if not isinstance(e, CLEAN)], errors
        assert not errors, errors   # none of these has a reason to fail
        for child in children:
            assert child.error is None, child.error
            assert _snapshot(child.sandbox) == snaps[31]
            child.sandbox.destroy()
        assert cks[32].id not in {k.id for k in sbx.checkpoints()}
        # the squash ended (the log says so) and every remaining checkpoint restores
        wait_for(lambda: "checkpoint.squashed" in d.log_path.read_text(errors="replace"),
                 "the squash to finish", timeout=60)
        for i in (31, 0, 30, 15):
            sbx.rollback(cks[i])
            assert _snapshot(sbx) == snaps[i], f"rollback to {i} after the squash"
        sbx.destroy()
    assert d.stop() == 0


# ---- layers freed under the operations that read them -----------------------------------

def test_layer_gc_never_deletes_a_layer_committed_meanwhile(tmp_path):
    """Layers are committed (their dir renamed in, inside the transaction that records
    them) while other threads delete the layer dirs no row refers to -- as 64 sandboxes
    checkpointing while others are destroyed or their checkpoints deleted do. No recorded
    layer may lose its directory (a later rollback to it failed with FileNotFoundError on
    layers/l-...), and two clean-ups at once must not trip over each other."""
    from deltabox.store.metadata import Store

    (tmp_path / "store").mkdir()
    store = Store(tmp_path / "store")
    failures: list = []

    def commit_layers(worker: int) -> None:
        try:
            for i in range(150):
                layer = store.new_tmp_dir() / "layer"
                layer.mkdir()
                (layer / "file").write_text(f"{worker}-{i}")
                # its commit ends with the clean-up of unreferenced layer dirs
                store.commit_image(f"img-{worker}-{i}", [layer], "test", "dir")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=commit_layers, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not failures, failures
        rows = [lid for image in store.list_images() for lid in image.layer_ids]
        assert len(rows) == 600
        gone = [lid for lid in rows if not store.layer_path(lid).is_dir()]
        assert not gone, f"{len(gone)} recorded layers lost their directories"
    finally:
        store.close()


def _lost_layers(d) -> list[str]:
    """Layers a record mounts (a checkpoint's chain, a branch's lower) whose directory is
    gone: read from the store's database and layer directory, as they are on disk."""
    store = d.state_dir / "store"
    db = sqlite3.connect(f"file:{store / 'meta.db'}?mode=ro", uri=True)
    try:
        ids = {lid for (chain,) in db.execute("SELECT mount FROM checkpoints")
               for lid in json.loads(chain)}
        ids |= {lid for (chain,) in db.execute("SELECT lower FROM branches")
                for lid in json.loads(chain)}
    finally:
        db.close()
    return sorted(lid for lid in ids if not (store / "layers" / lid).is_dir())


def test_squash_frees_no_layer_a_warm_pool_or_rollback_still_uses(new_daemon):
    """A squash rebases a checkpoint on a shorter chain and frees the old chain's layers
    nothing records any more. A warm pool built on the old chain must not be adopted by
    a later fork (its children would run over freed layers), and the rollbacks racing the
    squash -- each read the chain before it ended -- must not lose their layers. Every
    call succeeds; every child and rollback sees the checkpoint's files; no record mounts
    a layer that is gone."""
    d = new_daemon(extra_args=("--max-chain-depth", "4")).start()
    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sh", "-c", "mkdir -p /work/many && cd /work/many && "
                  "seq 20000 | xargs touch"]).check()  # the squash takes a while
        cks, snaps = [], {}
        for i in range(4):  # the image's layer + 4: deeper than 4, squashed in the back
            sbx.exec(["sh", "-c", f"echo {i} > /work/counter; echo {i} > /work/f{i}"]).check()
            cks.append(sbx.checkpoint(f"n{i}"))
            snaps[i] = _snapshot(sbx)
        deep, old_chain = cks[3], cks[3].layer_ids
        assert len(old_chain) == 5
        assert c.warm(deep, 2, wait=True) == 2  # on the chain before the squash
        errors: list = []
        squashed = threading.Event()

        def rollbacks():  # back and forth: the sandbox's head leaves the deep chain
            try:
                while not squashed.is_set():
                    for i in (0, 3):
                        sbx.rollback(cks[i])
                        assert _snapshot(sbx) == snaps[i], f"rollback to {i}"
            except (deltabox.DeltaboxError, AssertionError) as e:
                errors.append(e)
        assert [k.layer_ids for k in sbx.checkpoints() if k.id == deep.id] == [old_chain], \
            "the squash ended before the pool was built (make it slower)"
        t = threading.Thread(target=rollbacks)
        t.start()
        try:
            wait_for(lambda: [k.layer_ids for k in sbx.checkpoints()
                              if k.id == deep.id] != [old_chain], "the squash", timeout=120)
        finally:
            squashed.set()
            t.join(120)
        assert not t.is_alive(), "a rollback hung"
        assert not errors, errors
        # Off the deep chain (only `deep`'s records held its old layers), then a second
        # deep chain: its squash frees the first one's old layers.
        sbx.rollback(cks[0])
        freed = old_chain[-1]  # `deep`'s own layer: no other checkpoint mounts it
        for i in range(5):
            sbx.exec(["sh", "-c", f"echo again {i} > /work/again"]).check()
            sbx.checkpoint(f"again{i}")
        layers = d.state_dir / "store" / "layers"
        wait_for(lambda: not (layers / freed).exists(),
                 "the second squash to free the first chain's old layer", timeout=120)
        children = c.fork(deep, 3)  # the warm pool was built on those
        for child in children:
            assert child.error is None, child.error
            assert _snapshot(child.sandbox) == snaps[3], "a fork child of the squashed chain"
        assert not _lost_layers(d)
        for child in children:
            child.sandbox.destroy()
        sbx.destroy()
    assert d.stop() == 0



def test_a_layer_gone_under_a_call_is_not_found_not_internal(tmp_path):
    """Should a file of the store still vanish under a call (a FileNotFoundError that
    reached the interceptor), the client gets NOT_FOUND -- it may retry, or the object
    is gone -- never INTERNAL, and no host path of the store."""
    import grpc

    from deltabox.server.interceptors import ErrorReporter

    store = tmp_path / "store"
    gone = store / "layers" / "l-0123456789ab"
    exc = FileNotFoundError(2, "No such file or directory", str(gone))
    code, message = ErrorReporter(host_paths=(store,)).status(exc, "Rollback")
    assert code == grpc.StatusCode.NOT_FOUND, (code, message)
    assert str(store) not in message and "<store>/layers/l-0123456789ab" in message, message
