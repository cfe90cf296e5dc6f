"""Gymnasium environments over DeltaBox sandboxes (install with `pip install 'deltabox[gym]'`).

`SandboxEnv` is one sandbox as a `gymnasium.Env` whose reset is a rollback to the episode's
root checkpoint, with `clone_state` / `restore_state` / `fork` for tree search;
`SandboxVectorEnv` steps many sandboxes as a `gymnasium.vector.VectorEnv`, each batch
operation one batched RPC. See `deltabox.gym.env` and `deltabox.gym.vector`.
"""

from deltabox.gym.env import CHARSET, EnvState, SandboxEnv
from deltabox.gym.vector import SandboxVectorEnv

__all__ = ["SandboxEnv", "SandboxVectorEnv", "EnvState", "CHARSET"]
