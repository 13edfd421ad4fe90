"""SFTP WRITE size: the server's limits@openssh.com answer (capped), else 32 KiB.

Three real servers: OpenSSH sshd (states 261120 bytes in 9.2), the asyncssh sandbox (states 4 MiB)
and paramiko's own SFTP server (no limits@openssh.com: the fallback). Each upload goes through
the publish protocol (agent.transport.publish); the sandbox and the paramiko server count the WRITEs they got.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import SftpConfig
from agent.ops.sandbox import SandboxServer
from agent.pipeline.upload import Uploader
from agent.store.archive import Filer
from agent.store.journal import FileRecord, Journal
from agent.transport import publish
from agent.transport.sftp import MAX_WRITE_REQUEST, SFTP_WRITE_CHUNK, SftpSession, server_write_limit
from tests.helpers.configs import make_config
from tests.helpers.sshd import SshdServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]  # real servers
TIMEOUT = 10.0
PAYLOAD = 1024 * 1024  # a multiple of every request size: WRITE count = PAYLOAD / size
USERNAME = "test_write_size"


def make_key(folder: Path) -> tuple[Path, str]:
    """An ED25519 key pair: the private key file (0600) and the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    path = folder / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode("ascii")


def make_uploader(tmp_path: Path, sftp: SftpConfig) -> tuple[Uploader, Journal, FileRecord]:
    config = make_config(tmp_path, sftp=sftp)
    journal = Journal(tmp_path / "journal.sqlite3")
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(PAYLOAD))
    record = journal.add_claim(source.name, source, tmp_path)
    return Uploader(config, journal, Filer(config, journal), SftpSession(sftp)), journal, record


def send(uploader: Uploader, record: FileRecord, remote: str) -> paramiko.SFTPClient:
    """The publish protocol's open, write and close steps for one file (agent.transport.publish)."""
    sftp = uploader.session.client()
    data = Path(record.source_path).read_bytes()
    upload = publish.Upload(record.id, len(data), hashlib.sha256(data).hexdigest(), record.source_path,
                            remote, remote + ".final")
    pacer = publish.Pacer(lambda: False, lambda: None, 0, lambda _seconds: None)
    publish.open_all(sftp, [upload])
    publish.write_all(sftp, [upload], uploader.session.write_request_size(sftp), pacer)
    publish.close_all(sftp, [upload])
    assert upload.complete, (upload.error, upload.step, upload.remote_size)
    return sftp


def test_openssh_states_its_limit_and_gets_capped_writes(sshd_server: SshdServer, tmp_path: Path) -> None:
    cfg = SftpConfig(host=sshd_server.host, port=sshd_server.port, username=sshd_server.username,
                     private_key=sshd_server.user_key_path, known_hosts=sshd_server.known_hosts_path,
                     remote_dir=sshd_server.remote_dir, operation_timeout=TIMEOUT)
    uploader, journal, record = make_uploader(tmp_path, cfg)
    try:
        sftp = uploader.session.client()
        limit = server_write_limit(sftp)
        assert limit is not None and limit >= MAX_WRITE_REQUEST  # OpenSSH 9.2 states 261120
        assert uploader.session.write_request_size(sftp) == MAX_WRITE_REQUEST
        before = sftp.request_number
        send(uploader, record, f"{cfg.remote_dir}/payload.part")
        # OPEN, PAYLOAD / 128 KiB WRITEs, FSTAT, CLOSE; the limit is not asked again on this connection
        assert sftp.request_number - before == 3 + PAYLOAD // MAX_WRITE_REQUEST
        received = sshd_server.local_remote_dir / "payload.part"
        assert received.read_bytes() == Path(record.source_path).read_bytes()
    finally:
        uploader.session.close()
        journal.close()


