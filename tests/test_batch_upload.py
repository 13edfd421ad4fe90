"""Small files sent together (upload.batch_files, agent/transport/pipelining.py), end to end (issue 7).

The agent runs as a real process against OpenSSH's sshd or the asyncssh sandbox with faults. Each
test checks what the batch path promises: every file on the server exactly once with its bytes,
no temporary names left, each file archived, and a fault in one file's step (or the connection)
never losing or doubling a file of the batch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from loguru import logger

from agent.ops.sandbox import SandboxServer
from agent.pipeline.upload import BATCH_FILE_MAX_BYTES, Uploader
from agent.store.journal import FileState
from tests.helpers.agent_env import AgentEnv, sandbox_env, wait_until
from tests.helpers.queued import queue_files
from tests.helpers.sshd import SshdServer
from tests.helpers.tcp_proxy import TcpProxy

SENT_TOGETHER = re.compile(r" uploaded as (\S+) \((\d+) bytes in [\d.]+ s, (\d+) sent together\)")


def users_csv(rows: int, tag: str) -> bytes:
    """A valid users CSV; `tag` makes each file's content (and so its remote name) unique."""
    lines = ["accountId,id,email"] + [f"acct-{tag}-{i},{tag}-{i},{tag}.{i}@example.com" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def sized_csv(size: int, tag: str) -> bytes:
    """A users CSV of exactly `size` bytes (its last email padded)."""
    data = users_csv(1, tag)
    rows = 1
    while len(data) < size and rows < 100_000:  # bounded: rows grow until one past the size
        rows += 1
        data = users_csv(rows, tag)
    data = users_csv(rows - 1, tag)
    pad = size - len(data)
    assert pad >= 0
    return data[:-len("@example.com\n")] + b"x" * pad + b"@example.com\n"


def remote_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def temp_files(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".")]


def sent_together(log: str) -> list[tuple[str, int, int]]:
    """(remote name, bytes, files sent together) of each batch-path log line."""
    return [(m[1].rsplit("/", 1)[-1], int(m[2]), int(m[3])) for m in SENT_TOGETHER.finditer(log)]


def assert_delivered_once(env: AgentEnv, remote_dir: Path, inputs: dict[str, bytes], context: str) -> None:
    """Every input on the server exactly once with its bytes, no temps, every file archived."""
    remote = remote_files(remote_dir)
    assert len(remote) == len(inputs), f"{len(remote)} remote files for {len(inputs)} inputs\n{context}"
    assert sorted(remote.values()) == sorted(inputs.values()), context
    assert temp_files(remote_dir) == [], context
    rows = env.status()
    assert {row["name"]: row["state"] for row in rows} == dict.fromkeys(inputs, "archived"), context
    for row in rows:
        assert remote[row["remote_name"]] == inputs[row["name"]], context
        assert Path(row["local_path"]).read_bytes() == inputs[row["name"]], context
    assert sorted(p.read_bytes() for p in env.archived_files()) == sorted(inputs.values()), context
    assert [p for p in env.drop.iterdir() if p.is_file()] == [], context


def run_once(env: AgentEnv) -> tuple[int, str]:
    """`run --once`: its exit code, and its output with the log for assertion messages."""
    try:
        result = env.run_once(timeout=30)
    except subprocess.TimeoutExpired as exc:
        output = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        raise AssertionError(f"run --once did not finish in 30 s:\n{output[-6000:]}\n{env.log()}") from None
    return result.returncode, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}\n{env.log()}"


def drop_all(env: AgentEnv, inputs: dict[str, bytes]) -> None:
    for name, data in inputs.items():
        env.drop_atomically(name, data)


def sandbox_remote(tmp_path: Path) -> Path:
    return tmp_path / "sftp-root" / "imports"


