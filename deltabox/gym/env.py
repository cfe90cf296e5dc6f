"""`SandboxEnv`: one sandbox as a `gymnasium.Env`.

An episode starts from a *root checkpoint*, taken once when the env is built (after the
optional `setup`): `reset()` rolls the sandbox back to it, so whatever the previous
episode did to the files (and, with a session, to the processes) is undone in
milliseconds. `step(action)` runs the action -- a shell command, or code in a persistent
session -- and observes its stdout, stderr and exit status. `clone_state()` /
`restore_state()` are a checkpoint / a rollback (the ALE convention: a tree search or
MCTS saves a node and returns to it), and `fork(n)` makes n independent envs from a state.

Checkpoint modes: with a `session` the state that matters includes a running process (a
Python interpreter's variables), so checkpoints are FULL (files + processes, DeltaCR);
without one they are FS (files only; a rollback restarts the sandbox's processes), which
is cheaper.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable

import gymnasium
import numpy as np
from gymnasium import spaces

import deltabox
from deltabox.client.results import CheckpointInfo, ExecResult, SessionResult
from deltabox.errors import DeltaboxError

__all__ = ["SandboxEnv", "EnvState", "observation_space", "observe", "CHARSET"]

# What observations and actions may contain: printable ASCII and whitespace. Output bytes
# outside it (other UTF-8, control bytes) are shown as "?", so every observation is in
# the space (`Text.contains` checks each character).
CHARSET = string.printable
_ALLOWED = frozenset(CHARSET)

Result = ExecResult | SessionResult
RewardFn = Callable[[Any, Result], float]
DoneFn = Callable[[Any, Result], bool]


@dataclass(frozen=True)
class EnvState:
    """What `clone_state()` returns: a checkpoint of the sandbox and the step count."""
    checkpoint: CheckpointInfo
    steps: int


def observation_space(kind: str, max_text: int) -> spaces.Space:
    """"dict": {"stdout", "stderr": Text, "exit_code": Discrete(-1..255)}; "text": one
    Text, stdout then stderr."""
    if kind == "text":
        return spaces.Text(max_text, min_length=0, charset=CHARSET)
    if kind == "dict":
        return spaces.Dict({
            "stdout": spaces.Text(max_text, min_length=0, charset=CHARSET),
            "stderr": spaces.Text(max_text, min_length=0, charset=CHARSET),
            "exit_code": spaces.Discrete(257, start=-1)})
    raise ValueError(f"observation must be 'dict' or 'text', not {kind!r}")


def _text(data: bytes, max_text: int) -> str:
    """Output as observation text: its last `max_text` characters (the end of a command's
    output usually says how it went), outside CHARSET as "?"."""
    text = data.decode("utf-8", "replace")[-max_text:] if max_text else ""
    return "".join(c if c in _ALLOWED else "?" for c in text)


def observe(kind: str, max_text: int, result: Result | None):
    """The observation of `result` (None: the empty one, after a reset)."""
    out, err, code = (b"", b"", 0) if result is None else \
        (result.stdout, result.stderr, result.exit_code)
    if kind == "text":
        return _text(out + err, max_text)
    return {"stdout": _text(out, max_text), "stderr": _text(err, max_text),
            "exit_code": np.int64(min(max(code, -1), 255))}


def step_info(result: Result) -> dict:
    """The info of a step: only what the run reproduces (no durations, no pids), so the
    same action from the same state gives the same info."""
    return {"exit_code": int(result.exit_code),
            "timed_out": bool(getattr(result, "timed_out", False))}


class SandboxEnv(gymnasium.Env):
    """A sandbox as a gymnasium environment.

        env = SandboxEnv(client, "tiny", reward_fn=lambda sbx, r: float(r.exit_code == 0))
        obs, info = env.reset()
        obs, reward, terminated, truncated, info = env.step("ls /")

    `client`: a `deltabox.Client`. The sandbox is `sandbox` (a handle; the env does not
    destroy it) or else a new one from `image` (with `create` keyword arguments; destroyed
    by `close()`). `setup(sandbox)` runs once before the root checkpoint. `session`: a
    session kind ("python", "bash", "sh") -- actions are then code run in that
    persistent session, and checkpoints are FULL. `reward_fn(sandbox, result)` and
    `done_fn(sandbox, result)` (terminated) see the step's ExecResult / SessionResult;
    `max_steps` truncates an episode. `timeout` limits each action (seconds).
    """

    metadata = {"render_modes": []}

    def __init__(self, client: "deltabox.Client", image: str = "tiny", *,
                 sandbox: "deltabox.Sandbox | None" = None,
                 setup: Callable[[Any], None] | None = None, session: str | None = None,
                 reward_fn: RewardFn | None = None, done_fn: DoneFn | None = None,
                 max_steps: int = 32, timeout: float = 30.0, observation: str = "dict",
                 max_text: int = 4096, max_action: int = 1024, create: dict | None = None,
                 _root: CheckpointInfo | None = None, _steps: int = 0, _owned: bool = False):
        super().__init__()
        self.client = client
        self.observation_space = observation_space(observation, max_text)
        self.action_space = spaces.Text(max_action, min_length=0, charset=CHARSET)
        self._options = dict(session=session, reward_fn=reward_fn, done_fn=done_fn,
                             max_steps=max_steps, timeout=timeout, observation=observation,
                             max_text=max_text, max_action=max_action)
        self.reward_fn, self.done_fn = reward_fn, done_fn
        self.max_steps, self.timeout = max_steps, timeout
        self.observation, self.max_text = observation, max_text
        self.session_kind = session
        self.full = session is not None
        self._owns_sandbox = sandbox is None or _owned
        self.sandbox = sandbox if sandbox is not None else client.create(image, **(create or {}))
        self._closed = False
        try:
            if _root is None:
                if setup is not None:
                    setup(self.sandbox)
                self.session = self._open_session()
                self.root = self.sandbox.checkpoint("episode root", full=self.full)
                self._owns_root = True
            else:  # a fork: the sandbox already holds the session; the root is shared
                self.session = self.sandbox.session("gym") if self.full else None
                self.root, self._owns_root = _root, False
        except BaseException:
            self.close()
            raise
        self.steps = _steps

    def _open_session(self):
        if self.session_kind is None:
            return None
        return self.sandbox.open_session(self.session_kind, "gym")

    # ---- the gymnasium API -----------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Back to the episode's root checkpoint; the empty observation."""
        super().reset(seed=seed)
        self.sandbox.rollback(self.root)
        self.steps = 0
        return observe(self.observation, self.max_text, None), {}

    def step(self, action: str):
        """Run `action` (a shell command, or code in the session) and observe it."""
        if not isinstance(action, str):
            raise TypeError(f"an action is a str (a command or code), not "
                            f"{type(action).__name__}")
        if self.session is not None:
            result = self.session.run(action, timeout=self.timeout)
        else:
            result = self.sandbox.exec(["/bin/sh", "-c", action], timeout=self.timeout)
        self.steps += 1
        reward = float(self.reward_fn(self.sandbox, result)) if self.reward_fn else 0.0
        terminated = bool(self.done_fn(self.sandbox, result)) if self.done_fn else False
        truncated = self.steps >= self.max_steps
        return (observe(self.observation, self.max_text, result), reward, terminated,
                truncated, step_info(result))

    def close(self) -> None:
        """Destroy the sandbox (if the env made it) and the root's checkpoint tree (if it
        took it and no fork still uses it). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._owns_sandbox:
            try:
                self.sandbox.destroy()
            except deltabox.NotFound:
                pass
        root = getattr(self, "root", None)
        if root is not None and getattr(self, "_owns_root", False):
            try:
                self.client.delete_checkpoint(root, cascade=True)
            except DeltaboxError:
                pass  # a fork's sandbox still stands on it: its checkpoints stay

    # ---- states (the ALE convention) and forks ------------------------------------------------

    def clone_state(self) -> EnvState:
        """A checkpoint of the sandbox as it is now (and the step count)."""
        return EnvState(self.sandbox.checkpoint(f"step {self.steps}", full=self.full),
                        self.steps)

    def restore_state(self, state: EnvState) -> None:
        """Back to a state from `clone_state()` (of this env, or of the env it was forked
        from)."""
        self.sandbox.rollback(state.checkpoint)
        self.steps = state.steps

    def fork(self, n: int, state: EnvState | None = None) -> list["SandboxEnv"]:
        """n new, independent envs in `state` (default: a clone of the present state);
        their `reset()` returns to this env's episode root. Each must be closed."""
        state = state or self.clone_state()
        children = self.client.fork(state.checkpoint, n)
        envs, failed = [], None
        for child in children:
            if child.error is not None:
                failed = failed or child.error
            else:
                envs.append(SandboxEnv(self.client, sandbox=child.sandbox, _root=self.root,
                                       _steps=state.steps, _owned=True, **self._options))
        if failed is not None:
            for env in envs:
                env.close()
            raise failed
        return envs