def test_sandbox_receives_capped_writes(tmp_path: Path) -> None:
    key, public = make_key(tmp_path)
    with SandboxServer(tmp_path / "root", USERNAME, public) as server:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(server.known_hosts_line() + "\n")
        cfg = SftpConfig(host=server.host, port=server.port, username=USERNAME, private_key=key,
                         known_hosts=known_hosts, remote_dir="/imports", operation_timeout=TIMEOUT)
        uploader, journal, record = make_uploader(tmp_path, cfg)
        try:
            send(uploader, record, "/imports/payload.part")
            assert server.counts["write"] == PAYLOAD // MAX_WRITE_REQUEST  # asyncssh states 4 MiB
            received = tmp_path / "root" / "imports" / "payload.part"
            assert received.read_bytes() == Path(record.source_path).read_bytes()
        finally:
            uploader.session.close()
            journal.close()


class _CountingHandle(paramiko.SFTPHandle):  # type: ignore[misc]
    def __init__(self, flags: int, sizes: list[int]) -> None:
        super().__init__(flags)
        self.sizes = sizes

    def write(self, offset: int, data: bytes) -> Any:
        self.sizes.append(len(data))
        return super().write(offset, data)

    def stat(self) -> Any:  # FSTAT: the publish protocol reads the size the server holds
        self.writefile.flush()
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.writefile.fileno()))


class _WriteOnlySftp(paramiko.SFTPServerInterface):  # type: ignore[misc]
    """Files are written flat into `root`; every WRITE's size is recorded."""

    root: Path
    sizes: list[int]

    def open(self, path: str, flags: int, attr: Any) -> Any:
        handle = _CountingHandle(flags, self.sizes)
        handle.writefile = open(self.root / Path(path).name, "wb")  # noqa: SIM115 - the handle closes it
        return handle


class _KeyOnly(paramiko.ServerInterface):  # type: ignore[misc]
    def __init__(self, username: str, public: paramiko.PKey) -> None:
        self.username, self.public = username, public

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == self.username and key.asbytes() == self.public.asbytes()
        return int(paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        refused = paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        return int(paramiko.OPEN_SUCCEEDED if kind == "session" else refused)


@pytest.fixture
def paramiko_server(tmp_path: Path) -> Iterator[tuple[SftpConfig, type[_WriteOnlySftp]]]:
    """paramiko's SFTP server (no limits@openssh.com) for one connection on 127.0.0.1."""
    key, _public_line = make_key(tmp_path)
    client_key = paramiko.PKey.from_path(key)
    host_key = paramiko.ECDSAKey.generate()
    root = tmp_path / "remote"
    root.mkdir()
    _WriteOnlySftp.root, _WriteOnlySftp.sizes = root, []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        transport = paramiko.Transport(conn)
        transports.append(transport)
        transport.add_server_key(host_key)
        transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _WriteOnlySftp)
        transport.start_server(server=_KeyOnly(USERNAME, client_key))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
    cfg = SftpConfig(host="127.0.0.1", port=port, username=USERNAME, private_key=key,
                     known_hosts=known_hosts, remote_dir="/", operation_timeout=TIMEOUT)
    try:
        yield cfg, _WriteOnlySftp
    finally:
        listener.close()
        for transport in transports:
            transport.close()
        thread.join(TIMEOUT)


def test_server_without_limits_gets_32_kib_writes(
        paramiko_server: tuple[SftpConfig, type[_WriteOnlySftp]], tmp_path: Path) -> None:
    cfg, server = paramiko_server
    uploader, journal, record = make_uploader(tmp_path, cfg)
    try:
        sftp = uploader.session.client()
        assert server_write_limit(sftp) is None  # answered SSH_FX_OP_UNSUPPORTED
        assert uploader.session.write_request_size(sftp) == SFTP_WRITE_CHUNK
        send(uploader, record, "/payload.part")
        assert server.sizes == [SFTP_WRITE_CHUNK] * (PAYLOAD // SFTP_WRITE_CHUNK)
        assert (server.root / "payload.part").read_bytes() == Path(record.source_path).read_bytes()
    finally:
        uploader.session.close()
        journal.close()
