"""The dump side of DeltaCR: a checkpoint of a sandbox that did nothing since its head
checkpoint returns that checkpoint again, flagged `unchanged` (issue 10, target 8); any
file written, call run, or CPU used by one of its processes makes a new one.

Real daemons, real sandboxes: the frozen instant is compared by the daemon itself
(deltabox.core.incarnation.cpu_activity + the DumpGate's call count + the upper's walk).
"""

from __future__ import annotations

import time

import pytest
from waiting import wait_for


def _idle(sbx, seconds: float = 0.3) -> None:
    time.sleep(seconds)  # time passes; nothing in the sandbox runs


@pytest.mark.parametrize("full", [False, True], ids=["fs", "full"])
def test_idle_sandbox_gets_its_head_back(demo, full):
    py = demo.open_session("python", name="py")
    py.run("x = bytearray(1 << 20)")  # a live process holding memory, idle from now on
    first = demo.checkpoint("first", full=full)
    assert not first.unchanged
    for _ in range(3):
        _idle(demo)
        again = demo.checkpoint("again", full=full)
        assert again.unchanged, again
        assert again.id == first.id and again.label == "first"
    assert [c.id for c in demo.checkpoints()] == [first.id]
    assert py.run("print(len(x))").stdout.strip() == b"1048576"  # the session still works


@pytest.mark.parametrize("full", [False, True], ids=["fs", "full"])
def test_one_true_makes_a_new_checkpoint(demo, full):
    first = demo.checkpoint("first", full=full)
    demo.exec(["true"]).check()
    second = demo.checkpoint("second", full=full)
    assert not second.unchanged
    assert second.id != first.id and second.parent_id == first.id
    _idle(demo)
    assert demo.checkpoint(full=full).id == second.id  # and then idle again


@pytest.mark.parametrize("full", [False, True], ids=["fs", "full"])
def test_one_byte_written_makes_a_new_checkpoint(demo, full):
    first = demo.checkpoint("first", full=full)
    demo.write_file("/tmp/one", b"x")
    second = demo.checkpoint("second", full=full)
    assert not second.unchanged and second.id != first.id


def test_cpu_used_by_a_background_process_makes_a_new_checkpoint(demo):
    """No call, no file, no new or ended process: only CPU time tells the states apart."""
    py = demo.open_session("python", name="py")
    py.run("import threading, time\n"
           "n = 0\n"
           "def work():\n"
           "    global n\n"
           "    time.sleep(0.5)\n"
           "    for i in range(3_000_000): n += 1\n"
           "    time.sleep(10**6)\n"
           "threading.Thread(target=work, daemon=True).start()")
    first = demo.checkpoint("first", full=True)   # the thread is still asleep
    deadline = time.monotonic() + 30
    while py.run("print(n)").stdout.strip() != b"3000000":  # (a call: the next one is new anyway)
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # Now the same, but with no call between the two checkpoints.
    py.run("def work2():\n"
           "    global n\n"
           "    time.sleep(0.5)\n"
           "    for i in range(3_000_000): n += 1\n"
           "    time.sleep(10**6)\n"
           "threading.Thread(target=work2, daemon=True).start()")
    second = demo.checkpoint("second", full=True)
    assert not second.unchanged and second.id != first.id
    time.sleep(3)  # work2 counts to 6e6 meanwhile, then sleeps: same threads as before
    third = demo.checkpoint("third", full=True)
    assert not third.unchanged and third.id != second.id


def test_full_request_after_fs_head_is_taken(demo):
    fs = demo.checkpoint("fs")
    full = demo.checkpoint("full", full=True)      # an fs head cannot answer it
    assert not full.unchanged and full.id != fs.id
    assert demo.checkpoint("fs-again").id == full.id  # a full head answers an fs request


def test_rollback_then_checkpoint_is_new(demo):
    """After a rollback the incarnation is another one: no cut to compare with."""
    first = demo.checkpoint("first", full=True)
    demo.rollback(first)
    second = demo.checkpoint("second", full=True)
    assert not second.unchanged and second.id != first.id
    assert demo.checkpoint("third", full=True).id == second.id


# ---- the dump's CRIU is started before the freeze (target 5) ---------------------------------

def _criu_helpers(daemon) -> tuple[list[int], list[int]]:
    """The daemon's `criu swrk` processes (its owner tag or HELPERS_DIR mark), and its
    unreaped CRIU children (zombies: a helper dropped without `Swrk.close`)."""
    from pathlib import Path

    from conftest import store_instance
    from deltabox.host.criu import Criu, find_criu
    zombies = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, ppid = rest.split()[:2]
        if state == "Z" and int(ppid) == daemon.pid and comm.endswith("(criu"):
            zombies.append(int(stat.parent.name))
    return Criu(find_criu(), owner=store_instance(daemon.state_dir)).orphans(), zombies


def test_unchanged_full_checkpoint_closes_the_criu_it_started(new_daemon):
    """DeltaCR.quiesced starts `criu swrk` before freezing; an unchanged checkpoint dumps
    nothing and must close it: hang up (it exits) and reap it. A daemon of its own, with no
    doubles built: any `criu swrk` left is one of these checkpoints' (the shared daemon
    builds other tests' doubles in the background)."""
    from conftest import TINY_TAR
    daemon = new_daemon(extra_args=("--double-policy", "never")).start()
    with daemon.client() as c:
        c.import_image("tiny", TINY_TAR)
        sbx = c.create("tiny")
        sbx.exec(["sleep", "1000"], detach=True)
        first = sbx.checkpoint("first", full=True)
        for _ in range(3):
            _idle(sbx)
            assert sbx.checkpoint("again", full=True).id == first.id
        wait_for(lambda: _criu_helpers(daemon) == ([], []), "no CRIU helper left running",
                 timeout=20)


# ---- NAT sandboxes (target 9): their network namespace is dumped empty, the veth attached
# again to each incarnation ------------------------------------------------------------------

from test_network import CONNECT, PEER_IP, nat_host, peer_host  # noqa: E402,F401 - fixtures


def _reaches_peer(sbx) -> bool:
    r = sbx.exec(["python3", "-c", CONNECT, PEER_IP, "8080"])
    return r.exit_code == 0 and r.stdout.strip() == b"peer saw 10.99.0.1"


def test_nat_sandbox_full_checkpoint_rollback_and_fork_keep_outbound_network(client, peer_host):
    sbx = client.create("demo", network="nat")
    children = []
    try:
        assert _reaches_peer(sbx)
        bash = sbx.open_session("bash", name="sh")
        bash.run("X=kept")
        ckpt = sbx.checkpoint("nat", full=True, wait_ready=True)
        bash.run("X=changed")
        sbx.write_file("/tmp/after", b"x")
        for _ in range(2):  # via the body double, then via its replacement or a restore
            res = sbx.rollback(ckpt)
            assert bash.run("echo $X").stdout == b"kept\n", res.path
            assert _reaches_peer(sbx), res.path
            assert sbx.info.ip_address.startswith("10.88.")
        forked = client.fork(ckpt, 2)
        children = [c.sandbox for c in forked if c.sandbox is not None]
        assert [c.error for c in forked] == [None, None]
        for child in children:
            assert child.info.ip_address.startswith("10.88.")
            assert child.info.ip_address != sbx.info.ip_address
            assert _reaches_peer(child)
            assert child.session("sh").run("echo $X").stdout == b"kept\n"
    finally:
        for child in children:
            child.destroy()
        sbx.destroy()
