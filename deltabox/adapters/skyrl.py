"""SkyRL-Gym adapter: `SandboxTextEnv`, a `skyrl_gym` `BaseTextEnv` whose tool is a sandbox.

Why SkyRL: SkyRL (NovaSky, Berkeley) trains long-horizon coding agents -- SWE-Bench-style
repository tasks and terminal tasks -- where each trajectory runs the model's shell
commands in a container. Its trainer makes one environment per trajectory with
`skyrl_gym.make(env_class, env_config=..., extras=...)` and calls only `init(prompt)`,
`step(llm_text)` and `close()`; a GRPO group is n trajectories of the same task. That is
the pattern DeltaBox is for: prepare a task once, start every trajectory from it in
milliseconds, undo whatever an episode did. `skyrl-gym` installs light (func_timeout,
omegaconf, pandas, requests; about 100 MB beyond our client) and needs neither grpcio nor
protobuf, so it cannot fight our pins.

The env (registered as `deltabox-sandbox`):

    env = skyrl_gym.make("deltabox-sandbox", env_config={"image": "tiny"},
                         extras={"setup": "echo 1 > /work/x",
                                 "reward_spec": {"test": "grep -q 2 /work/x"}})
    prompt, info = env.init([{"role": "user", "content": "make /work/x say 2"}])
    out = env.step("```bash\\necho 2 > /work/x\\n```")   # runs in the sandbox
    out = env.step("<submit/>")                          # done; reward from the test

- The task's *root checkpoint* is taken once, after `extras["setup"]` (a shell script).
  `init()` rolls the sandbox back to it, so an env reused for another trajectory starts
  clean: the previous episode's files are gone.
- An action is the model's text: the command is its first ```bash (or ```sh) block;
  `<submit/>` ends the episode; text with neither gets a format hint. The observation is
  the command's exit status and output as a user message.
- The reward (on the last turn) is 1.0 when `extras["reward_spec"]["test"]`, run in the
  sandbox, exits 0.
- Extra API (SkyRL has no notion of it): `checkpoint()` / `rollback(state)` (a node of a
  tree search) and `fork(n)` -- n independent envs from one state, e.g. a GRPO group from
  a prepared task; each child's `init()` returns to the task's root.

`env_config` (the trainer's per-env-class config): `socket` (the daemon), `image`
("tiny"), `timeout` (seconds per command), `max_turns`, `max_output` (characters of
output shown). `client=` (a `deltabox.Client`) may be passed to `make` instead of a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from skyrl_gym import register, registry
from skyrl_gym.envs.base_text_env import BaseTextEnv, BaseTextEnvStepOutput

import deltabox
from deltabox.gym import EnvState, SandboxEnv

__all__ = ["SandboxTextEnv", "TextEnvState", "ENV_ID", "parse_action"]

ENV_ID = "deltabox-sandbox"

_COMMAND = re.compile(r"```(?:bash|sh)[ \t]*\n(.*?)```", re.DOTALL)
_SUBMIT = "<submit/>"
_FORMAT_HINT = (f"Put one shell command in a ```bash block, or say {_SUBMIT} when the task "
                "is done.")


def parse_action(text: str) -> tuple[str, str | None]:
    """("submit", None), ("command", the command) or ("invalid", None)."""
    if _SUBMIT in text:
        return "submit", None
    found = _COMMAND.search(text)
    if found is None or not found.group(1).strip():
        return "invalid", None
    return "command", found.group(1).strip()


@dataclass(frozen=True)
class TextEnvState:
    """What `checkpoint()` returns: the sandbox's checkpoint and the turn count."""
    sandbox: EnvState
    turns: int


def _get(config: Any, key: str, default: Any) -> Any:
    """`config` is a dict, an OmegaConf DictConfig (SkyRL's Hydra config) or None."""
    if config is None:
        return default
    value = config.get(key, default)
    return default if value is None else value


