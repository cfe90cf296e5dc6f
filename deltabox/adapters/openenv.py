"""OpenEnv adapter: `SandboxEnvironment`, an OpenEnv `Environment` (reset / step / state) over
a DeltaBox sandbox, and `SandboxTask`, the factory that OpenEnv's server calls per session.

Why OpenEnv: Meta's OpenEnv is the environment protocol of the PyTorch stack (TRL's GRPO
trainer, torchforge): an environment is a server, each client session gets its own
`Environment`, and its reference environments for agents that act -- coding, terminal,
git, REPL -- each run in a Docker container the server starts per session. Starting a
container, and setting up the task in it, per session is the cost DeltaBox removes: a
`SandboxTask` prepares the task once (an image, a setup, a root checkpoint) and every
session is a fork of that root, made in milliseconds; `reset()` is a rollback to it.
OpenEnv has no checkpoint or rollback, so they are this adapter's extra API: in Python
(`checkpoint`, `rollback`, `fork`), and over the wire as actions (`op="checkpoint"`
returns a checkpoint id; `op="rollback"` goes back to one of the session's own).

Weight: `openenv-core` 0.3.0 requires gradio, openai, fastmcp and huggingface_hub besides
the server's fastapi / uvicorn / pydantic / websockets: about 370 MB beyond our client --
more than we would like (the serving path here needs only the latter four); it pins
neither grpcio nor protobuf, so it does not conflict with ours.

    task = SandboxTask(deltabox.Client(), "tiny", setup=prepare,
                       reward_fn=lambda sbx, r: float(sbx.exec("test -e /done").ok))
    app = create_app(task, SandboxAction, SandboxObservation, max_concurrent_envs=64)
    # uvicorn.run(app): each WebSocket session a fork of the task's root
    with SandboxClient(base_url="http://host:8000").sync() as env:
        env.reset(); result = env.step(SandboxAction(command="ls /work"))
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
import warnings
import weakref
from typing import Any, Callable, Literal

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, EnvironmentMetadata, Observation, State
from pydantic import Field

import deltabox
from deltabox.errors import DeltaboxError
from deltabox.gym import EnvState, SandboxEnv

__all__ = ["SandboxAction", "SandboxObservation", "SandboxState", "SandboxEnvironment",
           "SandboxTask", "SandboxClient", "ServedTask", "serve"]


class SandboxAction(Action):
    """A shell command to run (`op="exec"`), or a checkpoint / rollback of the sandbox."""
    op: Literal["exec", "checkpoint", "rollback"] = "exec"
    command: str = Field("", description="shell command, run with /bin/sh -c")
    checkpoint_id: str = Field("", description="rollback: an id from a checkpoint op")


class SandboxObservation(Observation):
    """What a command printed and its exit status (`done` and `reward` from the base)."""
    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    checkpoint_id: str = Field("", description="checkpoint: the id of the checkpoint made")


class SandboxState(State):
    """The episode (`episode_id`, `step_count`) and the sandbox it runs in."""
    sandbox_id: str = ""
    root_checkpoint_id: str = ""
    checkpoint_ids: list[str] = Field(default_factory=list)


class SandboxEnvironment(Environment[SandboxAction, SandboxObservation, SandboxState]):
    """One sandbox as an OpenEnv environment. Made by a `SandboxTask` (a fork of its root)
    or over any `deltabox.gym.SandboxEnv`, whose reward_fn / done_fn / max_steps decide
    `reward` and `done`. `close()` closes the SandboxEnv (destroying a sandbox it made)."""

    SUPPORTS_CONCURRENT_SESSIONS = True  # each session has its own sandbox

    def __init__(self, sandbox_env: SandboxEnv):
        super().__init__()
        self.sandbox_env = sandbox_env
        self._state = SandboxState(episode_id=str(uuid.uuid4()), step_count=0,
                                   sandbox_id=sandbox_env.sandbox.id,
                                   root_checkpoint_id=sandbox_env.root.id)
        self._checkpoints: dict[str, EnvState] = {}

    @property
    def sandbox(self) -> "deltabox.Sandbox":
        return self.sandbox_env.sandbox

    # ---- the OpenEnv API -------------------------------------------------------------------

    def reset(self, seed: int | None = None, episode_id: str | None = None,
              **kwargs: Any) -> SandboxObservation:
        """Roll the sandbox back to the task's root; a new episode."""
        self.sandbox_env.reset(seed=seed)
        self._checkpoints.clear()
        self._state = SandboxState(episode_id=episode_id or str(uuid.uuid4()), step_count=0,
                                   sandbox_id=self.sandbox.id,
                                   root_checkpoint_id=self.sandbox_env.root.id)
        return SandboxObservation(done=False, reward=None)

    def step(self, action: SandboxAction, timeout_s: float | None = None,
             **kwargs: Any) -> SandboxObservation:
        if action.op == "checkpoint":
            return SandboxObservation(checkpoint_id=self.checkpoint().checkpoint.id)
        if action.op == "rollback":
            state = self._checkpoints.get(action.checkpoint_id)
            if state is None:
                raise ValueError(f"no checkpoint {action.checkpoint_id!r} in this episode "
                                 f"(known: {sorted(self._checkpoints)})")
            self.rollback(state)
            return SandboxObservation()
        limit = self.sandbox_env.timeout
        if timeout_s is not None:  # the caller's limit for this step, if it set one
            self.sandbox_env.timeout = min(limit, timeout_s)
        try:
            obs, reward, terminated, truncated, info = self.sandbox_env.step(action.command)
        finally:
            self.sandbox_env.timeout = limit
        return SandboxObservation(stdout=obs["stdout"], stderr=obs["stderr"],
                                  exit_code=info["exit_code"], reward=reward,
                                  done=terminated or truncated)

    @property
    def state(self) -> SandboxState:
        """Steps count commands run since the reset (a rollback returns to its state's)."""
        return self._state.model_copy(update={"step_count": self.sandbox_env.steps,
                                              "checkpoint_ids": list(self._checkpoints)})

    def get_metadata(self) -> EnvironmentMetadata:
        return EnvironmentMetadata(
            name="deltabox-sandbox", version=deltabox.__version__,
            description="Shell commands in a DeltaBox sandbox; reset is a rollback to the "
                        "task's root checkpoint")

    def close(self) -> None:
        self.sandbox_env.close()

    # ---- checkpoint / rollback / fork: DeltaBox's extra API ----------------------------------

    def checkpoint(self) -> EnvState:
        """A checkpoint of the sandbox now; a later `rollback` (or op) may return to it."""
        state = self.sandbox_env.clone_state()
        self._checkpoints[state.checkpoint.id] = state
        return state

    def rollback(self, state: EnvState) -> None:
        self.sandbox_env.restore_state(state)

    def fork(self, n: int, state: EnvState | None = None) -> list["SandboxEnvironment"]:
        """n independent environments in `state` (default: now), each with its own sandbox
        (close each); their `reset()` returns to this environment's root."""
        state = state or self.sandbox_env.clone_state()
        return [SandboxEnvironment(child) for child in self.sandbox_env.fork(n, state)]