@pytest.mark.timeout(90)
def test_burst_of_small_files_is_sent_together_once_each(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    inputs = {f"users_small{i:02d}.csv": users_csv(1 + (i * 7) % 90, f"s{i}") for i in range(40)}
    big = users_csv(8_000, "big")
    assert len(big) > BATCH_FILE_MAX_BYTES  # sent on its own, beside the batch
    inputs["users_big.csv"] = big
    drop_all(env, inputs)

    code, context = run_once(env)
    assert code == 0, context
    assert_delivered_once(env, sshd_server.local_remote_dir, inputs, context)

    lines = sent_together(context)
    batched = [(name, size) for name, size, together in lines if together > 1]
    assert batched, f"no file was sent together with another\n{context}"
    rows = {row["remote_name"]: row for row in env.status()}
    assert rows[next(name for name, _size in batched)]  # the log names real remote files
    assert "users_big.csv" not in {rows[name]["name"] for name, _size in batched}, context
    # each file published once: one "uploaded as" line per remote name, batch or single path
    published = re.findall(r" uploaded as (\S+) \(", context)
    assert sorted(p.rsplit("/", 1)[-1] for p in published) == sorted(rows), context

    name, size = batched[0]
    history = env.cli("history", str(rows[name]["id"]), "--json", "--config", str(env.config_path))
    assert history.returncode == 0, history.stderr
    [found] = json.loads(history.stdout)
    assert found["size"] == size
    states = [event["state"] for event in found["events"]]
    assert "queued" in states, states
    after = states[states.index("queued"):]
    assert after == ["queued", "uploading", "publishing", "uploaded", "archived"], states


@pytest.mark.timeout(60)
def test_disk_full_for_some_files_of_a_batch(sandbox: tuple[SandboxServer, Path], tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    limit = 3000
    small = {f"users_fits{i}.csv": sized_csv(800 + 300 * i, f"fits{i}") for i in range(6)}  # 800..2300
    large = {f"users_over{i}.csv": sized_csv(4000 + 2500 * i, f"over{i}") for i in range(4)}  # 4000..11500
    inputs = small | large
    server.faults.disk_full_after_bytes = limit
    drop_all(env, inputs)
    env.start()
    try:
        assert wait_until(lambda: len(env.archived_files()) == len(small), 20), env.log()
        # the large ones keep failing (each retry meets the full disk again) and stay unpublished
        assert wait_until(lambda: all(f"users_over{i}.csv" in " ".join(
            line for line in env.log().splitlines() if "not uploaded" in line) for i in range(len(large))),
            20), env.log()
        states = env.states()
        assert {name: states[name] for name in small} == dict.fromkeys(small, "archived"), states
        for name in large:
            assert states[name] in ("queued", "uploading"), states
        failures = [line for line in env.log().splitlines() if "not uploaded" in line]
        assert all("No space left on device" in line or "is its disk full?" in line for line in failures), \
            "\n".join(failures)
        remote = remote_files(sandbox_remote(tmp_path))
        assert sorted(remote.values()) == sorted(small.values()), env.log()
        assert any(together > 1 for _n, _s, together in sent_together(env.log())), env.log()

        server.faults.disk_full_after_bytes = None
        assert wait_until(lambda: len(env.archived_files()) == len(inputs), 30), env.log()
    finally:
        assert env.stop() == 0, env.log()
    assert_delivered_once(env, sandbox_remote(tmp_path), inputs, env.log())
    assert [p for p in env.failed.iterdir() if p.is_file()] == [], env.log()


@pytest.mark.timeout(60)
def test_batch_without_posix_rename_uses_plain_rename(sandbox: tuple[SandboxServer, Path],
                                                      tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    server.faults.no_posix_rename = True
    inputs = {f"users_plain{i}.csv": users_csv(2 + 5 * i, f"plain{i}") for i in range(10)}
    drop_all(env, inputs)
    code, context = run_once(env)
    assert code == 0, context
    assert_delivered_once(env, sandbox_remote(tmp_path), inputs, context)
    assert server.counts["rename"] >= len(inputs), dict(server.counts)
    assert server.counts["posix_rename"] >= 1, dict(server.counts)  # tried first, refused
    assert any(together > 1 for _n, _s, together in sent_together(context)), context


@pytest.mark.timeout(60)
def test_batch_refused_on_open_fails_every_file_with_reason(sandbox: tuple[SandboxServer, Path],
                                                            tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    server.faults.permission_denied_on_open = True
    inputs = {f"users_denied{i}.csv": users_csv(3 + i, f"denied{i}") for i in range(5)}
    drop_all(env, inputs)
    code, context = run_once(env)
    assert code == 1, context
    assert env.states() == dict.fromkeys(inputs, "failed"), context
    for name, data in inputs.items():
        assert (env.failed / name).read_bytes() == data
        reason = (env.failed / f"{name}.reason.txt").read_text()
        assert "permission denied" in reason, reason
    assert os.listdir(sandbox_remote(tmp_path)) == [], context
    assert server.counts["open"] >= len(inputs), dict(server.counts)
    assert env.archived_files() == []


@pytest.fixture
def proxied_env(sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path,
                tmp_path: Path) -> AgentEnv:
    return AgentEnv(tmp_path / "agent", host=sshd_proxy.host, port=sshd_proxy.port,
                    username=sshd_server.username, private_key=sshd_server.user_key_path,
                    known_hosts=proxy_known_hosts, remote_dir=sshd_server.remote_dir, settle_seconds=0)


def cut_inputs() -> dict[str, bytes]:
    return {f"users_cut{i:02d}.csv": users_csv(20 + (i * 13) % 60, f"cut{i}") for i in range(60)}


def interrupted_first_try(log: str) -> list[str]:
    return re.findall(r"'(users_cut\d+\.csv)' not uploaded \(attempt 1\)", log)


@pytest.mark.timeout(60)
def test_connection_cut_while_a_batch_is_written(proxied_env: AgentEnv, sshd_proxy: TcpProxy,
                                                 sshd_server: SshdServer) -> None:
    env = proxied_env
    inputs = cut_inputs()
    total = sum(len(data) for data in inputs.values())
    # The server is unreachable until every file is queued, so the first connection carries one
    # batch of all of them, whatever the load (no batch of one, no second connection meanwhile).
    sshd_proxy.refuse = True
    drop_all(env, inputs)
    env.start()
    try:
        assert wait_until(lambda: list(env.states().values()) == ["queued"] * len(inputs), 30), env.log()
        offset = len(env.log())
        # past the SSH handshake and login (a few KB): inside that batch's writes
        sshd_proxy.cut_after_bytes = 20_000 + total // 2
        sshd_proxy.refuse = False
        assert sshd_proxy.wait_until(lambda p: p.connections_cut >= 1, 30), env.log()
        sshd_proxy.cut_after_bytes = None
        assert wait_until(lambda: len(env.archived_files()) == len(inputs), 40), env.log()
    finally:
        assert env.stop() == 0, env.log()
    log = env.log()
    cut = re.findall(r"'(users_cut\d+\.csv)' not uploaded \(attempt \d+\): (?!cannot connect)", log[offset:])
    assert len(cut) > 1, log  # the cut met files sent together
    assert_delivered_once(env, sshd_server.local_remote_dir, inputs, log)


@pytest.mark.timeout(60)
def test_connection_cut_after_a_batch_was_renamed_but_not_told(proxied_env: AgentEnv, sshd_proxy: TcpProxy,
                                                               sshd_server: SshdServer) -> None:
    """The server renamed (published) files of the batch, the replies never came: each file is
    found published at the next attempt and is neither sent nor published again."""
    env = proxied_env
    inputs = cut_inputs()
    remote = sshd_server.local_remote_dir
    sshd_proxy.delay_ms = 150  # each reply is held this long: the cut lands before the rename replies
    drop_all(env, inputs)
    env.start()
    try:
        assert wait_until(lambda: bool(remote_files(remote)), 30, interval=0.005), env.log()
        sshd_proxy.cut_all()
        sshd_proxy.delay_ms = 0
        assert sshd_proxy.wait_until(lambda p: p.connections_cut >= 1, 10), env.log()
        assert wait_until(lambda: len(env.archived_files()) == len(inputs), 40), env.log()
    finally:
        assert env.stop() == 0, env.log()
    log = env.log()
    assert len(interrupted_first_try(log)) > 1, log
    assert "already published" in log, log
    assert_delivered_once(env, remote, inputs, log)


@pytest.mark.parametrize("archive_usable", [True, False], ids=["archived", "archive unusable"])
def test_a_file_archived_as_it_is_published_gets_one_line_for_both(
        make_uploader: Callable[..., Uploader], sshd_server: SshdServer, archive_usable: bool) -> None:
    uploader = make_uploader()
    records = queue_files(uploader, [(f"users_log{i}.csv", users_csv(2, f"log{i}")) for i in range(3)])
    if not archive_usable:  # a file where the archive folder should be: filing fails after the publish
        shutil.rmtree(uploader.config.paths.archive)
        uploader.config.paths.archive.write_text("not a folder\n")
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="INFO")
    try:
        done = uploader.process_batch(records)
    finally:
        logger.remove(sink)
    assert len(remote_files(sshd_server.local_remote_dir)) == 3  # published either way
    for record in records:
        about = [line for line in lines if f"#{record.id} " in line and "uploaded as" in line]
        assert len(about) == 1, lines  # one line says the upload, whatever happens to the filing
        assert ("archived to" in about[0]) is archive_usable, about
        assert re.search(r"uploaded as \S+ \(\d+ bytes in [\d.]+ s, 3 sent together\)", about[0]), about
    assert {record.state for record in done} == {FileState.ARCHIVED if archive_usable else FileState.UPLOADED}