class SandboxTextEnv(BaseTextEnv):
    """A SkyRL text environment over a DeltaBox sandbox (see the module docstring)."""

    def __init__(self, env_config: Any = None, extras: dict | None = None, *,
                 client: "deltabox.Client | None" = None,
                 _sandbox_env: SandboxEnv | None = None, _turns: int = 0):
        super().__init__()
        extras = dict(extras or {})
        self.env_config, self.extras = env_config, extras
        self.max_turns = int(extras.get("max_turns") or _get(env_config, "max_turns", 8))
        self.max_output = int(_get(env_config, "max_output", 4096))
        self.test = (extras.get("reward_spec") or {}).get("test")
        self._owns_client = client is None and _sandbox_env is None
        if _sandbox_env is not None:  # a fork: the sandbox and its client are given
            client = _sandbox_env.client
        elif client is None:
            client = deltabox.Client(_get(env_config, "socket", None))
        self.client = client
        try:
            self.sandbox_env = _sandbox_env or SandboxEnv(
                client, _get(env_config, "image", "tiny"), setup=self._setup,
                max_steps=self.max_turns, timeout=float(_get(env_config, "timeout", 30.0)),
                max_text=self.max_output)
        except BaseException:
            if self._owns_client:
                client.close()
            raise
        self.turns = _turns
        self.commands = self.failed_commands = 0

    @property
    def sandbox(self) -> "deltabox.Sandbox":
        return self.sandbox_env.sandbox

    def _setup(self, sandbox) -> None:
        script = self.extras.get("setup")
        if script:
            sandbox.exec(["/bin/sh", "-c", script], timeout=120).check()

    # ---- the SkyRL API ---------------------------------------------------------------------

    def init(self, prompt):
        """Roll the sandbox back to the task's root; the prompt is passed through."""
        self.sandbox_env.reset()
        self.turns = 0
        self.commands = self.failed_commands = 0
        return prompt, {"sandbox": self.sandbox.id}

    def step(self, action: str) -> BaseTextEnvStepOutput:
        self.turns += 1
        kind, command = parse_action(action)
        metadata: dict[str, Any] = {"action": kind}
        if kind == "command":
            obs, *_, info = self.sandbox_env.step(command)
            self.commands += 1
            self.failed_commands += info["exit_code"] != 0
            metadata.update(command=command, exit_code=info["exit_code"])
            content = (f"exit code {info['exit_code']}\n"
                       f"<stdout>\n{obs['stdout']}</stdout>\n<stderr>\n{obs['stderr']}</stderr>")
        else:
            content = _FORMAT_HINT
        done = kind == "submit" or self.turns >= self.max_turns
        reward = self._score() if done else 0.0
        observations = [] if done else [{"role": "user", "content": content}]
        return BaseTextEnvStepOutput(observations=observations, reward=reward, done=done,
                                     metadata=metadata, postprocessed_action=None)

    def _score(self) -> float:
        if not self.test:
            return 0.0
        return 1.0 if self.sandbox.exec(["/bin/sh", "-c", self.test], timeout=120).ok else 0.0

    def get_metrics(self) -> dict[str, Any]:
        return {"turns": self.turns, "commands": self.commands,
                "failed_commands": self.failed_commands}

    def close(self) -> None:
        """Destroy the sandbox (and, for the env that took it, the root's checkpoints)."""
        self.sandbox_env.close()
        if self._owns_client:
            self.client.close()
            self._owns_client = False

    # ---- checkpoint / rollback / fork: DeltaBox's extra API ----------------------------------

    def checkpoint(self) -> TextEnvState:
        """A checkpoint of the sandbox as it is now, and the turn count."""
        return TextEnvState(self.sandbox_env.clone_state(), self.turns)

    def rollback(self, state: TextEnvState) -> None:
        """Back to a state from `checkpoint()` of this env or of the env it forked from."""
        self.sandbox_env.restore_state(state.sandbox)
        self.turns = state.turns

    def fork(self, n: int, state: TextEnvState | None = None) -> list["SandboxTextEnv"]:
        """n independent envs in `state` (default: now), e.g. the n trajectories of a
        GRPO group; their `init()` returns to this env's task root. Close each."""
        state = state or self.checkpoint()
        return [SandboxTextEnv(self.env_config, self.extras, _sandbox_env=child,
                               _turns=state.turns)
                for child in self.sandbox_env.fork(n, state.sandbox)]


if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="deltabox.adapters.skyrl:SandboxTextEnv")
