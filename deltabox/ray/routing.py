"""Routing: from a node id to a connected `deltabox.Client` on that node's daemon, cached
per process, and the translation of "cannot reach it" into `NodeLost`.

A pool handle carries only ids (node, sandbox), so it pickles into any Ray task or actor.
The first call for a node in a process asks the node's `NodeDaemon` actor once for its
`Endpoint` (address, certificate, token); after that every call goes straight to the
daemon over TCP + TLS + token -- no actor hop. A call that finds the daemon unreachable
(UNAVAILABLE, or the actor gone with its node) raises `NodeLost` naming the node and the
daemon, and drops the cached connection, so a daemon restarted by its actor is picked up
by the next call.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from deltabox.client.sync import Client
from deltabox.errors import Unavailable
from deltabox.ray.errors import NodeLost
from deltabox.ray.node import NAMESPACE, Endpoint, actor_name

__all__ = ["connection", "endpoint_of", "client_for_endpoint", "forget", "on_node",
           "CALL_TIMEOUT"]

# The deadline of calls without their own limit: a node that vanished without a reset
# must not hold a trainer for TCP's own minutes.
CALL_TIMEOUT = 120.0

_lock = threading.Lock()
_endpoints: dict[str, Endpoint] = {}
_clients: dict[str, Client] = {}


def endpoint_of(node_id: str) -> Endpoint:
    """The node's endpoint, asked of its actor once per process."""
    ep = _endpoints.get(node_id)
    if ep is not None:
        return ep
    import ray
    try:
        actor = ray.get_actor(actor_name(node_id), namespace=NAMESPACE)
        ep = ray.get(actor.endpoint.remote(), timeout=60)
    except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise NodeLost(f"node {node_id[:12]} has no deltabox daemon any more (its NodeDaemon "
                       f"actor is gone: node dead or daemons stopped): {e}", node_id) from None
    _endpoints[node_id] = ep
    return ep


def _ca_file(ep: Endpoint) -> Path:
    """The daemon's certificate in a file (the client takes a path), per process."""
    d = Path(tempfile.gettempdir()) / f"deltabox-ray-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    path = d / f"ca-{ep.node_id[:16]}-{ep.address.replace(':', '_')}.pem"
    if not path.exists() or path.read_bytes() != ep.ca_pem:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(ep.ca_pem)
        tmp.replace(path)
    return path


def client_for_endpoint(ep: Endpoint, timeout: float | None = CALL_TIMEOUT) -> Client:
    """A new client on `ep` (the caller closes it)."""
    return Client(ep.address, tls_ca=_ca_file(ep), token=ep.token, timeout=timeout)


def connection(node_id: str) -> Client:
    """The process's cached client on the daemon of `node_id`."""
    client = _clients.get(node_id)
    if client is not None:
        return client
    ep = endpoint_of(node_id)
    with _lock:
        client = _clients.get(node_id)
        if client is None:
            client = _clients[node_id] = client_for_endpoint(ep)
    return client


def forget(node_id: str) -> None:
    """Drop the cached endpoint and connection of a node (after it was lost)."""
    with _lock:
        _endpoints.pop(node_id, None)
        client = _clients.pop(node_id, None)
    if client is not None:
        client.close()


def lost(node_id: str, error: Exception) -> NodeLost:
    ep = _endpoints.get(node_id)
    where = ep.describe() if ep is not None else f"node {node_id[:12]}"
    forget(node_id)
    if isinstance(error, NodeLost):
        return error
    return NodeLost(f"{where} is unreachable: {error}", node_id)


@contextmanager
def on_node(node_id: str):
    """`with on_node(n) as client:` -- the calls inside reach node n's daemon; UNAVAILABLE
    becomes NodeLost."""
    try:
        yield connection(node_id)
    except Unavailable as e:
        raise lost(node_id, e) from None
