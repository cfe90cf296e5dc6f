"""Named crash points, for the crash battery (tests/test_crash.py).

`DELTABOX_FAULT=<point>[@<n>]` in the daemon's environment makes it SIGKILL itself the
n-th time (default: the first) it reaches `<point>` -- a crash at an exact step, which
random kills hit only by luck. Unset (always, outside tests) a crash point costs one
comparison. The points, in the order an operation reaches them:

    checkpoint.sink        frozen, the upper sunk into a tmp layer, nothing dumped yet
    checkpoint.dump        `criu swrk` asked to dump (it runs on, orphaned)
    checkpoint.commit      in the commit transaction: layer and images renamed, not committed
    checkpoint.committed   committed, not yet acknowledged (no body double yet)
    rollback.before_switch the new incarnation (double, standby or restore) up, records old
    rollback.after_switch  records switched, the old incarnation still alive (a double frozen)
    fork.launched          a cold child restored, recorded 'creating'
    fork.adopted           a warm child recorded 'running', still frozen
    create.launched        the init started, recorded 'creating'
    destroy.killed         the processes killed, the record not yet deleted
    import.commit          in the image's commit transaction: layers renamed, not committed
    squash.commit          in the squash's transaction: the layer renamed, not committed
    transfer.written       an import's layers (and images) written under tmp/, no row yet
    transfer.commit        in an import's transaction: layers and images renamed, not committed
    reconcile              start-up, after each recorded sandbox is reconciled

`DELTABOX_HOLD=<point>` makes the thread that reaches `<point>` wait there forever
instead (`hold_point`): a test then acts on a step that would otherwise be over before it
could look, e.g. kills the daemon while a CRIU dump is midway. Points:

    checkpoint.post-dump   CRIU has written the images and holds the tree seized; it
                           waits for the daemon's answer to its "post-dump" notification
    checkpoint.background  a background checkpoint's cut is taken and acknowledged
                           (pending); nothing of it is recorded yet
    checkpoint.commit      in the commit transaction (a worker thread holding the store's
                           lock), nothing committed
    restore.pre-resume     a CRIU restore has made the whole tree (its root the daemon's
                           child); CRIU waits for the answer to "pre-resume"

With `DELTABOX_HOLD_UNTIL=<path>` too, the hold ends once `<path>` exists: a test then
checks what waits for the held step, and lets it go on. With `DELTABOX_HOLD_REACHED=<path>`
the holding thread creates `<path>` as it starts to wait: the test knows it is there.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["crash_point", "hold_point", "holds"]

_point, _, _nth = os.environ.get("DELTABOX_FAULT", "").partition("@")
_remaining = int(_nth or 1)
_lock = threading.Lock()
_hold = os.environ.get("DELTABOX_HOLD", "")
_hold_until = os.environ.get("DELTABOX_HOLD_UNTIL", "")
_hold_reached = os.environ.get("DELTABOX_HOLD_REACHED", "")


def crash_point(name: str) -> None:
    """SIGKILL this process here if DELTABOX_FAULT names this point (and hit count)."""
    global _remaining
    if name != _point:
        return
    with _lock:
        _remaining -= 1
        if _remaining == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def holds(name: str) -> bool:
    """Whether DELTABOX_HOLD names this point (a caller may need to arrange to reach it)."""
    return name == _hold


def hold_point(name: str) -> None:
    """Block the calling thread if DELTABOX_HOLD names this point: for good, or until
    the file DELTABOX_HOLD_UNTIL names exists."""
    if name != _hold:
        return
    if _hold_reached and not (_hold_until and os.path.exists(_hold_until)):
        open(_hold_reached, "a").close()
    if not _hold_until:
        threading.Event().wait()
    while not os.path.exists(_hold_until):
        time.sleep(0.02)
