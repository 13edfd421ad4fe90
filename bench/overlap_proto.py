"""Prototype measurement (not the agent's code path): checking a large file before sending it vs
while sending it (issue 17 item 4), on loopback and through the bench's link emulator.

Each way uses the agent's own pieces: `admit` (validation + SHA-256 in one read, as intake runs it)
and the publish protocol (`transport.publish`: OPEN, WRITEs hashed as read with every status read,
FSTAT, CLOSE) over an `SftpSession` that is already connected, as the running service's is:

- sequential: admit, then send (what the agent does);
- thread: admit in a thread while this thread sends (both under one GIL);
- process: admit in a worker process (multiprocessing, fork) while this thread sends.

Run as root (the tests' sshd):  python bench/overlap_proto.py [--mb 100] [--rounds 3] [--link lan|fat|none]
Prints medians of the wall time to "sent and checked" (the moment the rename could happen).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.config import ImportsConfig, SftpConfig  # noqa: E402
from agent.imports.admission import admit  # noqa: E402
from agent.transport import publish  # noqa: E402
from agent.transport.sftp import SftpSession  # noqa: E402
from bench.link import Link  # noqa: E402
from bench.run import LINKS, make_large_file  # noqa: E402
from tests.helpers.sshd import SshdServer  # noqa: E402

KNOWN: dict[str, str] = {}  # path -> SHA-256, computed before the timed rounds


def check(path: str) -> str | None:
    """What intake's check gives the uploader: the SHA-256 when the file is admitted."""
    verdict = admit(path, Path(path).name, None, None, ImportsConfig())
    return verdict.sha256 if verdict.ok else None


def send(session: SftpSession, path: Path, size: int, remote_dir: str) -> str:
    """The publish protocol's steps for one file; the SHA-256 of the bytes sent. (The upload carries
    the file's real hash, computed untimed, so the protocol's own comparison passes; the rounds
    compare the check's hash with the one sent.)"""
    sftp = session.client()
    upload = publish.Upload(1, size, KNOWN[str(path)], str(path), f"{remote_dir}/.1.part",
                            f"{remote_dir}/x.csv")
    pacer = publish.Pacer(lambda: False, lambda: None, 0, time.sleep)
    publish.open_all(sftp, [upload])
    publish.write_all(sftp, [upload], session.write_request_size(sftp), pacer,
                      lambda: session.extra_lanes(sftp))
    publish.close_all(sftp, [upload])
    assert upload.error is None and upload.remote_size == size, upload.error
    sftp.remove(upload.temp)
    return upload.digest.hexdigest()


def one_round(way: str, session: SftpSession, path: Path, size: int, remote_dir: str,
              pool: concurrent.futures.ProcessPoolExecutor) -> float:
    start = time.perf_counter()
    if way == "sequential":
        checked = check(str(path))
        sent = send(session, path, size, remote_dir)
    elif way == "thread":
        result: list[str | None] = []
        worker = threading.Thread(target=lambda: result.append(check(str(path))))
        worker.start()
        sent = send(session, path, size, remote_dir)
        worker.join()
        checked = result[0]
    else:
        future = pool.submit(check, str(path))
        sent = send(session, path, size, remote_dir)
        checked = future.result()
    seconds = time.perf_counter() - start
    assert checked == sent, "the bytes sent are not the bytes checked"
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--link", choices=("none", *LINKS), action="append")
    args = parser.parse_args()
    from loguru import logger

    logger.remove()  # the agent's INFO lines would interleave with the report
    ways = ("sequential", "thread", "process")
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp, SshdServer(log_level="ERROR") as server:
        path = make_large_file(Path(tmp) / "in", args.mb)
        size = path.stat().st_size
        KNOWN[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        fork = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=fork) as pool:
            pool.submit(int).result()  # the worker exists before any timing
            for link_name in args.link or ["none", "lan"]:
                delay, mbit = LINKS.get(link_name, (0.0, 0.0))
                with Link(server.host, server.port, delay_ms=delay, mbit=mbit) as link:
                    known = server.write_known_hosts(Path(tmp) / f"kh-{link_name}", port=link.port)
                    config = SftpConfig(host=server.host, port=link.port, username=server.username,
                                        private_key=server.user_key_path, known_hosts=known,
                                        remote_dir=server.remote_dir)
                    session = SftpSession(config)
                    session.client()  # connected, as a running service is
                    times: dict[str, list[float]] = {way: [] for way in ways}
                    for round_no in range(args.rounds):
                        for way in ways[round_no % 3:] + ways[:round_no % 3]:
                            times[way].append(one_round(way, session, path, size, server.remote_dir, pool))
                    session.close()
                base = statistics.median(times["sequential"])
                print(f"[{link_name}] {args.mb:g} MB, {args.rounds} rounds")
                for way in ways:
                    median = statistics.median(times[way])
                    print(f"  {way:<11} {median:7.3f} s  ({median / base:4.2f}x sequential)"
                          f"  rounds {', '.join(f'{t:.2f}' for t in times[way])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
