"""Is this SIGTERM a restart or a stop? What the daemon does with its sandboxes on exit.

`deltabox daemon --on-exit` (`Config.on_exit`) decides, once, when the daemon is told to exit:
- "stop" (the default outside systemd): stop every sandbox and unmount the store; the next
  daemon restarts them from their files (processes fresh). Nothing is left behind.
- "keep": leave sandboxes running and mounted (the store too); the next daemon's start-up
  reconcile adopts them, exactly as after a crash (same init, same session state). Like
  containerd (whose shims outlive it) or Docker's `live-restore`.
- "systemd" (the shipped unit): keep when systemd is *restarting* the unit, stop otherwise.
  systemd sends the same SIGTERM for `systemctl stop` and `systemctl restart`; what tells
  them apart is the job it runs for the unit meanwhile: a restart job keeps the type
  "restart" through its stop half (systemd turns it into a start once the unit is down),
  while `systemctl stop`, a shutdown or an isolate run a "stop" job, and `systemctl kill`
  none. The job is read from systemd itself (its D-Bus properties Unit.Job and Job.JobType,
  through `systemctl show`); when it cannot be read, the answer is stop: leave nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import structlog

__all__ = ["own_unit", "unit_job_type", "keep_sandboxes_on_exit"]

log = structlog.get_logger("deltabox.host.systemd")

# Job types whose stop half is followed by a start (`try-restart` collapses to `restart` on
# an active unit; both names may show).
RESTART_JOBS = ("restart", "try-restart")


def own_unit(cgroup_file: Path = Path("/proc/self/cgroup")) -> str | None:
    """The systemd service this process runs in, from its cgroup path (the unified line
    `0::` or v1's `name=systemd` line), or None outside a service."""
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            for part in reversed(path.split("/")):
                if part.endswith(".service"):
                    return part
    return None


def _systemctl_show(what: str, prop: str) -> str:
    res = subprocess.run(["systemctl", "show", f"--property={prop}", "--value", "--", what],
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        raise OSError(f"systemctl show {what}: {res.stderr.strip() or res.returncode}")
    return res.stdout.strip()


def unit_job_type(unit: str) -> str | None:
    """The type of the job systemd runs for `unit` now ("restart", "stop", ...), or None
    when it runs none. Raises OSError when systemd cannot be asked."""
    if shutil.which("systemctl") is None:
        raise OSError("no systemctl")
    job = _systemctl_show(unit, "Job")  # the job's id, or "" (Unit.Job is (id, path))
    if not job or job == "0":
        return None
    # `systemctl show ID` shows a job; it may have finished in between: then "" (no job).
    try:
        return _systemctl_show(job, "JobType") or None
    except OSError:
        return None


def keep_sandboxes_on_exit(on_exit: str) -> bool:
    """Whether the exiting daemon leaves its sandboxes to the next one (see the module)."""
    if on_exit != "systemd":
        return on_exit == "keep"
    unit = own_unit()
    if unit is None:
        log.warning("daemon.on_exit_not_a_service", on_exit=on_exit, then="stop")
        return False
    try:
        job = unit_job_type(unit)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("daemon.on_exit_job_unknown", unit=unit, error=str(e), then="stop")
        return False
    keep = job in RESTART_JOBS
    log.info("daemon.on_exit", unit=unit, job=job, keep_sandboxes=keep)
    return keep
