"""The errors of `deltabox.ray`: a node whose daemon cannot be reached.

`NodeLost` is an `Unavailable` (so `except deltabox.Unavailable` still catches it): the
daemon that owns a sandbox or checkpoint died, or its node left the cluster. It names the
node and the daemon (address and pid), so a trainer's log says which machine to look at.
The pool stays usable: calls on other nodes go on, and a checkpoint exported earlier (to a
file or to another node) can be imported and forked on a live one.
"""

from __future__ import annotations

from deltabox.errors import Unavailable

__all__ = ["NodeLost"]


class NodeLost(Unavailable):
    """The deltabox daemon of a Ray node is gone (killed, crashed, or its node died)."""

    def __init__(self, message: str, node_id: str = ""):
        super().__init__(message)
        self.node_id = node_id

    def __reduce__(self):  # Ray pickles exceptions raised in tasks
        return (type(self), (self.message, self.node_id))
