"""Operation latencies: Prometheus histograms plus exact recent p50/p95 for `Stats`."""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

# How a rollback went (RollbackResponse.path): a ready body double / standby swapped
# in, one the rollback waited for while it was being built, or none (a CRIU restore /
# a fresh init).
ROLLBACK_PATHS = ("double", "double-waited", "standby", "standby-waited", "restore", "fresh")

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self, window: int = 4096):
        self.registry = CollectorRegistry()
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
                out.append((method, len(s), 1000 * _pct(s, 50), 1000 * _pct(s, 95)))
        return out

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _read_store(space, field: str) -> float:
    try:
        return float(getattr(space.usage(), field))
    except OSError:  # the store is being unmounted
        return float("nan")
