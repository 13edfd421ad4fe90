"""Works with the SFTP servers that exist (issue 13): the same delivery scenarios against every server
fixture of tests/helpers/servers.py, with the agent as a real process.

Each scenario ends with the invariant: every input's bytes are on the server exactly once, under a
final name no other file has (SHA-256 of each server file against the inputs), no temporary file is
left on the server, and every local copy is in archive/ (failed/ empty).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.servers import SERVER_IDS, SERVERS, ServerSpec, SftpTestServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(150)]

DELIVERY_TIMEOUT = 30.0  # seconds a scenario waits for every file to reach archive/ (each takes < 6 s)
BIG_BYTES = 30 * 1024 * 1024


def users_csv(rows: int, tag: str, pad: int = 0) -> bytes:
    filler = "x" * pad
    lines = ["accountId,id,email"] + [f"acct-{tag}-{i},{tag}-{i}{filler},{tag}.{i}@example.com"
                                      for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


_big: list[bytes] = []


def big_csv() -> bytes:
    """A users CSV of about 30 MB (under the default max_records), made once per run."""
    if not _big:
        _big.append(users_csv(BIG_BYTES // 120, "big", pad=72))
    return _big[0]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=SERVERS, ids=SERVER_IDS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[ServerSpec, SftpTestServer]]:
    spec: ServerSpec = request.param
    instance = spec.make()  # a missing program fails here with its apt-get line
    try:
        instance.start()  # type: ignore[attr-defined]
        yield spec, instance
        print(f"--- {spec.id} server log (tail) ---\n{instance.read_log()[-3000:]}")
    finally:
        instance.close()


def agent_env(tmp_path: Path, spec: ServerSpec, srv: SftpTestServer, *, sftp: str = "", upload: str = "",
              extra: str = "") -> AgentEnv:
    """An agent for `srv` with the settings its spec names (README's compatibility table)."""
    sections = f"[upload]\n{spec.upload_config}\n{upload}\n\n{extra}"
    return AgentEnv(tmp_path / "agent", host=srv.host, port=srv.port, username=srv.username,
                    private_key=srv.user_key_path, known_hosts=srv.known_hosts_path,
                    remote_dir=srv.remote_dir, settle_seconds=0, sftp_extra=f"{spec.sftp_config}\n{sftp}",
                    extra=sections)


def server_files(srv: SftpTestServer) -> dict[str, bytes]:
    return {entry.name: Path(entry.path).read_bytes() for entry in os.scandir(srv.local_remote_dir)
            if entry.is_file()}


def deliver(env: AgentEnv, count: int, *, timeout: float = DELIVERY_TIMEOUT) -> None:
    """Start the daemon, wait until `count` files are archived (or one failed), stop it."""
    env.start()
    try:
        done = wait_until(lambda: len(env.archived_files()) >= count or failed_files(env) != [], timeout,
                          interval=0.1)
    finally:
        code = env.stop()
    assert done, f"{len(env.archived_files())}/{count} archived in {timeout} s:\n{env.log()[-4000:]}"
    assert code == 0, env.log()[-3000:]


def failed_files(env: AgentEnv) -> list[str]:
    return sorted(p.name for p in env.failed.rglob("*") if p.is_file()) if env.failed.exists() else []


def assert_delivered(env: AgentEnv, srv: SftpTestServer, inputs: dict[str, bytes],
                     taken: dict[str, bytes] | None = None) -> None:
    """Every input on the server once under its own final name, nothing else there, all archived."""
    log = env.log()[-3000:]
    assert failed_files(env) == [], f"files in failed/: {failed_files(env)}\n{log}"
    remote = server_files(srv)
    if taken is not None:  # status mode "consumed": what the server took plus what is still there
        assert not set(taken) & set(remote), "a name was published twice"
        remote = {**remote, **taken}
    rows = env.status()
    finals = {row["remote_name"] for row in rows}
    assert {row["state"] for row in rows} == {"archived"}, rows
    assert len(finals) == len(inputs), f"{len(finals)} distinct remote names for {len(inputs)} inputs"
    leftovers = sorted(set(remote) - finals)
    assert leftovers == [], f"files left on the server that are no final name (temporary?): {leftovers}"
    assert Counter(sha(data) for data in remote.values()) == Counter(sha(data) for data in inputs.values()), \
        "the server's files are not the inputs' bytes exactly once each"
    by_remote = {row["remote_name"]: row["sha256"] for row in rows}
    for name, data in remote.items():
        assert sha(data) == by_remote[name], f"{name} holds other bytes than the journal's row"
    archived = Counter(sha(p.read_bytes()) for p in env.archived_files())
    assert archived == Counter(sha(data) for data in inputs.values()), "archive/ does not hold every input"


# ---------------------------------------------------------------------------------------------- scenarios


def test_fifty_small_files_in_batches(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    spec, srv = server
    env = agent_env(tmp_path, spec, srv, upload="batch_files = 16")
    inputs = {f"users_batch{i:02d}.csv": users_csv(1 + i * 3, f"b{i}") for i in range(50)}
    for name, data in inputs.items():
        env.drop_atomically(name, data)
    deliver(env, len(inputs))
    assert_delivered(env, srv, inputs)
    assert " ERROR " not in env.log(), env.log()[-3000:]
    assert "pasted" not in env.log() and "check that the public key" not in env.log(), env.log()[-3000:]


def test_thirty_megabyte_file(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    spec, srv = server
    env = agent_env(tmp_path, spec, srv)
    inputs = {"users_big.csv": big_csv()}
    env.drop_atomically("users_big.csv", inputs["users_big.csv"])
    deliver(env, 1)
    assert_delivered(env, srv, inputs)


def test_unicode_file_name(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    spec, srv = server
    env = agent_env(tmp_path, spec, srv)
    inputs = {"users_Ünïcødé-日本語 ß.csv": users_csv(20, "uni"),
              "users_ümlaut-medium.csv": users_csv(9000, "med")}  # ~400 KB: the single-file path
    for name, data in inputs.items():
        env.drop_atomically(name, data)
    deliver(env, len(inputs))
    assert_delivered(env, srv, inputs)
    assert {row["name"] for row in env.status()} == set(inputs)


def test_crash_mid_file_and_resume(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    """kill -9 while the 30 MB file is being sent (paced by sftp.bandwidth_limit), then start again."""
    spec, srv = server
    big = big_csv()
    env = agent_env(tmp_path, spec, srv, sftp="bandwidth_limit = 12000000")  # ~2.6 s for 30 MB
    env.drop_atomically("users_crash.csv", big)
    env.spawn()
    seen: list[int] = []

    def partial_on_server() -> bool:
        sizes = [size for size in (_size(p) for p in srv.local_remote_dir.iterdir()) if size is not None]
        seen[:] = sizes
        return any(3_000_000 <= size < len(big) for size in sizes) or failed_files(env) != []

    try:
        mid = wait_until(partial_on_server, 30, interval=0.02)
        env.kill()
    finally:
        env.kill()
    assert mid and failed_files(env) == [], \
        f"no partial upload on the server (sizes {seen}):\n{env.log()[-3000:]}"
    assert not any(size == len(big) for size in seen) or len(seen) > 1, "the kill came too late"
    deliver(env, 1)
    assert_delivered(env, srv, {"users_crash.csv": big})


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class Consumer:
    """The server side of status mode `consumed`: takes (reads, then removes) each file published under
    an import prefix, as SaaSquatch does when it starts an import."""

    def __init__(self, folder: Path, prefix: str = "users") -> None:
        self.folder = folder
        self.prefix = prefix
        self.taken: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="consumer")

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:  # bounded in time
            for entry in os.scandir(self.folder):
                if entry.name.startswith(self.prefix) and entry.name not in self.taken:
                    path = Path(entry.path)
                    self.taken[entry.name] = path.read_bytes()
                    path.unlink()
            self._stop.wait(0.05)

    def __enter__(self) -> Consumer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_status_consumed(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    spec, srv = server
    env = agent_env(tmp_path, spec, srv, extra='[status]\nmode = "consumed"\npoll_seconds = 0.3\n')
    inputs = {f"users_taken{i}.csv": users_csv(5 + i, f"t{i}") for i in range(8)}
    inputs["users_taken_large.csv"] = users_csv(9000, "tl")
    with Consumer(srv.local_remote_dir) as consumer:
        for name, data in inputs.items():
            env.drop_atomically(name, data)
        deliver(env, len(inputs))
    assert_delivered(env, srv, inputs, taken=consumer.taken)
    assert len(consumer.taken) == len(inputs)


# ---------------------------------------------------------------------------------------------- doctor


def test_doctor_runs_the_publish_protocol(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    """With the settings the server needs, doctor passes: publish protocol once, extensions listed."""
    spec, srv = server
    env = agent_env(tmp_path, spec, srv)
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS remote folder writable: publish protocol works" in result.stdout
    assert "PASS SFTP extensions: offered:" in result.stdout
    assert server_files(srv) == {}, "doctor left a file on the server"


@pytest.mark.parametrize("server", [spec for spec in SERVERS if spec.id == "proftpd-nohidden"], indirect=True,
                         ids=["proftpd-nohidden"])
def test_doctor_names_the_refused_hidden_temporary_name(server: tuple[ServerSpec, SftpTestServer],
                                                        tmp_path: Path) -> None:
    _, srv = server
    env = agent_env(tmp_path, ServerSpec("default-names", SERVERS[0].make, ""), srv)
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAIL remote folder writable"))
    assert "could not create the temporary file: the server refused /imports/.doctor-" in line, line
    assert "upload.temp_name" in result.stdout and "hidden names" in result.stdout
    assert server_files(srv) == {}


@pytest.mark.parametrize("server", [spec for spec in SERVERS if spec.id == "openssh-rsa-sha1"], indirect=True,
                         ids=["openssh-rsa-sha1"])
def test_doctor_suggests_rsa_sha1(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    _, srv = server
    env = agent_env(tmp_path, ServerSpec("no-rsa-sha1", SERVERS[0].make, ""), srv)
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 1
    assert "FAIL SSH login: the server refused key authentication" in result.stdout
    assert "set sftp.rsa_sha1 = true" in result.stdout


@pytest.mark.parametrize("server", [spec for spec in SERVERS if spec.id == "openssh-no-posix-rename"],
                         indirect=True, ids=["openssh-no-posix-rename"])
def test_doctor_reports_plain_rename(server: tuple[ServerSpec, SftpTestServer], tmp_path: Path) -> None:
    spec, srv = server
    env = agent_env(tmp_path, spec, srv)
    result = env.cli("doctor", "--config", str(env.config_path))
    assert result.returncode == 0, result.stdout
    assert "renamed (plain rename: the server refuses or lacks posix-rename)" in result.stdout
    # `sftp-server -P posix-rename` also stops announcing it
    assert "the agent uses: plain rename (no posix-rename offered" in result.stdout


@pytest.mark.parametrize("server", [spec for spec in SERVERS if spec.id == "openssh-no-posix-rename"],
                         indirect=True, ids=["openssh-no-posix-rename"])
def test_publish_rename_falls_back_and_remembers(server: tuple[ServerSpec, SftpTestServer]) -> None:
    """posix-rename denied: plain rename publishes, the connection remembers it, nothing is replaced."""
    from agent.config import SftpConfig
    from agent.transport.sftp import SftpSession, posix_rename_supported, publish_rename

    _, srv = server
    session = SftpSession(SftpConfig(host=srv.host, port=srv.port, username=srv.username,
                                     private_key=srv.user_key_path, known_hosts=srv.known_hosts_path,
                                     remote_dir=srv.remote_dir))
    try:
        sftp = session.client()
        assert not posix_rename_supported(sftp)  # `-P posix-rename` takes it off the VERSION list too
        sftp.extensions = None  # as a server that announces nothing but denies the request
        assert posix_rename_supported(sftp)
        for index in range(2):
            with sftp.open(f"{srv.remote_dir}/.{index}.part", "wb") as handle:
                handle.write(b"data %d" % index)
        publish_rename(sftp, f"{srv.remote_dir}/.0.part", f"{srv.remote_dir}/users_0.csv")
        assert not posix_rename_supported(sftp)  # remembered for this connection
        with pytest.raises(FileExistsError, match=r"users_0\.csv"):
            publish_rename(sftp, f"{srv.remote_dir}/.1.part", f"{srv.remote_dir}/users_0.csv")
        assert server_files(srv) == {"users_0.csv": b"data 0", ".1.part": b"data 1"}
        session.drop()
        fresh = session.client()
        fresh.extensions = None
        assert posix_rename_supported(fresh)  # a new connection tries again
    finally:
        session.close()
