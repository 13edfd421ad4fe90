"""The asyncssh sandbox SFTP server, driven by a real paramiko client."""

from __future__ import annotations

import errno
import importlib
import io
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

pytest.importorskip("asyncssh", reason="the sandbox needs the [demo] extra")

from agent.ops.sandbox import SandboxServer

pytestmark = pytest.mark.server  # a real server or an agent process

USERNAME = "test_sandbox_user"
TIMEOUT = 5.0  # seconds, for every network wait


@dataclass(frozen=True)
class ClientKey:
    """A client key pair on disk."""

    path: Path
    public_line: str


def make_client_key(folder: Path, name: str) -> ClientKey:
    """Generate an ED25519 key with cryptography; write it in OpenSSH format, mode 0600."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    return ClientKey(path, public.decode("ascii") + " test@sandbox")


def write_known_hosts(folder: Path, line: str) -> Path:
    """Write a one-line known_hosts file."""
    path = folder / "known_hosts"
    path.write_text(line + "\n", encoding="ascii")
    return path


def connect(
    server: SandboxServer,
    key_path: Path,
    known_hosts: Path,
    username: str = USERNAME,
) -> paramiko.SSHClient:
    """Log in the way the agent does: known_hosts only, RejectPolicy, one key file."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            server.host,
            port=server.port,
            username=username,
            key_filename=str(key_path),
            look_for_keys=False,
            allow_agent=False,
            timeout=TIMEOUT,
            banner_timeout=TIMEOUT,
            auth_timeout=TIMEOUT,
            channel_timeout=TIMEOUT,
        )
    except BaseException:
        client.close()
        raise
    return client


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll `condition` until true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def client_key(tmp_path: Path) -> ClientKey:
    """The authorized client key."""
    return make_client_key(tmp_path, "id_ed25519")


@pytest.fixture
def sandbox(tmp_path: Path, client_key: ClientKey) -> Iterator[SandboxServer]:
    """A started sandbox server serving tmp_path/root."""
    server = SandboxServer(tmp_path / "root", USERNAME, client_key.public_line)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def known_hosts(tmp_path: Path, sandbox: SandboxServer) -> Path:
    """known_hosts holding the sandbox's host key."""
    return write_known_hosts(tmp_path, sandbox.known_hosts_line())


@pytest.fixture
def sftp(sandbox: SandboxServer, client_key: ClientKey, known_hosts: Path) -> Iterator[paramiko.SFTPClient]:
    """A logged-in paramiko SFTP session, every request bounded by TIMEOUT."""
    client = connect(sandbox, client_key.path, known_hosts)
    try:
        session = client.open_sftp()
        channel = session.get_channel()
        assert channel is not None
        channel.settimeout(TIMEOUT)
        yield session
        session.close()
    finally:
        client.close()


def test_known_hosts_line_and_root(sandbox: SandboxServer, tmp_path: Path) -> None:
    assert sandbox.host == "127.0.0.1"
    assert sandbox.port > 0
    line = sandbox.known_hosts_line()
    assert re.fullmatch(rf"\[127\.0\.0\.1\]:{sandbox.port} ssh-ed25519 AAAA[A-Za-z0-9+/=]+", line)
    assert (tmp_path / "root" / "imports").is_dir()


