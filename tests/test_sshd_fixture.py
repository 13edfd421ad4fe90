"""The real-sshd fixture and the TCP fault proxy work as the agent's tests expect."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from tests.helpers import sshd as sshd_module
from tests.helpers.sshd import SSHD_MISSING_MESSAGE, KeyKind, SshdNotFoundError, SshdServer
from tests.helpers.tcp_proxy import TcpProxy

TIMEOUT = 10.0  # seconds, for every network wait
pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]  # real servers

# what a client may see when its connection is cut, reset or refused
BROKEN = (OSError, EOFError, paramiko.SSHException)


def connect(
    server: SshdServer,
    *,
    port: int | None = None,
    key: Path | None = None,
    known_hosts: Path | None = None,
    timeout: float = TIMEOUT,
) -> paramiko.SSHClient:
    """Log in with paramiko, strict host key checking, only the given key."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.load_host_keys(str(known_hosts or server.known_hosts_path))
    try:
        client.connect(
            server.host,
            port or server.port,
            username=server.username,
            key_filename=str(key or server.user_key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except BaseException:
        client.close()
        raise
    return client


def open_sftp(client: paramiko.SSHClient, timeout: float = TIMEOUT) -> paramiko.SFTPClient:
    """Open SFTP with a bounded wait on every request."""
    sftp = client.open_sftp()
    channel = sftp.get_channel()
    assert channel is not None
    channel.settimeout(timeout)
    return sftp


def test_openssh_sftp_client_uploads_into_imports(sshd_server: SshdServer, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    source = tmp_path / "batch-0001.csv"
    source.write_bytes(payload)
    batch = tmp_path / "batch.txt"
    batch.write_text(f'put "{source}" "{sshd_server.remote_dir}/batch-0001.csv"\n')
    sftp = shutil.which("sftp")
    assert sftp, "OpenSSH sftp client not found: apt-get install -y openssh-client"

    proc = subprocess.run(
        [
            sftp, "-b", str(batch), "-F", "/dev/null",
            "-i", str(sshd_server.user_key_path),
            "-o", f"UserKnownHostsFile={sshd_server.known_hosts_path}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ConnectTimeout=10",
            "-P", str(sshd_server.port),
            f"{sshd_server.username}@{sshd_server.host}",
        ],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    uploaded = sshd_server.local_remote_dir / "batch-0001.csv"
    assert uploaded.read_bytes() == payload
    assert sshd_server.local_path(f"{sshd_server.remote_dir}/batch-0001.csv") == uploaded


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_paramiko_logs_in_with_user_key(sshd_server: SshdServer, tmp_path: Path, kind: KeyKind) -> None:
    key = sshd_server.make_user_key(tmp_path / f"id_{kind}", kind)
    with connect(sshd_server, key=key) as client:
        sftp = open_sftp(client)
        with sftp.open(f"{sshd_server.remote_dir}/{kind}.txt", "wb") as fh:
            fh.write(kind.encode())
        assert sftp.listdir(sshd_server.remote_dir) == [f"{kind}.txt"]
    assert (sshd_server.local_remote_dir / f"{kind}.txt").read_bytes() == kind.encode()
    assert f"Accepted publickey for {sshd_server.username}" in sshd_server.read_log()


def test_default_user_key_logs_in(sshd_server: SshdServer) -> None:
    with connect(sshd_server) as client:
        assert open_sftp(client).listdir(sshd_server.remote_dir) == []


def test_unauthorized_key_is_refused_until_authorized(sshd_server: SshdServer, tmp_path: Path) -> None:
    key = sshd_server.make_user_key(tmp_path / "id_other", authorize=False)
    with pytest.raises(paramiko.AuthenticationException):
        connect(sshd_server, key=key)
    sshd_server.authorize_key(key.with_name(key.name + ".pub"))
    with connect(sshd_server, key=key) as client:
        assert open_sftp(client).listdir(sshd_server.remote_dir) == []


def test_known_hosts_file_has_the_bracketed_port_form(sshd_server: SshdServer) -> None:
    line = sshd_server.known_hosts_path.read_text().strip()
    assert line.startswith(f"[127.0.0.1]:{sshd_server.port} ssh-ed25519 AAAA")


def test_wrong_known_hosts_is_rejected(sshd_server: SshdServer, tmp_path: Path) -> None:
    wrong = sshd_server.wrong_known_hosts(tmp_path / "known_hosts_wrong")
    assert wrong.read_text() != sshd_server.known_hosts_path.read_text()
    with pytest.raises(paramiko.BadHostKeyException):
        connect(sshd_server, known_hosts=wrong)


def test_unknown_host_is_rejected(sshd_server: SshdServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(sshd_server, known_hosts=empty)


def test_chroot_hides_the_real_filesystem(sshd_server: SshdServer) -> None:
    if not sshd_server.is_chroot:
        pytest.skip("chroot needs root (CI runs as root)")
    assert sshd_server.remote_dir == "/imports"
    with connect(sshd_server) as client:
        sftp = open_sftp(client)
        assert sftp.listdir("/") == ["imports"]
        with pytest.raises(FileNotFoundError):
            sftp.stat("/etc/passwd")
        with pytest.raises(PermissionError):
            sftp.open("/outside.txt", "wb")
    assert sshd_server.chroot_dir is not None
    chroot = sshd_server.chroot_dir.stat()
    assert (chroot.st_uid, stat.S_IMODE(chroot.st_mode)) == (0, 0o755)
    imports = sshd_server.local_remote_dir.stat()
    assert imports.st_uid == pwd.getpwnam(sshd_server.username).pw_uid
    assert str(sshd_server.local_remote_dir).startswith("/srv/saasquatch-agent-tests/")


def test_stop_kills_sessions_and_start_reuses_the_port(sshd_server: SshdServer) -> None:
    port = sshd_server.port
    client = connect(sshd_server)
    try:
        sftp = open_sftp(client)
        sftp.putfo(io.BytesIO(b"first"), f"{sshd_server.remote_dir}/first.txt")
        sshd_server.stop()
        assert not sshd_server.running
        with pytest.raises(BROKEN):
            sftp.listdir(sshd_server.remote_dir)
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass

    sshd_server.start()
    assert sshd_server.running and sshd_server.port == port
    with connect(sshd_server) as client:
        sftp = open_sftp(client)
        sftp.putfo(io.BytesIO(b"second"), f"{sshd_server.remote_dir}/second.txt")
        assert sorted(sftp.listdir(sshd_server.remote_dir)) == ["first.txt", "second.txt"]


def test_kill_sessions_keeps_listening(sshd_server: SshdServer) -> None:
    with connect(sshd_server) as client:
        sftp = open_sftp(client)
        assert sshd_server.kill_sessions() >= 1
        with pytest.raises(BROKEN):
            sftp.listdir(sshd_server.remote_dir)
    with connect(sshd_server) as client:
        assert open_sftp(client).listdir(sshd_server.remote_dir) == []


def test_close_removes_everything() -> None:
    server = SshdServer()
    with server:
        client = connect(server)  # left open on purpose: close() must still clean up
        open_sftp(client).listdir(server.remote_dir)
        listener = server.sshd_pid
        assert listener is not None
    client.close()
    assert not server.running
    assert not server.temp_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(listener, 0)
    if server.is_chroot:
        assert server.run_dir is not None and not server.run_dir.exists()
        with pytest.raises(KeyError):
            pwd.getpwnam(server.username)  # userdel worked: no zombie kept the uid busy


def test_named_user_is_reused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("system users need root")
    name = "test_" + os.urandom(6).hex()
    assert sshd_module.ensure_system_user(name) is True
    try:
        assert sshd_module.ensure_system_user(name) is False  # idempotent
        with SshdServer(name) as server, connect(server) as client:
            assert server.username == name
            assert open_sftp(client).listdir("/") == ["imports"]
        pwd.getpwnam(name)  # not ours to delete: still there
    finally:
        assert sshd_module.delete_user(name)


def test_first_start_moves_off_a_port_taken_meanwhile() -> None:
    server = SshdServer()
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            taken = server.port
            server.start()
        assert server.port != taken
        assert f"]:{server.port} " in server.known_hosts_path.read_text()
        with connect(server) as client:
            assert open_sftp(client).listdir(server.remote_dir) == []
    finally:
        server.close()


def test_stale_runs_of_dead_processes_are_cleaned_up() -> None:
    if os.geteuid() != 0:
        pytest.skip("system users need root")
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    name = "test_" + os.urandom(6).hex()
    assert sshd_module.ensure_system_user(name)
    stale = sshd_module.TESTS_ROOT / f"20000101-000000-{dead.pid}-deadbeef"
    try:
        (stale / name / "imports").mkdir(parents=True)
        (stale / "owner").write_text(f"{name} 1\n")
        assert stale in sshd_module.cleanup_stale_runs()
        assert not stale.exists()
        with pytest.raises(KeyError):
            pwd.getpwnam(name)
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        sshd_module.delete_user(name)


def test_missing_sshd_fails_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(os, "access", lambda _path, _mode: False)
    with pytest.raises(SshdNotFoundError) as info:
        SshdServer()
    assert str(info.value) == SSHD_MISSING_MESSAGE
    assert "apt-get install -y openssh-server" in str(info.value)


# --------------------------------------------------------------------- proxy


def test_proxy_forwards_a_session_and_cut_all_breaks_it(
    sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path
) -> None:
    client = connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts)
    try:
        sftp = open_sftp(client)
        sftp.putfo(io.BytesIO(b"via proxy"), f"{sshd_server.remote_dir}/p.txt")
        stats = sshd_proxy.stats()
        assert stats.connections_total == 1 and stats.connections_active == 1
        assert stats.bytes_to_target > 0 and stats.bytes_to_client > 0

        assert sshd_proxy.cut_all() == 1
        assert sshd_proxy.connections_active == 0 and sshd_proxy.connections_cut == 1
        with pytest.raises(BROKEN):
            sftp.listdir(sshd_server.remote_dir)
    finally:
        client.close()
    assert (sshd_server.local_remote_dir / "p.txt").read_bytes() == b"via proxy"
    with connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts) as client:
        assert open_sftp(client).listdir(sshd_server.remote_dir) == ["p.txt"]


def test_proxy_adds_latency_each_way(
    sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path
) -> None:
    with connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts) as client:
        sftp = open_sftp(client)
        start = time.monotonic()
        sftp.stat(sshd_server.remote_dir)
        fast = time.monotonic() - start
        sshd_proxy.delay_ms = 150
        start = time.monotonic()
        sftp.stat(sshd_server.remote_dir)
        slow = time.monotonic() - start
    assert slow >= 0.3 and slow > fast  # one round trip: at least 150 ms there + 150 ms back


def test_proxy_stall_holds_bytes_until_resume(
    sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path
) -> None:
    with connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts) as client:
        sftp = open_sftp(client)
        sshd_proxy.stall()
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(sftp.listdir(sshd_server.remote_dir)))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not result  # nothing gets through
        sshd_proxy.resume()
        worker.join(TIMEOUT)
        assert not worker.is_alive() and result == [[]]

    sshd_proxy.stall()  # a new connection is accepted, but no banner ever comes
    with pytest.raises(paramiko.SSHException):
        connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts, timeout=0.5)
    assert sshd_proxy.connections_total == 2
    sshd_proxy.resume()


