"""Shared pieces of the bench reports: a target verdict, the worst cell of a set of rows,
number formatting, and the targets / notes / host tables every `deltabox bench` prints.

Targets are judged on what the CLIENT sees (the gRPC wall time through
`deltabox.Client`, p50) at the WORST cell (tree, depth or state); the daemon's own time
of that cell is shown beside it, never used for the verdict.
"""

from __future__ import annotations

__all__ = ["verdict", "target", "worst_grpc", "fmt", "render_targets_and_notes"]


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def target(name: str, limit: str, value, where: str, met: bool | None) -> dict:
    """One row of a document's "targets"."""
    return {"target": name, "limit": limit, "value": value, "where": where,
            "status": verdict(met)}


def _cell_name(r: dict) -> str:
    if "rss_mb" in r:
        return f"{r['rss_mb']} MB"
    return f"{r['tree']} depth {r['depth']}"


def worst_grpc(rows: list[dict]) -> tuple[float | None, str]:
    """(gRPC p50 of the worst row, a description naming it, its daemon p50, and the
    best row) -- the value a target is judged on."""
    if not rows:
        return None, "not measured"
    w = max(rows, key=lambda r: r["grpc_ms"]["p50"])
    b = min(rows, key=lambda r: r["grpc_ms"]["p50"])
    where = f"worst {_cell_name(w)}"
    if w.get("daemon_ms"):
        where += f" (daemon {w['daemon_ms']['p50']:.2f})"
    if len(rows) > 1:
        where += f"; best {b['grpc_ms']['p50']:.2f} ({_cell_name(b)})"
    return w["grpc_ms"]["p50"], where


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


def render_targets_and_notes(doc: dict, console) -> None:
    """The targets table, the notes and the host line (every `deltabox bench`)."""
    from rich.table import Table
    tg = Table("target (client-side gRPC p50, worst cell)", "limit", "measured", "where",
               "status", title="targets", box=None, header_style="bold")
    for t in doc["targets"]:
        style = {"met": "green", "NOT met": "bold red"}.get(t["status"], "yellow")
        tg.add_row(t["target"], t["limit"], fmt(t["value"]), t["where"],
                   f"[{style}]{t['status']}[/]")
    console.print(tg)
    for n in doc["notes"]:
        console.print(f"note: {n}")
    host = doc["host"]
    console.print(f"code {doc.get('code') or '?'}; host: {host['cpus']} CPUs, kernel "
                  f"{host['kernel']}, load {host['loadavg_start'][0]} -> "
                  f"{host['loadavg_end'][0]} (1-min average; other work on the host shows here); "
                  f"total {doc['elapsed_s']} s")
