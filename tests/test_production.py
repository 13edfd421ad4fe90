"""Production concerns, end to end against the real sshd: key hygiene at start-up, host-key trust
(`trust-host`, a changed key), `doctor`, symlinks to secrets, logs without key material and with
file ids, metrics, proxy_command and bandwidth_limit, and scripts/install.sh."""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import paramiko
import pytest

from agent.config import load_config
from tests.helpers.agent_env import REPO, AgentEnv, wait_until
from tests.helpers.sshd import SshdServer, free_port

pytestmark = pytest.mark.timeout(90)

USERS_CSV = b"accountId,id,email\nacct-1,user-1,ana@example.com\nacct-2,user-2,bo@example.com\n"


def ssh_keygen(path: Path, *args: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-f", str(path), *args], check=True, timeout=60,
                   stdin=subprocess.DEVNULL, capture_output=True)
    return path


def remote_files(server: SshdServer) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in server.local_remote_dir.iterdir()}


# ------------------------------------------------------------------------ keys at start-up


@pytest.mark.parametrize("problem", ["mode-0644", "passphrase", "dsa", "ecdsa"])
def test_unusable_key_stops_run_at_startup(sshd_server: SshdServer, tmp_path: Path, problem: str) -> None:
    key = tmp_path / f"key-{problem}"
    if problem == "mode-0644":
        key.write_bytes(sshd_server.user_key_path.read_bytes())
        os.chmod(key, 0o644)
        expected = f"readable by group or others (mode 0644); fix it with `chmod 600 {key}`"
    elif problem == "passphrase":
        ssh_keygen(key, "-t", "ed25519", "-N", "secret-passphrase")
        expected = ("protected by a passphrase; SaaSquatch needs a key without one"
                    " (remove it with `ssh-keygen -p")
    elif problem == "dsa":
        ssh_keygen(key, "-t", "dsa", "-N", "")
        expected = ("is a DSA key, which SaaSquatch does not accept; make an ED25519 key with"
                    " `saasquatch-agent keygen")
    else:
        ssh_keygen(key, "-t", "ecdsa", "-N", "")
        expected = "of type ecdsa-sha2-nistp256, which SaaSquatch does not accept (ED25519 and RSA only)"
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.write_config(settle_seconds=0, private_key=key)
    dropped = env.drop_atomically("users_keep.csv", USERS_CSV)
    for command in (("run", "--once"), ("run",)):  # the daemon fails fast too, never retries for ever
        result = env.cli(*command, "--config", str(env.config_path), timeout=30)
        assert result.returncode == 1, result.stderr
        assert "cannot start: private key" in result.stderr and expected in result.stderr, result.stderr
    assert dropped.read_bytes() == USERS_CSV  # the file waits where it was
    assert remote_files(sshd_server) == {}


# ------------------------------------------------------------------------ host keys


def test_changed_host_key_stops_uploads_loudly(sshd_server: SshdServer, tmp_path: Path) -> None:
    wrong = sshd_server.wrong_known_hosts(tmp_path / "known_hosts_wrong")
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.write_config(settle_seconds=0, known_hosts=wrong)
    env.drop_atomically("users_hk.csv", USERS_CSV)
    result = env.run_once()
    assert result.returncode == 1
    old = paramiko.HostKeys(str(wrong)).lookup(f"[127.0.0.1]:{sshd_server.port}")
    new = paramiko.HostKeys(str(sshd_server.known_hosts_path)).lookup(f"[127.0.0.1]:{sshd_server.port}")
    assert old is not None and new is not None
    message = re.search(r"HOST KEY MISMATCH[^\n]*", result.stderr)
    assert message, result.stderr
    assert old["ssh-ed25519"].fingerprint in message.group(0)
    assert new["ssh-ed25519"].fingerprint in message.group(0)
    assert env.states() == {"users_hk.csv": "queued"}
    assert remote_files(sshd_server) == {}


