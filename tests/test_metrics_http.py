"""The opt-in HTTP /metrics endpoint for Prometheus (`metrics-address`; off by default).

A real daemon with the endpoint on, configured from its config file: its counters move by
exactly the RPCs done, and the HTTP text is the one the gRPC Stats reply carries.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import deltabox
from conftest import TINY_TAR
from waiting import wait_for


def _samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(url: str) -> tuple[str, dict[tuple, float]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return text, _samples(text)


def _serving_event(log: str) -> dict:
    return next(json.loads(line) for line in log.splitlines()
                if line.startswith("{") and json.loads(line)["event"] == "daemon.serving")


def _delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move_by_exactly_what_was_done(new_daemon, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('metrics-address = "127.0.0.1:0"\n')   # port 0: any free port
    d = new_daemon(extra_args=("--config", str(config))).start()
    url = _serving_event(d.log())["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url

    with d.client() as c:
        c.import_image("tiny", TINY_TAR)
        s = c.create("tiny", name="scraped")
        _, before = _scrape(url)
        for _ in range(3):
            assert s.exec("true").exit_code == 0
        for _ in range(2):
            with pytest.raises(deltabox.SandboxNotFound):
                c.get("no-such-sandbox")
        ckpt = s.checkpoint("one")
        s.write_file("/root/after", b"x")
        s.rollback(ckpt)
        # A rollback's metrics are counted once its reply has left (core/after_reply.py),
        # and the scrape is served by a thread of its own: it may come first.
        def rolled_back():
            _, now = _scrape(url)
            moved = sum(v - before.get(k, 0.0) for k, v in now.items()
                        if k[0] == "deltabox_rollbacks_total")
            return now if moved and _delta(now, before, "deltabox_rpc_seconds_count",
                                           method="Rollback", code="OK") else None
        after = wait_for(rolled_back, "the rollback's metrics", timeout=10)

        assert _delta(after, before, "deltabox_rpc_seconds_count", method="Exec", code="OK") == 3
        assert _delta(after, before, "deltabox_rpc_seconds_count", method="GetSandbox",
                      code="NOT_FOUND") == 2
        assert _delta(after, before, "deltabox_rpc_errors_total", method="GetSandbox",
                      code="NOT_FOUND") == 2
        assert _delta(after, before, "deltabox_rpc_seconds_count", method="Checkpoint",
                      code="OK") == 1
        assert _delta(after, before, "deltabox_checkpoints_total", mode="fs") == 1
        assert _delta(after, before, "deltabox_checkpoints_total", mode="full") == 0
        rollbacks = sum(v - before.get(k, 0.0) for k, v in after.items()
                        if k[0] == "deltabox_rollbacks_total")
        assert rollbacks == 1
        assert _delta(after, before, "deltabox_rpc_seconds_count", method="Rollback",
                      code="OK") == 1
        # Nothing was done that failed otherwise, and a scrape is not an RPC.
        errors = {k: v - before.get(k, 0.0) for k, v in after.items()
                  if k[0] == "deltabox_rpc_errors_total" and v != before.get(k, 0.0)}
        assert list(errors) == [("deltabox_rpc_errors_total",
                                 (("code", "NOT_FOUND"), ("method", "GetSandbox")))], errors
        _, again = _scrape(url)
        assert {k: v for k, v in again.items() if "rpc" in k[0] and "seconds_sum" not in k[0]} \
            == {k: v for k, v in after.items() if "rpc" in k[0] and "seconds_sum" not in k[0]}

        # The same text as the gRPC Stats reply: every counter equal (the Stats call is
        # counted only once it has replied, so it is left out).
        grpc_text = c.stats().prometheus_text
        _, http = _scrape(url)
        from_grpc = _samples(grpc_text)
        assert set(from_grpc) - set(http) <= {k for k in from_grpc if ("method", "Stats") in k[1]}
        counters = [k for k in from_grpc if k[0].endswith(("_total", "_count"))
                    and ("method", "Stats") not in k[1]]
        assert counters and all(from_grpc[k] == http[k] for k in counters), \
            [(k, from_grpc[k], http.get(k)) for k in counters if from_grpc[k] != http.get(k)]
        assert http[("deltabox_store_size_bytes", ())] == c.status().store_size_bytes
        s.destroy()

    assert d.stop() == 0, d.log()
    with pytest.raises(OSError):   # closed with the daemon
        urllib.request.urlopen(url, timeout=5)


def test_off_by_default_and_a_busy_port_is_a_clear_error(new_daemon, tmp_path):
    d = new_daemon().start()
    assert _serving_event(d.log())["metrics"] is None
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = new_daemon(extra_args=("--metrics-address", f"127.0.0.1:{port}"))
        with pytest.raises(RuntimeError, match=f"metrics-address 127.0.0.1:{port}: cannot "
                           "listen"):
            other.start()
    assert d.stop() == 0