def test_proxy_refuse_mode(sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path) -> None:
    sshd_proxy.refuse = True
    with pytest.raises(BROKEN):
        connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts)
    assert sshd_proxy.wait_until(lambda p: p.connections_refused == 1, 5)
    sshd_proxy.refuse = False
    with connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts) as client:
        assert open_sftp(client).listdir(sshd_server.remote_dir) == []


def test_proxy_cuts_after_n_uploaded_bytes(
    sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path
) -> None:
    payload = os.urandom(2_000_000)
    with connect(sshd_server, port=sshd_proxy.port, known_hosts=proxy_known_hosts) as client:
        sftp = open_sftp(client)
        already = sshd_proxy.bytes_to_target
        sshd_proxy.cut_after_bytes = already + 500_000
        with pytest.raises(BROKEN):
            sftp.putfo(io.BytesIO(payload), f"{sshd_server.remote_dir}/big.bin")
    sshd_proxy.cut_after_bytes = None
    assert sshd_proxy.wait_until(lambda p: p.connections_cut == 1, 5)  # counted by the proxy's thread
    assert sshd_proxy.bytes_to_target == already + 500_000
    partial = sshd_server.local_remote_dir / "big.bin"
    assert partial.exists() and partial.stat().st_size < len(payload)
    assert payload.startswith(partial.read_bytes())


def test_proxy_close_is_bounded() -> None:
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen()
        proxy = TcpProxy("127.0.0.1", target.getsockname()[1])
        conn = socket.create_connection(proxy.address, timeout=2)
        try:
            assert proxy.wait_until(lambda p: p.connections_active == 1, timeout=2)
            start = time.monotonic()
            proxy.close()
            assert time.monotonic() - start < 2
            assert proxy.connections_active == 0
            conn.settimeout(2)
            with pytest.raises(OSError):  # reset by the proxy
                for _ in range(3):
                    if not conn.recv(10):
                        raise ConnectionResetError("closed")
        finally:
            conn.close()
