"""deltabox.adapters against a real daemon, each driven through its library's own API:
SkyRL-Gym (`skyrl_gym.make`, `init`, `step`) and OpenEnv (`create_app` served by uvicorn,
an `EnvClient` over its WebSocket). For each: an episode, a reset that really rolls the
sandbox back (what the episode wrote is gone, seen through the sandbox), and forks whose
children are independent. Scripted policies: no model is called."""

from __future__ import annotations

import pytest

from waiting import wait_for

import deltabox

# openenv-core serves through uvicorn's legacy websockets protocol (see ServedTask)
pytestmark = [pytest.mark.filterwarnings("ignore:websockets.legacy is deprecated"),
              pytest.mark.filterwarnings("ignore:remove second argument of ws_handler")]

TASK = "mkdir -p /work && echo 1 > /work/counter"
TEST = "grep -qx 3 /work/counter"


def bash(command: str) -> str:
    """What a model says when it runs `command`."""
    return f"Let me run this.\n```bash\n{command}\n```\n"


def test_import_deltabox_needs_no_adapter_library():
    import subprocess
    import sys
    code = ("import sys, deltabox, deltabox.adapters, deltabox.gym; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('skyrl_gym', 'openenv', 'openenv_core', 'fastapi', 'gradio')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---- SkyRL-Gym ----------------------------------------------------------------------------------

@pytest.fixture
def skyrl_gym():
    return pytest.importorskip("skyrl_gym")


@pytest.fixture
def skyrl_env(client, skyrl_gym):
    from omegaconf import OmegaConf  # SkyRL's trainer passes its Hydra config section

    from deltabox.adapters.skyrl import ENV_ID
    env = skyrl_gym.make(ENV_ID, env_config=OmegaConf.create({"image": "tiny", "max_turns": 5}),
                         client=client, extras={"setup": TASK, "reward_spec": {"test": TEST}})
    yield env
    env.close()


def test_skyrl_episode_through_make_init_step(skyrl_env):
    from deltabox.adapters.skyrl import SandboxTextEnv
    env = skyrl_env
    assert isinstance(env, SandboxTextEnv) and env.spec.id == "deltabox-sandbox"
    prompt = [{"role": "user", "content": "Make /work/counter say 3."}]
    assert env.init(prompt)[0] == prompt
    out = env.step(bash("cat /work/counter; echo oops >&2; exit 4"))
    assert out["done"] is False and out["reward"] == 0.0
    assert out["metadata"]["exit_code"] == 4
    content = out["observations"][0]["content"]
    assert content.startswith("exit code 4") and "1\n" in content and "oops" in content
    out = env.step("I think I'm done, but forgot the block.")
    assert out["observations"][0]["content"].startswith("Put one shell command")
    env.step(bash("echo 3 > /work/counter"))
    out = env.step("<submit/>")
    assert out["done"] is True and out["reward"] == 1.0 and out["observations"] == []
    assert env.get_metrics() == {"turns": 4, "commands": 2, "failed_commands": 1}


def test_skyrl_init_rolls_the_sandbox_back(skyrl_env):
    env = skyrl_env
    env.init([])
    env.step(bash("echo 3 > /work/counter; echo junk > /work/new; rm /bin/cat"))
    assert env.sandbox.read_file("/work/new") == b"junk\n"
    env.init([])  # the next trajectory on this env
    assert not env.sandbox.exec("test -e /work/new").ok
    assert env.sandbox.read_file("/work/counter") == b"1\n"
    assert env.sandbox.exec("test -e /bin/cat").ok
    assert env.step("<submit/>")["reward"] == 0.0  # the counter says 1 again


def test_skyrl_max_turns_ends_the_episode(skyrl_env):
    skyrl_env.init([])
    outs = [skyrl_env.step(bash("echo 3 > /work/counter")) for _ in range(5)]
    assert [o["done"] for o in outs] == [False] * 4 + [True]
    assert outs[-1]["reward"] == 1.0


def test_skyrl_checkpoint_rollback_and_group_fork(skyrl_env):
    env = skyrl_env
    env.init([])
    env.step(bash("echo 2 > /work/counter"))
    state = env.checkpoint()
    env.step(bash("echo 9 > /work/counter"))
    env.rollback(state)
    assert env.turns == 1 and env.sandbox.read_file("/work/counter") == b"2\n"

    group = env.fork(3)  # a GRPO group: three trajectories from one state
    try:
        assert len({g.sandbox.id for g in group} | {env.sandbox.id}) == 4
        answers = ["3", "4", "3"]
        rewards = []
        for child, answer in zip(group, answers):
            assert child.turns == 1
            child.step(bash(f"echo {answer} > /work/counter; touch /work/mine-{answer}"))
            rewards.append(child.step("<submit/>")["reward"])
        assert rewards == [1.0, 0.0, 1.0]
        assert group[1].sandbox.read_file("/work/counter") == b"4\n"
        assert not group[1].sandbox.exec("test -e /work/mine-3").ok
        assert env.sandbox.read_file("/work/counter") == b"2\n"  # the parent is untouched
        group[0].init([])  # a child's init returns to the task's root
        assert group[0].sandbox.read_file("/work/counter") == b"1\n"
        assert group[2].sandbox.read_file("/work/counter") == b"3\n"
    finally:
        for child in group:
            child.close()
    with pytest.raises(deltabox.NotFound):
        group[0].sandbox.refresh()


def test_skyrl_failed_setup_is_an_error_and_leaves_no_sandbox(client, skyrl_gym):
    from deltabox.adapters.skyrl import ENV_ID
    before = {s.id for s in client.list()}
    with pytest.raises(deltabox.DeltaboxError):
        skyrl_gym.make(ENV_ID, env_config={"image": "tiny"}, client=client,
                       extras={"setup": "exit 3"})
    assert {s.id for s in client.list()} == before


# ---- OpenEnv ------------------------------------------------------------------------------------

def _counter_says_3(sbx, result) -> float:
    """Reward from the sandbox itself."""
    return float(sbx.exec(["/bin/sh", "-c", TEST]).ok)


@pytest.fixture
def openenv_server(client):
    """A SandboxTask served by OpenEnv's own create_app under uvicorn; yields (task, url)."""
    pytest.importorskip("openenv.core")
    from deltabox.adapters.openenv import SandboxTask, serve

    task = SandboxTask(client, "tiny", setup=lambda sbx: sbx.exec(["/bin/sh", "-c", TASK]).check(),
                       reward_fn=_counter_says_3, done_fn=lambda sbx, r: r.exit_code == 42,
                       max_steps=6)
    try:
        with serve(task, max_sessions=4) as served:
            yield task, served.url
    finally:
        task.close()


def _session(url):
    from deltabox.adapters.openenv import SandboxClient
    return SandboxClient(base_url=url).sync()


def test_openenv_episode_through_the_websocket_client(openenv_server, client):
    from deltabox.adapters.openenv import SandboxAction
    task, url = openenv_server
    with _session(url) as env:
        first = env.reset(episode_id="ep-1")
        assert first.done is False and first.observation.stdout == ""
        state = env.state()
        assert state.episode_id == "ep-1" and state.step_count == 0
        assert state.sandbox_id != task.template.sandbox.id  # a fork of the task's root
        result = env.step(SandboxAction(command="cat /work/counter; echo oops >&2; exit 4"))
        obs = result.observation
        assert (obs.stdout, obs.stderr, obs.exit_code) == ("1\n", "oops\n", 4)
        assert result.reward == 0.0 and result.done is False
        result = env.step(SandboxAction(command="echo 3 > /work/counter"))
        assert result.reward == 1.0
        assert env.step(SandboxAction(command="exit 42")).done is True  # done_fn
        assert env.state().step_count == 3
        # the command ran in the session's sandbox, seen through DeltaBox
        assert client.get(state.sandbox_id).read_file("/work/counter") == b"3\n"
    # the server closes the session's environment: its sandbox is destroyed
    wait_for(lambda: state.sandbox_id not in {s.id for s in client.list()},
             "the closed session's sandbox to be destroyed")


def test_openenv_reset_rolls_the_sandbox_back(openenv_server, client):
    from deltabox.adapters.openenv import SandboxAction
    _, url = openenv_server
    with _session(url) as env:
        env.reset()
        sandbox = client.get(env.state().sandbox_id)
        env.step(SandboxAction(command="echo 3 > /work/counter; echo junk > /work/new"))
        assert sandbox.read_file("/work/new") == b"junk\n"
        env.reset()
        assert not sandbox.exec("test -e /work/new").ok
        assert sandbox.read_file("/work/counter") == b"1\n"
        assert env.state().step_count == 0


def test_openenv_checkpoint_and_rollback_ops(openenv_server, client):
    from deltabox.adapters.openenv import SandboxAction
    _, url = openenv_server
    with _session(url) as env:
        env.reset()
        env.step(SandboxAction(command="echo 2 > /work/counter"))
        made = env.step(SandboxAction(op="checkpoint")).observation.checkpoint_id
        assert made and env.state().checkpoint_ids == [made]
        env.step(SandboxAction(command="echo 9 > /work/counter; touch /work/later"))
        env.step(SandboxAction(op="rollback", checkpoint_id=made))
        sandbox = client.get(env.state().sandbox_id)
        assert sandbox.read_file("/work/counter") == b"2\n"
        assert not sandbox.exec("test -e /work/later").ok
        assert env.state().step_count == 1
        with pytest.raises(RuntimeError, match="no checkpoint 'nope' in this episode"):
            env.step(SandboxAction(op="rollback", checkpoint_id="nope"))
        assert env.step(SandboxAction(command="cat /work/counter")).observation.stdout == "2\n"


def test_openenv_sessions_and_forks_are_independent(openenv_server, client):
    from deltabox.adapters.openenv import SandboxAction
    task, url = openenv_server
    with _session(url) as a, _session(url) as b:
        a.reset()
        b.reset()
        assert a.state().sandbox_id != b.state().sandbox_id
        a.step(SandboxAction(command="echo 3 > /work/counter"))
        assert b.step(SandboxAction(command="cat /work/counter")).observation.stdout == "1\n"

    parent = task()  # the factory the server calls: a SandboxEnvironment in Python
    try:
        parent.reset()
        parent.step(SandboxAction(command="echo 2 > /work/counter"))
        children = parent.fork(3)
        try:
            for i, child in enumerate(children):
                assert child.state.step_count == 1
                child.step(SandboxAction(command=f"echo {i} > /work/counter"))
            assert [c.sandbox.read_file("/work/counter") for c in children] == \
                [b"0\n", b"1\n", b"2\n"]
            assert parent.sandbox.read_file("/work/counter") == b"2\n"
            children[0].reset()  # back to the task's root
            assert children[0].sandbox.read_file("/work/counter") == b"1\n"
            assert children[1].sandbox.read_file("/work/counter") == b"1\n"
        finally:
            for child in children:
                child.close()
    finally:
        parent.close()


def test_openenv_task_close_destroys_sessions_left_open(client):
    pytest.importorskip("openenv.core")
    from deltabox.adapters.openenv import SandboxTask
    task = SandboxTask(client, "tiny")
    left_open = task()  # as a server that stops leaves its sessions
    closed = task()
    closed.close()
    ids = {left_open.sandbox.id, closed.sandbox.id, task.template.sandbox.id}
    assert left_open.sandbox.id in {s.id for s in client.list()}
    task.close()
    assert not ids & {s.id for s in client.list()}
    assert task.sessions == 2


# ---- the examples (rl_examples/), at a small size ----------------------------------------------

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "rl_examples"


def _example(daemon, name: str, *args: str) -> dict:
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--socket",
                        str(daemon.socket), "--json", *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_skyrl_example(daemon):
    pytest.importorskip("skyrl_gym")
    out = _example(daemon, "skyrl_example", "--groups", "2", "--files", "100")
    assert out["rewards"] == [1.0, 0.0, 0.0, 1.0] and out["root_intact"] is True
    assert out["advantages"] == [1.0, -1.0, -1.0, 1.0]
    assert out["turns"] == [4, 2, 3, 3]


def test_openenv_example(daemon):
    pytest.importorskip("openenv.core")
    out = _example(daemon, "openenv_example", "--sessions", "4", "--rounds", "1", "--files", "100")
    assert out["rewards"] == [1.0] * 4
    assert out["rollbacks"] == 3  # the three sessions whose edit failed the test