def test_upload_stat_posix_rename_lands_in_imports(
    sandbox: SandboxServer, sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    payload = b"id,email\n" + b"1,a@example.com\n" * 5000
    assert sftp.normalize(".") == "/"  # chrooted
    assert sftp.normalize("/../..") == "/"

    sftp.putfo(io.BytesIO(payload), "/imports/users.csv.part", confirm=False)
    attrs = sftp.stat("/imports/users.csv.part")
    assert attrs.st_size == len(payload)
    sftp.posix_rename("/imports/users.csv.part", "/imports/users.csv")

    assert sftp.listdir("/imports") == ["users.csv"]
    landed = tmp_path / "root" / "imports" / "users.csv"
    assert landed.read_bytes() == payload
    assert not (tmp_path / "root" / "imports" / "users.csv.part").exists()

    counts = sandbox.counts
    assert counts["open"] == 1
    assert counts["write"] >= 1
    assert counts["close"] == 1  # file handles only: closing a listing's handle is not counted
    assert counts["stat"] == 1
    assert counts["posix_rename"] == 1
    assert counts["rename"] == 0
    assert counts["scandir"] == 1
    assert counts["lstat"] == 0  # a listing is not counted as lstat requests
    assert counts is sandbox.faults.counts


def test_overwrite_with_posix_rename(sftp: paramiko.SFTPClient, tmp_path: Path) -> None:
    sftp.putfo(io.BytesIO(b"old"), "/imports/a.csv", confirm=False)
    sftp.putfo(io.BytesIO(b"new"), "/imports/a.csv.part", confirm=False)
    with pytest.raises(OSError):
        sftp.rename("/imports/a.csv.part", "/imports/a.csv")  # plain rename never overwrites
    sftp.posix_rename("/imports/a.csv.part", "/imports/a.csv")
    assert (tmp_path / "root" / "imports" / "a.csv").read_bytes() == b"new"


def test_wrong_client_key_is_refused(sandbox: SandboxServer, tmp_path: Path, known_hosts: Path) -> None:
    other = make_client_key(tmp_path, "other_ed25519")
    with pytest.raises(paramiko.AuthenticationException):
        connect(sandbox, other.path, known_hosts)


def test_wrong_username_is_refused(sandbox: SandboxServer, client_key: ClientKey, known_hosts: Path) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        connect(sandbox, client_key.path, known_hosts, username="someone_else")


def test_password_is_refused(sandbox: SandboxServer, known_hosts: Path) -> None:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        with pytest.raises(paramiko.AuthenticationException):
            client.connect(
                sandbox.host,
                port=sandbox.port,
                username=USERNAME,
                password="hunter2",
                look_for_keys=False,
                allow_agent=False,
                timeout=TIMEOUT,
                banner_timeout=TIMEOUT,
                auth_timeout=TIMEOUT,
            )
    finally:
        client.close()


def test_unknown_host_key_is_rejected(sandbox: SandboxServer, client_key: ClientKey, tmp_path: Path) -> None:
    stranger = SandboxServer(tmp_path / "other_root", USERNAME, client_key.public_line)
    foreign_key = stranger.host_public_key_line()
    known_hosts = write_known_hosts(tmp_path, f"[127.0.0.1]:{sandbox.port} {foreign_key}")
    with pytest.raises(paramiko.BadHostKeyException):
        connect(sandbox, client_key.path, known_hosts)


def test_permission_denied_on_open(sandbox: SandboxServer, sftp: paramiko.SFTPClient) -> None:
    sftp.putfo(io.BytesIO(b"readable"), "/imports/existing.csv", confirm=False)
    sandbox.faults.permission_denied_on_open = True
    opens_before = sandbox.counts["open"]

    with pytest.raises(PermissionError) as caught:
        sftp.open("/imports/new.csv", "wb")
    assert caught.value.errno == errno.EACCES
    with pytest.raises(IOError) as caught_put:
        sftp.putfo(io.BytesIO(b"x"), "/imports/new.csv", confirm=False)
    assert caught_put.value.errno == errno.EACCES
    with sftp.open("/imports/existing.csv", "rb") as handle:  # reading is still allowed
        assert handle.read() == b"readable"
    assert sandbox.counts["open"] == opens_before + 3

    sandbox.faults.permission_denied_on_open = False
    sftp.putfo(io.BytesIO(b"x"), "/imports/new.csv", confirm=False)


def test_disk_full_after_bytes(sandbox: SandboxServer, sftp: paramiko.SFTPClient, tmp_path: Path) -> None:
    sandbox.faults.disk_full_after_bytes = 1000
    big = tmp_path / "root" / "imports" / "big.csv"

    # A plain (unpipelined) write reports the server's error itself.
    with (
        pytest.raises(IOError, match="No space left on device"),
        sftp.open("/imports/big.csv", "wb") as handle,
    ):
        handle.write(b"x" * 100_000)
    # Like a real full disk: what fitted was written, the rest was refused.
    assert big.stat().st_size == 1000

    # putfo pipelines its writes and paramiko drops their error replies; only confirm=True's
    # size check notices the short file.
    with pytest.raises(IOError, match="size mismatch"):
        sftp.putfo(io.BytesIO(b"x" * 100_000), "/imports/big.csv", confirm=True)
    sftp.putfo(io.BytesIO(b"y" * 1000), "/imports/small.csv")  # fits exactly
    assert sandbox.counts["write"] >= 3

    sandbox.faults.disk_full_after_bytes = None
    sftp.putfo(io.BytesIO(b"x" * 100_000), "/imports/big.csv")
    assert big.stat().st_size == 100_000


def test_no_posix_rename_falls_back_to_rename(
    sandbox: SandboxServer, sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    sandbox.faults.no_posix_rename = True
    sftp.putfo(io.BytesIO(b"data"), "/imports/r.csv.part", confirm=False)
    with pytest.raises(IOError):
        sftp.posix_rename("/imports/r.csv.part", "/imports/r.csv")
    assert sandbox.counts["posix_rename"] == 1
    sftp.rename("/imports/r.csv.part", "/imports/r.csv")
    assert sandbox.counts["rename"] == 1
    assert (tmp_path / "root" / "imports" / "r.csv").read_bytes() == b"data"


def test_stall_writes_until_cleared(
    sandbox: SandboxServer, sftp: paramiko.SFTPClient, tmp_path: Path
) -> None:
    sandbox.faults.stall_writes = True
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            sftp.putfo(io.BytesIO(b"z" * 5000), "/imports/slow.csv", confirm=False)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    assert wait_for(lambda: sandbox.counts["write"] >= 1)
    worker.join(0.3)
    assert worker.is_alive(), "the upload should hang while writes are stalled"

    sandbox.faults.stall_writes = False
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert errors == []
    assert (tmp_path / "root" / "imports" / "slow.csv").read_bytes() == b"z" * 5000


def test_stop_is_bounded_with_a_stalled_write(tmp_path: Path, client_key: ClientKey) -> None:
    server = SandboxServer(tmp_path / "root", USERNAME, client_key.public_line)
    with server:
        known_hosts = write_known_hosts(tmp_path, server.known_hosts_line())
        client = connect(server, client_key.path, known_hosts)
        try:
            session = client.open_sftp()
            channel = session.get_channel()
            assert channel is not None
            channel.settimeout(TIMEOUT)
            server.faults.stall_writes = True
            errors: list[BaseException] = []

            def upload() -> None:
                try:
                    session.putfo(io.BytesIO(b"q" * 100), "/imports/q.csv", confirm=False)
                except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                    errors.append(exc)

            worker = threading.Thread(target=upload, daemon=True)
            worker.start()
            assert wait_for(lambda: server.counts["write"] >= 1)
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 3.0
            assert not server.running
            worker.join(TIMEOUT)
            assert not worker.is_alive()
            assert len(errors) == 1, "the stalled upload must fail once the server stops"
            assert isinstance(errors[0], (OSError, EOFError, paramiko.SSHException)), errors
        finally:
            client.close()
    server.stop()  # idempotent


def test_host_key_path_is_created_then_reused(tmp_path: Path, client_key: ClientKey) -> None:
    key_path = tmp_path / "state" / "sandbox_host_ed25519"
    first = SandboxServer(tmp_path / "root", USERNAME, client_key.public_line, key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    second = SandboxServer(tmp_path / "root", USERNAME, client_key.public_line, key_path)
    assert first.host_public_key_line() == second.host_public_key_line()
    assert first.host_public_key_line().startswith("ssh-ed25519 AAAA")
    with second:
        known_hosts = write_known_hosts(tmp_path, second.known_hosts_line())
        connect(second, client_key.path, known_hosts).close()


def test_bad_authorized_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="authorized_public_key"):
        SandboxServer(tmp_path / "root", USERNAME, "not a key")


def test_faults_reset(sandbox: SandboxServer, sftp: paramiko.SFTPClient) -> None:
    sftp.listdir("/")
    sandbox.faults.stall_writes = True
    sandbox.faults.disk_full_after_bytes = 1
    sandbox.faults.reset()
    assert sandbox.counts["scandir"] == 0
    sftp.putfo(io.BytesIO(b"ok"), "/imports/ok.csv", confirm=False)
    assert sandbox.counts["write"] == 1


def test_listing_errors(sandbox: SandboxServer, sftp: paramiko.SFTPClient) -> None:
    with pytest.raises(FileNotFoundError):
        sftp.listdir("/nowhere")
    sftp.putfo(io.BytesIO(b"f"), "/imports/f.csv", confirm=False)
    with pytest.raises(OSError):
        sftp.listdir("/imports/f.csv")
    assert sorted(sftp.listdir("/")) == ["imports"]
    assert sandbox.counts["scandir"] == 3


def test_missing_asyncssh_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncssh", None)  # makes `import asyncssh` fail
    monkeypatch.delitem(sys.modules, "agent.ops.sandbox")
    with pytest.raises(ImportError, match=re.escape("pip install -e '.[demo]'")):
        importlib.import_module("agent.ops.sandbox")
