"""Configuration loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import CONFIG_ENV_VAR, ConfigError, load_config, resolve_config_path

MINIMAL = """
[sftp]
host = "sftp.example.com"
username = "test_akdq8a9wyvzba"
private_key = "keys/id_ed25519"
known_hosts = "/etc/saasquatch-agent/known_hosts"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_config_gets_safe_defaults_and_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + '[paths]\ndrop = "in"\n'))
    assert config.sftp.port == 22
    assert config.sftp.remote_dir == "/"
    assert config.sftp.private_key == tmp_path.resolve() / "keys" / "id_ed25519"
    assert config.sftp.known_hosts == Path("/etc/saasquatch-agent/known_hosts")
    assert config.paths.drop == tmp_path.resolve() / "in"
    assert config.paths.state_dir == Path("/var/lib/saasquatch-agent")
    assert config.watch.settle_seconds == 2.0 and config.watch.rescan_seconds == 60
    assert config.imports.prefixes.user_events == "userEvents"


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "agent.example.toml"
    config = load_config(example)
    assert config.sftp.username == "test_akdq8a9wyvzba"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[sftp2]\nx = 1\n", "unknown key 'sftp2'"),
        ("[watch]\nsettle = 1\n", "unknown key 'watch.settle'"),
        ("[watch]\nsettle_seconds = -1\n", "key 'watch.settle_seconds'"),
        ("[watch]\nrescan_seconds = 'often'\n", "key 'watch.rescan_seconds'"),
        ("[imports.prefixes]\nuser = 'x'\n", "unknown key 'imports.prefixes.user'"),
        ("[log]\nlevel = 'LOUD'\n", "key 'log.level'"),
    ],
)
def test_bad_keys_are_named_with_the_file(tmp_path: Path, extra: str, expected: str) -> None:
    path = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'sftp\.username'"):
        load_config(write(tmp_path, MINIMAL.replace('username = "test_akdq8a9wyvzba"\n', "")))


def test_relative_remote_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sftp\.remote_dir"):
        load_config(write(tmp_path, MINIMAL.replace("[sftp]", '[sftp]\nremote_dir = "imports"')))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[sftp\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV_VAR, raising=False)
    assert resolve_config_path(None) == Path("/etc/saasquatch-agent/agent.toml")
    monkeypatch.setenv(CONFIG_ENV_VAR, "/tmp/from-env.toml")
    assert resolve_config_path(None) == Path("/tmp/from-env.toml")
    assert resolve_config_path("/tmp/explicit.toml") == Path("/tmp/explicit.toml")


def pasted_key(kind: str) -> tuple[str, str]:
    """A private key made now, as an operator might paste it (whole, or its body only), and a line
    of its body that must never be echoed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    text = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()).decode()
    body = [line for line in text.splitlines() if line and not line.startswith("-----")]
    return (text if kind == "whole" else "\n".join(body)), body[-1]


@pytest.mark.parametrize("kind", ["whole", "body"])
def test_a_key_pasted_as_text_is_refused_without_echoing_it(tmp_path: Path, kind: str) -> None:
    """Issue 12 case 8: the value may be the key itself; the message must not repeat it."""
    pasted, secret = pasted_key(kind)
    text = MINIMAL.replace('private_key = "keys/id_ed25519"', f'private_key = """{pasted}"""')
    assert text != MINIMAL
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "sftp.private_key" in message and "pasted as text" in message
    assert secret not in message and "BEGIN" not in message
    import subprocess
    import sys

    from tests.helpers.agent_env import REPO
    for command in (["run", "--once"], ["doctor"]):  # what the issue saw printed whole
        result = subprocess.run([sys.executable, "-m", "agent", *command, "--config", str(path)],
                                capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
        assert result.returncode == 2, result
        assert secret not in result.stdout + result.stderr


def test_journal_backup_seconds_has_a_safe_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, MINIMAL)).journal.backup_seconds == 3600.0
    with pytest.raises(ConfigError, match=r"journal\.backup_seconds"):
        load_config(write(tmp_path, MINIMAL + "[journal]\nbackup_seconds = -1\n"))