class SandboxTask:
    """A task prepared once -- a sandbox from `image`, `setup(sandbox)` run, its root
    checkpoint -- whose calls make `SandboxEnvironment`s forked from that root: the `env`
    factory of OpenEnv's `create_app` / `HTTPEnvServer` (one call per session). The other
    arguments are `deltabox.gym.SandboxEnv`'s. `close()` (after the server has stopped)
    destroys every sandbox it made that still stands -- a server that stops does not
    close its open sessions -- then the template and the root's checkpoints."""

    def __init__(self, client: "deltabox.Client", image: str = "tiny", *,
                 setup: Callable[[Any], None] | None = None,
                 reward_fn: Callable | None = None, done_fn: Callable | None = None,
                 max_steps: int = 32, timeout: float = 30.0, max_text: int = 4096):
        self.template = SandboxEnv(client, image, setup=setup, reward_fn=reward_fn,
                                   done_fn=done_fn, max_steps=max_steps, timeout=timeout,
                                   max_text=max_text)
        self.root = EnvState(self.template.root, 0)
        self.sessions = 0  # environments made so far
        self._made: weakref.WeakSet[SandboxEnvironment] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __call__(self) -> SandboxEnvironment:
        (child,) = self.template.fork(1, self.root)
        env = SandboxEnvironment(child)
        with self._lock:
            self.sessions += 1
            self._made.add(env)
        return env

    def close(self) -> None:
        with self._lock:
            made = list(self._made)
        for env in made:
            env.close()
            try:  # a session the server was closing when it stopped
                env.sandbox.destroy()
            except DeltaboxError:
                pass  # destroyed already, or being destroyed by the server's close
        # the template's root goes only once no fork of it stands (closes in flight)
        pending, deadline = {env.sandbox.id for env in made}, time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            pending &= {s.id for s in self.template.client.list()}
            if pending:
                time.sleep(0.05)
        self.template.close()


class SandboxClient(EnvClient[SandboxAction, SandboxObservation, SandboxState]):
    """OpenEnv's client for a `SandboxEnvironment` server (async; `.sync()` for blocking)."""

    def _step_payload(self, action: SandboxAction) -> dict[str, Any]:
        return action.model_dump(exclude={"metadata"})

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[SandboxObservation]:
        obs = SandboxObservation(**payload.get("observation", {}),
                                 reward=payload.get("reward"), done=payload.get("done", False))
        return StepResult(observation=obs, reward=payload.get("reward"),
                          done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> SandboxState:
        return SandboxState(**payload)


class ServedTask:
    """A task served by OpenEnv's `create_app` under uvicorn in a background thread: `url`
    for `SandboxClient(base_url=...)`; `stop()` (or leaving a `with`) shuts it down and
    closes every session (the task itself stays: close it after)."""

    def __init__(self, task: SandboxTask, host: str = "127.0.0.1", port: int = 0,
                 max_sessions: int = 8, start_timeout: float = 60.0):
        import uvicorn  # openenv-core's own server dependency

        if not port:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        app = create_app(task, SandboxAction, SandboxObservation,
                         max_concurrent_envs=max_sessions)
        # uvicorn's `websockets` protocol, not the newer `websockets-sansio`: under that one
        # openenv-core 0.3.0's /ws handler logs a traceback for every session its client closes.
        warnings.filterwarnings("ignore", message="The `websockets` implementation is deprecated")
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level="warning", ws="websockets"))
        self.thread = threading.Thread(target=self.server.run, daemon=True,
                                       name="deltabox-openenv-server")
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenEnv server on {self.url} did not start")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServedTask":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(task: SandboxTask, host: str = "127.0.0.1", port: int = 0,
          max_sessions: int = 8) -> ServedTask:
    """Serve `task` over OpenEnv's HTTP/WebSocket protocol (port 0: a free one)."""
    return ServedTask(task, host, port, max_sessions)
