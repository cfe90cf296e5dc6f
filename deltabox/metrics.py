"""Operation latencies: Prometheus histograms plus exact recent p50/p95 for `Stats`.

One `Metrics` per daemon, with its own registry. Its text reaches scrapers two ways, the same
bytes both: in the gRPC `Stats` reply (`prometheus_text`), and, when the daemon is given a
metrics-address, over HTTP (`MetricsHTTPServer`, off by default).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, generate_latest,
                               start_http_server)

from deltabox.stats import percentile

__all__ = ["Metrics", "MetricsHTTPServer", "CallsInFlight"]

# How a rollback went (RollbackResponse.path): a ready body double / standby swapped
# in, one the rollback waited for while it was being built, or none (a CRIU restore /
# a fresh init).
ROLLBACK_PATHS = ("double", "double-waited", "standby", "standby-waited", "restore", "fresh")

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class CallsInFlight:
    """Unary RPCs being served now (counted by the server's interceptor, on the event
    loop). Background work -- body double builds (`deltabox.core.double_policy`) --
    waits for a moment with none, so a client's call never queues behind it."""

    def __init__(self) -> None:
        self.n = 0
        self._idle: asyncio.Event | None = None

    def started(self) -> None:
        self.n += 1

    def ended(self) -> None:
        self.n -= 1
        if self.n <= 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def idle(self) -> None:
        """Returns when no call is in flight (at once if none is)."""
        if self.n > 0:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()


class Metrics:
    def __init__(self, window: int = 4096):
        self.registry = CollectorRegistry()
        self.in_flight = CallsInFlight()
        self.latency = Histogram("deltabox_rpc_seconds", "RPC latency", ["method", "code"],
                                 buckets=_BUCKETS, registry=self.registry)
        self.errors = Counter("deltabox_rpc_errors_total", "RPCs that failed",
                              ["method", "code"], registry=self.registry)
        self.checkpoints = Counter("deltabox_checkpoints_total", "Checkpoints taken",
                                   ["mode"], registry=self.registry)
        self.frozen = Histogram("deltabox_checkpoint_frozen_seconds",
                                "How long a checkpoint kept the sandbox frozen", ["mode"],
                                buckets=_BUCKETS, registry=self.registry)
        self.image_bytes = Counter("deltabox_checkpoint_image_bytes_total",
                                   "Bytes of process images written", registry=self.registry)
        self.rollbacks = Counter("deltabox_rollbacks_total", "Rollbacks by the path taken",
                                 ["path"], registry=self.registry)
        self.rollback_seconds = Histogram("deltabox_rollback_seconds",
                                          "Rollback time in the daemon", ["path"],
                                          buckets=_BUCKETS, registry=self.registry)
        for path in ROLLBACK_PATHS:  # every path shows, at 0 until taken
            self.rollbacks.labels(path)
            self.rollback_seconds.labels(path)
        self.forked = Counter("deltabox_fork_children_total", "Fork children by how they "
                              "started", ["start"], registry=self.registry)
        self._recent: dict[str, deque[float]] = {}
        self._window = window
        self._lock = threading.Lock()

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.latency.labels(method, code).observe(seconds)
        if code != "OK":
            self.errors.labels(method, code).inc()
            return
        with self._lock:
            self._recent.setdefault(method, deque(maxlen=self._window)).append(seconds)

    def track_store(self, space) -> None:
        """Gauges of the store's size, free space and reserve (a `deltabox.store.space.StoreSpace`),
        read at each scrape."""
        for field, name, what in (
                ("size_bytes", "deltabox_store_size_bytes", "Size of the store"),
                ("free_bytes", "deltabox_store_free_bytes", "Free bytes in the store"),
                ("inodes", "deltabox_store_inodes", "Inodes of the store"),
                ("free_inodes", "deltabox_store_free_inodes", "Free inodes in the store"),
                ("reserve_bytes", "deltabox_store_reserve_bytes",
                 "Free bytes below which new work is refused"),
                ("reserve_inodes", "deltabox_store_reserve_inodes",
                 "Free inodes below which new work is refused")):
            Gauge(name, what, registry=self.registry).set_function(
                lambda field=field: _read_store(space, field))
        self.store_refusals = Counter("deltabox_store_reserve_refusals_total",
                                      "Operations refused because the store was below its "
                                      "reserve", ["operation"], registry=self.registry)

    def summary(self) -> list[tuple[str, int, float, float]]:
        """(method, count, p50 ms, p95 ms) over the recent window of successful calls."""
        out = []
        with self._lock:
            for method, values in sorted(self._recent.items()):
                s = sorted(values)
                out.append((method, len(s), 1000 * percentile(s, 50), 1000 * percentile(s, 95)))
        return out

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()


def _read_store(space, field: str) -> float:
    try:
        return float(getattr(space.usage(), field))
    except OSError:  # the store is being unmounted
        return float("nan")


class MetricsHTTPServer:
    """`GET /metrics` of a `Metrics`' registry, for Prometheus, at "HOST:PORT".

    prometheus_client's own WSGI server (a daemon thread): the registry is already a
    prometheus_client one and it is thread-safe, so nothing of ours runs on the event loop
    while a scrape reads it. No TLS and no token: bind it to 127.0.0.1 or a private
    network. Port 0 picks a free port (`address` then says which).
    """

    def __init__(self, metrics: Metrics, address: str):
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            self._server, self._thread = start_http_server(int(port), host, metrics.registry)
        except OSError as e:
            raise SystemExit(f"metrics-address {address}: cannot listen: {e.strerror}") from None
        bound_host, bound_port = self._server.server_address[:2]
        self.address = f"[{bound_host}]:{bound_port}" if ":" in bound_host else \
            f"{bound_host}:{bound_port}"
        self.url = f"http://{self.address}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
