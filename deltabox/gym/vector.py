"""`SandboxVectorEnv`: many sandboxes as one `gymnasium.vector.VectorEnv`, over `AsyncClient`.

A trainer steps a batch of environments at once. Here a batch step is one ExecMany RPC
(every sandbox's command, run concurrently in the daemon), a batch reset one RollbackMany
to the episode roots, and `clone_state()` / `restore_state()` one CheckpointMany /
RollbackMany: the sandboxes' checkpoints overlap in the daemon instead of queueing behind
each other. With a session, each sandbox's code runs in its own session, concurrently.

The client is an `AsyncClient` on a private event loop in a background thread, so the
VectorEnv API stays synchronous; `step_async(actions)` / `step_wait()` (as gymnasium's
AsyncVectorEnv) let the caller compute the next actions (a policy's forward pass) while
the sandboxes run.

Autoreset follows gymnasium's default, NEXT_STEP: the step after a sub-environment
terminates or truncates resets it (its action is ignored) and returns its reset
observation.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

import deltabox
from deltabox.errors import DeltaboxError
from deltabox.gym.env import CHARSET, EnvState, observation_space, observe, step_info

__all__ = ["SandboxVectorEnv"]


class SandboxVectorEnv(VectorEnv):
    """`num_envs` sandboxes from `image` (each with `setup(sandbox)` run once, awaited if it
    is a coroutine function, then its root checkpoint). The other arguments are
    `SandboxEnv`'s; `reward_fn` and `done_fn` get an `AsyncSandbox` and may be coroutine
    functions. `socket` and `client_options` reach the `AsyncClient`."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int, image: str = "tiny", *, socket=None,
                 client_options: dict | None = None, setup: Callable | None = None,
                 session: str | None = None, reward_fn: Callable | None = None,
                 done_fn: Callable | None = None, max_steps: int = 32,
                 timeout: float = 30.0, observation: str = "dict", max_text: int = 4096,
                 max_action: int = 1024, create: dict | None = None):
        self.num_envs = num_envs
        self.single_observation_space = observation_space(observation, max_text)
        self.single_action_space = spaces.Text(max_action, min_length=0, charset=CHARSET)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.reward_fn, self.done_fn = reward_fn, done_fn
        self.max_steps, self.timeout = max_steps, timeout
        self.observation, self.max_text = observation, max_text
        self.session_kind, self.full = session, session is not None
        self.sandboxes: list = []
        self.sessions: list = []
        self.roots: list = []
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self._autoreset = np.zeros(num_envs, dtype=np.bool_)
        self._pending: Future | None = None
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="deltabox-gym-vector")
        self._thread.start()
        try:
            self._call(self._start(socket, client_options or {}, image, create or {}, setup))
        except BaseException:
            self.close()
            raise

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self, socket, client_options, image, create, setup) -> None:
        self.client = deltabox.AsyncClient(socket, **client_options)
        made = await asyncio.gather(*(self.client.create(image, **create)
                                      for _ in range(self.num_envs)), return_exceptions=True)
        self.sandboxes = [s for s in made if not isinstance(s, BaseException)]
        failed = next((s for s in made if isinstance(s, BaseException)), None)
        if failed is not None:
            raise failed
        if setup is not None:
            await asyncio.gather(*(_maybe_await(setup(s)) for s in self.sandboxes))
        if self.full:
            self.sessions = await asyncio.gather(*(s.open_session(self.session_kind, "gym")
                                                   for s in self.sandboxes))
        res = await self.client.checkpoint_many(self.sandboxes, "episode root", self.full)
        self.roots = res.values()

    # ---- the VectorEnv API ---------------------------------------------------------------------

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Every sandbox back to its episode root (one RollbackMany)."""
        super().reset(seed=seed)
        self._call(self._rollback(range(self.num_envs), self.roots))
        self.steps[:] = 0
        self._autoreset[:] = False
        return self._batch([None] * self.num_envs), {}

    def step(self, actions: Sequence[str]):
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Sequence[str]) -> None:
        """Start a batch step and return at once (`step_wait` collects it)."""
        if self._pending is not None:
            raise RuntimeError("a step is already in flight: call step_wait() first")
        actions = list(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"{len(actions)} actions for {self.num_envs} environments")
        self._pending = asyncio.run_coroutine_threadsafe(self._step(actions), self._loop)

    def step_wait(self):
        if self._pending is None:
            raise RuntimeError("no step in flight: call step_async() first")
        pending, self._pending = self._pending, None
        return pending.result()

    async def _step(self, actions: list[str]):
        n = self.num_envs
        resetting = [i for i in range(n) if self._autoreset[i]]
        stepping = [i for i in range(n) if not self._autoreset[i]]
        results: list = [None] * n
        await asyncio.gather(self._rollback(resetting, [self.roots[i] for i in resetting]),
                             self._run(stepping, actions, results))
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=np.bool_)
        truncated = np.zeros(n, dtype=np.bool_)
        infos: dict = {}
        for i in resetting:
            self.steps[i] = 0
        for i in stepping:
            res, sbx = results[i], self.sandboxes[i]
            self.steps[i] += 1
            if self.reward_fn is not None:
                rewards[i] = float(await _maybe_await(self.reward_fn(sbx, res)))
            if self.done_fn is not None:
                terminated[i] = bool(await _maybe_await(self.done_fn(sbx, res)))
            truncated[i] = self.steps[i] >= self.max_steps
            infos = self._add_info(infos, step_info(res), i)
        self._autoreset = terminated | truncated
        return self._batch(results), rewards, terminated, truncated, infos

    async def _run(self, indices: list[int], actions: list[str], results: list) -> None:
        if not indices:
            return
        if self.full:
            done = await asyncio.gather(*(self.sessions[i].run(actions[i], timeout=self.timeout)
                                          for i in indices))
        else:
            res = await self.client.exec_many(
                [(self.sandboxes[i], ["/bin/sh", "-c", actions[i]]) for i in indices],
                timeout=self.timeout, concurrency=min(64, len(indices)))
            done = res.values()
        for i, r in zip(indices, done):
            results[i] = r

    async def _rollback(self, indices, checkpoints) -> None:
        indices = list(indices)
        if indices:
            res = await self.client.rollback_many(
                [(self.sandboxes[i], c) for i, c in zip(indices, checkpoints)],
                concurrency=min(64, len(indices)))
            res.values()  # raises the first error

    def _batch(self, results: list):
        obs = [observe(self.observation, self.max_text, r) for r in results]
        empty = create_empty_array(self.single_observation_space, self.num_envs)
        return concatenate(self.single_observation_space, obs, empty)

    def close_extras(self, **kwargs) -> None:
        """Destroy the sandboxes and their root checkpoints; stop the loop."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            try:
                self._call(self._teardown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)

    async def _teardown(self) -> None:
        await asyncio.gather(*(s.destroy() for s in self.sandboxes), return_exceptions=True)
        for root in self.roots:
            try:
                await self.client.delete_checkpoint(root, cascade=True)
            except DeltaboxError:
                pass
        if hasattr(self, "client"):
            await self.client.close()

    # ---- states over the batch ---------------------------------------------------------------

    def clone_state(self) -> list[EnvState]:
        """A checkpoint of every sandbox (one CheckpointMany: they overlap in the daemon)."""
        async def clone():
            res = await self.client.checkpoint_many(self.sandboxes, "clone", self.full)
            return res.values()
        return [EnvState(c, int(s)) for c, s in zip(self._call(clone()), self.steps)]

    def restore_state(self, states: list[EnvState]) -> None:
        """Every sandbox back to its state (one RollbackMany)."""
        self._call(self._rollback(range(self.num_envs), [s.checkpoint for s in states]))
        self.steps[:] = [s.steps for s in states]
        self._autoreset[:] = False


async def _maybe_await(value: Any):
    return await value if inspect.isawaitable(value) else value
