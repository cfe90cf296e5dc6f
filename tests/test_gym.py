"""deltabox.gym against a real daemon: the gymnasium API (check_env), resets that undo an
episode, clone/restore, forks that are independent, sessions, and the vector env."""

from __future__ import annotations

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402

import deltabox  # noqa: E402
from deltabox.gym import SandboxEnv, SandboxVectorEnv  # noqa: E402


def _goal_reached(sbx, result) -> float:
    """Reward from the sandbox itself: 1 once /tmp/goal exists."""
    return float(sbx.exec("test -e /tmp/goal").ok)


def _task(sbx):
    sbx.write_file("/work/task.txt", "the task", make_parents=True)


@pytest.fixture
def env(client):
    e = SandboxEnv(client, "tiny", setup=_task, reward_fn=_goal_reached, max_steps=3)
    yield e
    e.close()


def test_check_env(env):
    check_env(env)


def test_step_observes_and_rewards(env):
    obs, info = env.reset(seed=1)
    assert obs == {"stdout": "", "stderr": "", "exit_code": 0} and info == {}
    obs, reward, terminated, truncated, info = env.step("cat /work/task.txt; echo oops >&2; exit 3")
    assert (obs["stdout"], obs["stderr"], int(obs["exit_code"])) == ("the task", "oops\n", 3)
    assert env.observation_space.contains(obs)
    assert (reward, terminated, truncated, info["exit_code"]) == (0.0, False, False, 3)
    assert env.step("touch /tmp/goal")[1] == 1.0
    assert env.step("true")[3] is True  # max_steps=3: truncated


def test_reset_restores_what_the_episode_deleted(env):
    env.reset()
    env.step("rm -rf /work /bin/ls && touch /tmp/goal")
    assert not env.sandbox.exec("test -e /work/task.txt").ok
    env.reset()
    assert env.sandbox.read_file("/work/task.txt") == b"the task"
    assert env.sandbox.exec("test -e /bin/ls && ! test -e /tmp/goal").ok
    assert env.steps == 0


def test_clone_and_restore_state(env):
    env.reset()
    env.step("echo one > /work/a")
    state = env.clone_state()
    env.step("rm /work/a; echo two > /work/b")
    env.restore_state(state)
    assert env.steps == 1
    assert env.sandbox.read_file("/work/a") == b"one\n"
    assert not env.sandbox.exec("test -e /work/b").ok


def test_fork_gives_independent_envs(env):
    env.reset()
    env.step("echo shared > /work/base")
    children = env.fork(3)
    try:
        assert len({c.sandbox.id for c in children} | {env.sandbox.id}) == 4
        for i, child in enumerate(children):
            assert child.steps == 1
            child.step(f"echo {i} > /work/mine; rm /work/task.txt")
        for i, child in enumerate(children):
            assert child.sandbox.read_file("/work/mine") == f"{i}\n".encode()
            assert child.sandbox.read_file("/work/base") == b"shared\n"
        assert env.sandbox.read_file("/work/task.txt") == b"the task"
        assert not env.sandbox.exec("test -e /work/mine").ok
        children[0].reset()  # back to the parent's episode root
        assert children[0].sandbox.read_file("/work/task.txt") == b"the task"
        assert not children[0].sandbox.exec("test -e /work/base").ok
        assert children[1].sandbox.read_file("/work/mine") == b"1\n"
    finally:
        for child in children:
            child.close()
    with pytest.raises(deltabox.NotFound):
        children[0].sandbox.refresh()


def test_close_destroys_the_sandbox(client):
    e = SandboxEnv(client, "tiny")
    sbx = e.sandbox
    e.close()
    e.close()  # twice is allowed
    with pytest.raises(deltabox.NotFound):
        sbx.refresh()