def test_trust_host_asks_or_matches_fingerprint(sshd_server: SshdServer, tmp_path: Path) -> None:
    known = tmp_path / "keys" / "known_hosts"
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    env.write_config(known_hosts=known)
    name = f"[127.0.0.1]:{sshd_server.port}"
    fingerprint = paramiko.HostKeys(str(sshd_server.known_hosts_path)).lookup(name)["ssh-ed25519"].fingerprint
    args = ("--config", str(env.config_path))

    declined = subprocess.run(env.command("trust-host", *args), input="n\n", capture_output=True, text=True,
                              cwd=REPO, timeout=30, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert declined.returncode == 1 and "not confirmed; nothing written" in declined.stderr
    assert f"{name} offers a ssh-ed25519 host key" in declined.stdout
    assert f"fingerprint: {fingerprint}" in declined.stdout
    assert not known.exists()

    mismatch = env.cli("trust-host", *args, "--fingerprint", "SHA256:" + "A" * 43)
    assert mismatch.returncode == 1 and "fingerprint mismatch" in mismatch.stderr and not known.exists()

    ok = env.cli("trust-host", *args, "--fingerprint", fingerprint + "=")  # padding is fine
    assert ok.returncode == 0, ok.stderr
    assert known.read_text() == sshd_server.known_hosts_path.read_text()  # "[host]:port type key"
    again = env.cli("trust-host", *args)
    assert again.returncode == 0 and "already trusted" in again.stdout

    # a changed key: shown loudly, replaced only on confirmation; hashed form is understood
    sshd_server.wrong_known_hosts(known)
    confirmed = subprocess.run(env.command("trust-host", *args, "--hash"), input="y\n", capture_output=True,
                               text=True, cwd=REPO, timeout=30, check=False,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert confirmed.returncode == 0, confirmed.stderr
    assert "has a DIFFERENT key" in confirmed.stdout
    line = known.read_text()
    assert line.startswith("|1|") and line.count("\n") == 1 and str(sshd_server.port) not in line
    env.drop_atomically("users_trusted.csv", USERS_CSV)
    assert env.run_once().returncode == 0
    assert len(remote_files(sshd_server)) == 1


# ------------------------------------------------------------------------ doctor


def test_doctor_passes_before_start_and_leaves_nothing(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)  # before any start: no folders yet
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    checks = [line.split(":")[0] for line in lines if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert checks == ["PASS configuration", "PASS paths and permissions", "PASS same filesystem",
                      "PASS private key", "PASS known_hosts", "PASS DNS", "PASS TCP", "PASS host key",
                      "PASS SSH login", "PASS remote folder listable", "PASS remote folder writable",
                      "PASS SFTP extensions", "PASS clock"]
    assert "probe file written and removed" in result.stdout
    assert remote_files(sshd_server) == {}
    assert not env.state.exists()  # doctor changes nothing locally either


def test_doctor_reports_each_failure_with_its_fix(sshd_server: SshdServer, tmp_path: Path) -> None:
    key = tmp_path / "loose_key"
    key.write_bytes(sshd_server.user_key_path.read_bytes())
    os.chmod(key, 0o640)
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    env.write_config(private_key=key, known_hosts=sshd_server.wrong_known_hosts(tmp_path / "wrong"))
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 1
    out = result.stdout
    assert "FAIL private key:" in out and f"fix it with `chmod 600 {key}`" in out
    assert "FAIL host key: HOST KEY MISMATCH" in out and "trust-host" in out
    assert "SKIP SSH login: not checked: private key, host key failed" in out
    assert "PASS TCP" in out and out.count("     fix: ") == 2

    env.write_config(port=free_port())  # nothing listens there
    refused = env.cli("doctor", "--config", str(env.config_path))
    assert refused.returncode == 1 and "FAIL TCP: cannot connect to 127.0.0.1:" in refused.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[sftp]\nhost = "h"\n')
    assert env.cli("doctor", "--config", str(bad)).returncode == 2


# ------------------------------------------------------------------------ secrets and logs


def test_symlink_to_a_secret_is_never_read_or_sent(sshd_server: SshdServer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_bytes(b"accountId,id\nTOP-SECRET-" + os.urandom(8).hex().encode() + b",x\n")
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.drop.mkdir(parents=True)
    (env.drop / "users_link.csv").symlink_to(secret)
    (env.drop / "users").mkdir()
    (env.drop / "users" / "users_key.csv").symlink_to(sshd_server.user_key_path)
    env.drop_atomically("users_real.csv", USERS_CSV)
    result = env.run_once()
    assert result.returncode == 0, result.stderr
    assert "left alone" in result.stderr and "users_link.csv" in result.stderr
    assert list(remote_files(sshd_server).values()) == [USERS_CSV]
    assert (env.drop / "users_link.csv").is_symlink()
    assert [r["name"] for r in env.status()] == ["users_real.csv"]


def _key_material(key_path: Path) -> list[str]:
    """Strings that would show a private key leaked: PEM body lines and the raw secret encodings."""
    text = key_path.read_text()
    body = [line for line in text.splitlines() if line and not line.startswith("-----")]
    key = paramiko.Ed25519Key.from_private_key_file(str(key_path))
    raw = key._signing_key.encode()  # the 32-byte ED25519 seed
    return [*body, raw.hex(), base64.b64encode(raw).decode(), "".join(body)[:40]]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_logs_name_the_file_and_hold_no_key_material(sshd_server: SshdServer, tmp_path: Path,
                                                     log_format: str) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.write_config(f'[log]\nlevel = "DEBUG"\nformat = "{log_format}"\n', settle_seconds=0)
    env.drop_atomically("users_logs.csv", USERS_CSV)
    env.drop_atomically("users_bad.csv", b"accountId,id\n,\n")
    result = env.run_once()
    assert result.returncode == 1  # the bad file is refused
    logs = result.stdout + result.stderr
    for needle in _key_material(sshd_server.user_key_path):
        assert needle not in logs
    ids = {r["name"]: r["id"] for r in env.status()}
    if log_format == "json":
        records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        about = [r for r in records if "users_logs.csv" in r["message"] or "users_bad.csv" in r["message"]]
        assert len(about) >= 4
        for record in about:
            name = "users_logs.csv" if "users_logs.csv" in record["message"] else "users_bad.csv"
            assert record["file_id"] == ids[name] and record["file"] == name, record
        messages = [r["message"] for r in records if r.get("file") == "users_logs.csv"]
        assert any("uploaded as" in m for m in messages), records
        assert any("archived to" in m for m in messages), records
    else:
        assert "\x1b[" not in logs  # no colour codes when stderr is not a terminal
        for line in result.stderr.splitlines():
            if "users_logs.csv" in line:
                assert f"#{ids['users_logs.csv']} 'users_logs.csv'" in line, line


# ------------------------------------------------------------------------ metrics


def test_metrics_endpoint_and_textfile(sshd_server: SshdServer, tmp_path: Path) -> None:
    port = free_port()
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    env.write_config(f'[metrics]\nprometheus_port = {port}\ntextfile = "metrics/agent.prom"\n'
                     "textfile_seconds = 0.2\n")
    (env.root / "metrics").mkdir()
    env.start()
    try:
        env.drop_atomically("users_metrics.csv", USERS_CSV)
        env.drop_atomically("users_refused.csv", b"accountId,id\n,\n")
        assert wait_until(lambda: env.states() == {"users_metrics.csv": "archived",
                                                   "users_refused.csv": "failed"}, 30), env.log()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        prom = env.root / "metrics" / "agent.prom"
        assert wait_until(lambda: prom.exists() and "uploaded_files_total 1.0" in prom.read_text(), 10)
    finally:
        assert env.stop() == 0
    for text in (scraped, prom.read_text()):
        assert 'saasquatch_agent_files{import_type="users",state="archived"} 1.0' in text
        assert 'saasquatch_agent_files{import_type="users",state="failed"} 1.0' in text
        assert f"saasquatch_agent_uploaded_bytes_total {float(len(USERS_CSV))}" in text
        assert "saasquatch_agent_queue_depth 0.0" in text
        assert "saasquatch_agent_oldest_waiting_seconds 0.0" in text
        assert "saasquatch_agent_retries_total 0.0" in text
        last = re.search(r"^saasquatch_agent_last_success_timestamp_seconds (\S+)$", text, re.M)
        assert last and float(last.group(1)) > 1.7e9
    assert "saasquatch_agent_upload_duration_seconds_count 1.0" in scraped
    with pytest.raises(OSError):  # loopback only, and gone after stop
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_count_queue_and_retries_while_the_server_is_down(sshd_server: SshdServer,
                                                                  tmp_path: Path) -> None:
    from agent.ops.metrics import JournalCollector

    sshd_server.stop()
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.drop_atomically("users_waiting.csv", USERS_CSV)
    assert env.run_once().returncode == 1
    samples = {s.name: s.value for m in JournalCollector(env.state / "journal.sqlite3").collect()
               for s in m.samples}
    assert samples["saasquatch_agent_queue_depth"] == 1
    assert samples["saasquatch_agent_retries_total"] == 2  # once_max_attempts = 2
    assert samples["saasquatch_agent_oldest_waiting_seconds"] > 0
    assert samples["saasquatch_agent_last_success_timestamp_seconds"] == 0


# ------------------------------------------------------------------------ proxy and bandwidth


def test_proxy_command_carries_the_connection(sshd_server: SshdServer, tmp_path: Path) -> None:
    marker = tmp_path / "proxy-used"
    forward = (
        "import socket, sys, threading, pathlib;"
        f"pathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv[1:]));"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10);"
        "threading.Thread(target=lambda: [sys.stdout.buffer.write(d) or sys.stdout.buffer.flush()"
        " for d in iter(lambda: s.recv(65536), b'')], daemon=True).start();"
        "[s.sendall(d) for d in iter(lambda: sys.stdin.buffer.read1(65536), b'')]"
    )
    script = tmp_path / "forward.py"
    script.write_text(forward.replace(";", "\n"))
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    text = env.config_path.read_text().replace(
        "[paths]", f'proxy_command = "{sys.executable} {script} %h %p"\n\n[paths]', 1)
    env.config_path.write_text(text)
    assert load_config(env.config_path).sftp.proxy_command
    env.drop_atomically("users_proxy.csv", USERS_CSV)
    result = env.run_once()
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == f"127.0.0.1 {sshd_server.port}"
    assert list(remote_files(sshd_server).values()) == [USERS_CSV]


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_bandwidth_limit_paces_the_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    """bytes/s never ahead of sftp.bandwidth_limit: with a fake clock, the waits add up to size/limit."""
    from agent.transport import publish

    clock = _FakeClock()
    monkeypatch.setattr(publish, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    beats: list[int] = []
    pacer = publish.Pacer(lambda: False, lambda: beats.append(1), 40_000, clock.wait)
    chunk = pacer.read_size()
    assert chunk <= 10_000  # a quarter second of the limit at a time
    chunks = [min(chunk, 100_000 - start) for start in range(0, 100_000, chunk)]
    for size in chunks:
        pacer.after(size)
    assert clock.now - 1000.0 == pytest.approx(100_000 / 40_000)
    assert len(beats) == len(chunks)  # the watchdog hears of every chunk
    stopping = publish.Pacer(lambda: True, lambda: None, 0, clock.wait)
    with pytest.raises(InterruptedError):
        stopping.after(1)


def test_bandwidth_limited_upload_end_to_end(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    text = env.config_path.read_text().replace("[paths]", "bandwidth_limit = 400000\n\n[paths]", 1)
    env.config_path.write_text(text)
    payload = b"accountId,id\n" + b"".join(b"a%d,u%d\n" % (i, i) for i in range(20000))
    env.drop_atomically("users_slow.csv", payload)
    assert env.run_once().returncode == 0
    assert list(remote_files(sshd_server).values()) == [payload]


# ------------------------------------------------------------------------ install script


def test_install_script_is_idempotent_and_uninstalls(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the install script test needs root (CI runs as root)"
    suffix = os.urandom(3).hex()
    user, group = f"sqa-{suffix}", f"sqd-{suffix}"
    env = {**os.environ, "SAASQUATCH_ETC": str(tmp_path / "etc"), "SAASQUATCH_LIB": str(tmp_path / "lib"),
           "SAASQUATCH_UNIT_DIR": str(tmp_path / "units"), "SAASQUATCH_OPT": str(tmp_path / "opt"),
           "SAASQUATCH_BIN": str(tmp_path / "bin"), "SAASQUATCH_USER": user, "SAASQUATCH_DROP_GROUP": group}
    (tmp_path / "units").mkdir()
    script = [str(REPO / "scripts" / "install.sh")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", *script, *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    try:
        for _ in range(2):  # the second run changes nothing and does not fail
            first = run("--no-package", "--instance", "live")
            assert first.returncode == 0, first.stderr
        assert "saasquatch-agent trust-host --config" in first.stdout and "keygen" in first.stdout
        uid = pwd.getpwnam(user).pw_uid
        drop = tmp_path / "lib" / "live" / "drop"
        for path, mode, owner in ((drop, 0o2770, uid), (drop / "users", 0o2770, uid),
                                  (tmp_path / "lib" / "live", 0o711, uid),
                                  (tmp_path / "lib" / "live" / "spool", 0o700, uid),
                                  (tmp_path / "etc" / "keys", 0o750, 0),
                                  (tmp_path / "etc" / "live.toml", 0o640, 0)):
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, owner), path
        assert drop.stat().st_gid == __import__("grp").getgrnam(group).gr_gid
        config = load_config(tmp_path / "etc" / "live.toml")
        assert config.paths.drop == drop and config.sftp.private_key == tmp_path / "etc/keys/live_ed25519"
        unit = (tmp_path / "units" / "saasquatch-agent@.service").read_text()
        assert f"ExecStart={tmp_path}/bin/saasquatch-agent run --config {tmp_path}/etc/%i.toml" in unit

        kept = run("--uninstall", "--instance", "live")
        assert kept.returncode == 0 and not (tmp_path / "units" / "saasquatch-agent@.service").exists()
        assert drop.is_dir() and (tmp_path / "etc" / "live.toml").exists()  # data is kept
        purged = run("--uninstall", "--instance", "live", "--purge")
        assert purged.returncode == 0, purged.stderr
        assert not (tmp_path / "lib").exists() and not (tmp_path / "etc").exists()
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False, timeout=30)
        subprocess.run(["groupdel", group], capture_output=True, check=False, timeout=30)

