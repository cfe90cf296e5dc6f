"""Adapters from RL-environment libraries that trainers use to DeltaBox sandboxes.

Each adapter is one module that imports its library when it is imported itself, never from
here, so `import deltabox` (and `import deltabox.adapters`) needs none of them:

- `deltabox.adapters.skyrl` (`pip install 'deltabox[skyrl]'`): a SkyRL-Gym `BaseTextEnv`
  whose tool is a sandbox, registered with `skyrl_gym.make`.
- `deltabox.adapters.openenv` (`pip install 'deltabox[openenv]'`): an OpenEnv
  `Environment` (the server side of Meta's OpenEnv reset/step/state protocol) over a
  sandbox, each client session a fork of one prepared task.

Both are built on `deltabox.gym.SandboxEnv` (reset = rollback to the episode's root
checkpoint; clone/restore/fork) and add checkpoint / rollback / fork as their extra API,
since neither library has a notion of them. rl_examples/README.md says why these two.
"""

__all__: list[str] = []
