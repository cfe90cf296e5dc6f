"""The daemon's configuration (deltabox.config, deltabox.server.config_args): the file, the
flags, the environment, and the errors a wrong file gets.

Every `Config` field must be reachable from /etc/deltabox/config.toml and documented, with its
default, in systemd/config.toml: the tests introspect the dataclass, so a new field without
a setting (or without its line in the shipped file) fails here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from deltabox.cli import build_parser
from deltabox.config import (SETTINGS, Config, ConfigError, from_environment,
                             read_config_file)
from deltabox.server.config_args import config_from_args

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "systemd" / "config.toml"
BY_FIELD = {s.field: s for s in SETTINGS}


def _config(tmp_path: Path, toml: str | None, *flags: str, environ=None) -> Config:
    argv = ["daemon", *flags]
    if toml is not None:
        path = tmp_path / "config.toml"
        path.write_text(toml)
        argv += ["--config", str(path)]
    else:
        argv += ["--config", "none"]
    return config_from_args(build_parser().parse_args(argv), environ or {})


def test_file_only(tmp_path):
    cfg = _config(tmp_path, f'''
state-dir = "{tmp_path}/state"
durable = true
standby = false
warm-budget = "1G"
default-memory = 268435456
max-fork = 7
image-dir = ["{tmp_path}", "/tmp"]
store-reserve = "2%"
log-level = "debug"
metrics-address = "127.0.0.1:9464"
''')
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.durable is True and cfg.standby is False
    assert cfg.warm_budget_bytes == 1 << 30 and cfg.default_memory_bytes == 256 << 20
    assert cfg.max_fork == 7 and cfg.store_reserve == "2%" and cfg.log_level == "debug"
    assert cfg.image_dirs == (tmp_path.resolve(), Path("/tmp").resolve())
    assert cfg.metrics_address == "127.0.0.1:9464"
    # What the file does not name keeps its default.
    assert cfg.max_chain_depth == Config().max_chain_depth
    assert cfg.socket == Config().socket


def test_flags_override_the_file_and_the_file_the_environment(tmp_path):
    toml = '''
state-dir = "/from/file"
durable = true
standby = false
warm-budget = "1G"
max-fork = 7
image-dir = ["/from/file/images"]
'''
    env = {"DELTABOX_STATE_DIR": "/from/env", "DELTABOX_SOCKET": "/from/env.sock",
           "DELTABOX_LOG_LEVEL": "warning"}
    cfg = _config(tmp_path, toml, "--no-durable", "--warm-budget", "2G", "--image-dir", "/a",
                  "--image-dir", "/b", environ=env)
    assert cfg.durable is False                   # flag over file (a bool can be turned off)
    assert cfg.warm_budget_bytes == 2 << 30       # flag over file
    assert cfg.image_dirs == (Path("/a"), Path("/b"))  # a repeated flag replaces the list
    assert cfg.standby is False and cfg.max_fork == 7  # file only
    assert cfg.state_dir == Path("/from/file")    # file over environment
    assert cfg.socket == Path("/from/env.sock")   # environment over default
    assert cfg.log_level == "warning"
    # A reserve in bytes, as a flag and as a key (the inode reserve is a count).
    cfg = _config(tmp_path, 'store-reserve = "1G"\n', "--store-reserve-inodes", "500")
    assert (cfg.store_reserve, cfg.store_reserve_inodes) == ("1G", "500")
    cfg = _config(tmp_path, None, "--store-reserve", "256M")
    assert cfg.store_reserve == "256M"
    with pytest.raises(ConfigError, match="--store-reserve-inodes"):
        _config(tmp_path, None, "--store-reserve-inodes", "256M")
    # The CLI's top-level --socket (`deltabox --socket S daemon`) still names the socket.
    args = build_parser().parse_args(["--socket", "/top.sock", "daemon", "--config", "none"])
    assert config_from_args(args, {}).socket == Path("/top.sock")


def test_environment_is_read_when_the_daemon_starts_not_at_import(tmp_path):
    env = {**os.environ, "DELTABOX_STATE_DIR": "/env/state", "DELTABOX_CRIU_PREFIX": "/env/criu",
           "DELTABOX_CACHE": "/env/cache"}
    res = subprocess.run([sys.executable, "-c", "from deltabox.config import Config; "
                          "c = Config(); print(c.state_dir, c.criu_prefix, c.image_dirs[0])"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["/var/lib/deltabox", "/opt/deltabox/criu",
                                  "/var/cache/deltabox/images"], res.stderr
    got = from_environment(env)
    assert got["state_dir"] == Path("/env/state") and got["criu_prefix"] == Path("/env/criu")
    assert got["image_dirs"] == (Path("/env/cache/images"),)


@pytest.mark.parametrize("toml, named", [
    ('no-such-setting = 1\n', "'no-such-setting'"),
    ('token = "secret"\n', "'token'"),                 # the token never goes in the file
    ('[daemon]\nstate-dir = "/x"\n', "'daemon'"),      # no sections
    ('socket_group = "x"\n', "'socket_group'"),        # keys are the flags' spelling
])
def test_unknown_key_is_an_error_naming_it(tmp_path, toml, named):
    with pytest.raises(ConfigError, match=re.escape(named)) as e:
        _config(tmp_path, toml)
    assert str(tmp_path / "config.toml") in str(e.value)


@pytest.mark.parametrize("toml, key", [
    ('max-fork = "7"\n', "max-fork"),
    ('max-fork = -1\n', "max-fork"),
    ('durable = "yes"\n', "durable"),
    ('standby = 1\n', "standby"),
    ('image-dir = "/one/dir"\n', "image-dir"),
    ('warm-budget = "lots"\n', "warm-budget"),
    ('warm-budget = true\n', "warm-budget"),
    ('state-dir = 42\n', "state-dir"),
    ('metrics-address = "9464"\n', "metrics-address"),
    ('log-level = "loud"\n', "log-level"),
    ('max-image-bytes = 0\n', "max-image-bytes"),      # parses, refused by the check
    ('store-reserve = "lots"\n', "store-reserve"),
    ('state-dir = \n', "not valid TOML"),
])
def test_wrong_type_or_value_is_an_error_naming_the_key(tmp_path, toml, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        _config(tmp_path, toml)


def test_the_daemon_refuses_a_bad_file_before_touching_anything(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('state-dir = "/never/made"\nmax-fork = "many"\n')
    res = subprocess.run([sys.executable, "-m", "deltabox.cli", "daemon", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "max-fork" in res.stderr and "expected an integer" in res.stderr, res.stderr
    assert not Path("/never/made").exists()


def _sample(setting, i: int, tmp_path: Path):
    """A TOML value for `setting` unlike its default, and the Config value it must give."""
    default = getattr(Config(), setting.field)
    kind = setting.convert.__name__
    if kind == "_as_bool":
        return (not default), (not default)
    if kind == "_as_int":
        return 1000 + i, 1000 + i
    if kind == "_as_size":
        return f"{i + 3}M", (i + 3) << 20
    if kind == "_as_size_text":
        return f"{i + 3}G", f"{i + 3}G"
    if kind == "_as_path":
        return f"/srv/{setting.key}", Path(f"/srv/{setting.key}")
    if kind == "_as_paths":
        return [f"/srv/{setting.key}"], (Path(f"/srv/{setting.key}"),)
    if kind == "_as_str":
        return f"v{i}", f"v{i}"
    if kind == "_as_reserve":
        return f"{i % 50}%", f"{i % 50}%"
    if kind == "_as_address":
        return f"127.0.0.1:{9000 + i}", f"127.0.0.1:{9000 + i}"
    if kind == "_as_level":
        return "debug", "debug"
    if kind == "_as_token_file":
        token = tmp_path / "token"
        token.write_text("s3cret-token\n")
        token.chmod(0o600)
        return str(token), "s3cret-token"
    if kind == "_as_key_file":
        key = tmp_path / "transfer-key"
        key.write_bytes(b"k" * 32)
        key.chmod(0o600)
        return str(key), b"k" * 32
    if kind == "_as_on_exit":
        return "keep", "keep"
    if kind == "_as_double_policy":
        return "never", "never"
    if kind == "_as_ksm":
        return "auto", "auto"
    pytest.fail(f"no sample value for {setting.key} ({kind}): add one here")


def test_every_config_field_is_reachable_from_the_file(tmp_path):
    names = [f.name for f in dataclasses.fields(Config)]
    missing = [n for n in names if n not in BY_FIELD]
    assert not missing, f"Config fields with no setting in deltabox.config.SETTINGS: {missing}"
    assert len({s.key for s in SETTINGS}) == len(SETTINGS)
    lines, expected = [], {}
    for i, s in enumerate(SETTINGS):
        value, expected[s.field] = _sample(s, i, tmp_path)
        lines.append(f"{s.key} = {_toml(value)}")
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    cfg = Config(**read_config_file(path))
    for name in names:
        assert getattr(cfg, name) == expected[name], name
        assert getattr(cfg, name) != getattr(Config(), name), name


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value + '"'
    return str(value)


def test_the_shipped_file_documents_every_key_with_its_default():
    text = SHIPPED.read_text()
    assert tomllib.loads(text) == {"socket-group": "deltabox"}   # all else commented out
    documented = {}
    for line in text.splitlines():
        m = re.fullmatch(r"#?([a-z-]+) = (.+)", line)
        if m:
            documented[m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
    keys = [s.key for s in SETTINGS]
    assert sorted(documented) == sorted(keys), set(documented) ^ set(keys)
    defaults = Config()
    for s in SETTINGS:
        default = getattr(defaults, s.field)
        if default is None:
            continue  # no default: the line shows an example
        assert s.convert(s.key, documented[s.key]) == default, s.key
    # The file is valid as the daemon reads it, each line uncommented too.
    uncommented = re.sub(r"^#([a-z-]+ = )", r"\1", text, flags=re.M)
    uncommented = re.sub(r'^token-file = .*$', "", uncommented, flags=re.M)  # needs the file
    assert tomllib.loads(uncommented).keys() == set(keys) - {"token-file"}


def test_token_flag_refused_and_token_file_read(tmp_path):
    with pytest.raises(ConfigError, match="--token is refused"):
        _config(tmp_path, None, "--token", "abc")
    token = tmp_path / "token"
    token.write_text("file-token\n")
    token.chmod(0o600)
    cfg = _config(tmp_path, f'token-file = "{token}"\n')
    assert cfg.token == "file-token"
    token.chmod(0o644)
    with pytest.raises(ConfigError, match="token-file"):
        _config(tmp_path, f'token-file = "{token}"\n')