@pytest.mark.demo_image
def test_python_session_state_is_checkpointed(client):
    e = SandboxEnv(client, "demo", session="python", observation="text")
    try:
        e.reset()
        e.step("x = 41")
        state = e.clone_state()
        assert state.checkpoint.mode == "full"
        e.step("x = 99")
        e.restore_state(state)
        assert e.step("print(x + 1)")[0] == "42\n"
        e.reset()  # the root: x is not defined yet
        obs, _, _, _, info = e.step("print(x)")
        assert "NameError" in obs and info["exit_code"] != 0
    finally:
        e.close()


def test_vector_env(daemon):
    async def reward(sbx, result):  # the vector env's sandboxes are AsyncSandboxes
        return float((await sbx.exec("test -e /tmp/goal")).ok)

    venv = SandboxVectorEnv(3, "tiny", socket=daemon.socket, setup=_async_task,
                            reward_fn=reward, max_steps=2)
    try:
        assert venv.observation_space.contains(venv.reset(seed=0)[0])
        obs, rewards, terminated, truncated, infos = venv.step(
            ["echo 0", "touch /tmp/goal; rm /work/task.txt", "exit 7"])
        assert list(obs["stdout"]) == ["0\n", "", ""]
        assert list(obs["exit_code"]) == [0, 0, 7]
        assert list(rewards) == [0.0, 1.0, 0.0]
        assert not terminated.any() and not truncated.any()
        assert list(infos["exit_code"]) == [0, 0, 7]

        states = venv.clone_state()
        venv.step_async(["rm -rf /work"] * 3)
        _, _, _, truncated, _ = venv.step_wait()
        assert truncated.all()  # max_steps=2
        # NEXT_STEP autoreset: this step resets every env and ignores the actions
        obs, rewards, _, _, _ = venv.step(["touch /tmp/goal"] * 3)
        assert list(obs["stdout"]) == ["", "", ""] and not rewards.any()
        assert list(venv.steps) == [0, 0, 0]
        venv.restore_state(states)
        obs, *_ = venv.step(["cat /work/task.txt 2>/dev/null || echo gone"] * 3)
        assert list(obs["stdout"]) == ["the task", "gone\n", "the task"]
        venv.reset()
        obs, *_ = venv.step(["cat /work/task.txt; test -e /tmp/goal && echo goal"] * 3)
        assert list(obs["stdout"]) == ["the task"] * 3
        ids = [s.id for s in venv.sandboxes]
    finally:
        venv.close()
    with daemon.client() as c:
        assert not {s.id for s in c.list()} & set(ids)


async def _async_task(sbx):
    await sbx.write_file("/work/task.txt", "the task", make_parents=True)


def test_vector_env_batches_match_single_space(daemon):
    venv = SandboxVectorEnv(2, "tiny", socket=daemon.socket, observation="text")
    try:
        obs, _ = venv.reset()
        assert venv.observation_space.contains(obs)
        obs, rewards, *_ = venv.step(["printf 'caf\\303\\251'", "echo ok"])
        assert tuple(obs) == ("caf?", "ok\n")  # outside the charset: "?"
        assert rewards.dtype == np.float64
    finally:
        venv.close()


def test_gym_example_runs(daemon):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "rl_examples" / "gym_example.py"
    spec = importlib.util.spec_from_file_location("rl_examples_gym_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with daemon.client() as c:
        s = example.search(c)
    assert s["rewards"] == [1.0, 0.0, 0.0, 0.0] and s["root_intact"]
    r = example.rollouts(daemon.socket, envs=2, steps=4, think_s=0)
    assert r["envs"] == 2 and r["env_steps_per_s"] > 0


@pytest.mark.demo_image
def test_vector_env_sessions_and_full_states(daemon):
    venv = SandboxVectorEnv(2, "demo", socket=daemon.socket, session="python",
                            observation="text")
    try:
        venv.reset()
        venv.step(["x = 1", "x = 2"])
        states = venv.clone_state()
        assert [s.checkpoint.mode for s in states] == ["full", "full"]
        venv.step(["x = 10", "x = 20"])
        venv.restore_state(states)
        obs, *_ = venv.step(["print(x)"] * 2)
        assert tuple(obs) == ("1\n", "2\n")
    finally:
        venv.close()
